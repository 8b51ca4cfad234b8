"""The 13 RULER tasks (Hsieh et al., 2024, arXiv:2404.06654), generated from a seeded ``random.Random``.

Prompt wording, task settings and answer budgets follow RULER's templates and ``synthetic.yaml``. Each task
builds its prompt from a haystack size ``n`` (words, noise sentences, distractor needles, list entries or coded
words); :func:`fit` then picks the largest ``n`` whose whole prompt fits the token budget. Haystack units come
from prefix-stable sources, so the token count grows (almost) monotonically with ``n``, which the search needs.
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections import Counter
from typing import Callable, NamedTuple

import numpy as np

from kvbench.datasets import ruler_data
from kvbench.errors import KVBenchError

TokenCounter = Callable[[str], int]


class Prompt(NamedTuple):
    context: str
    question: str
    answer_prefix: str
    answers: list[str]

    @property
    def text(self) -> str:
        return self.context + self.question + self.answer_prefix


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
    """Keeps the table below one line per task (k keys, v values per key, q keys queried)."""
    return dict(kind="niah", haystack=haystack, key=key, value=value, num_k=k, num_v=v, num_q=q)


SPECS: dict[str, dict] = {
    "niah_single_1": _niah("repeat", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": dict(kind="vt", num_chains=1, num_hops=4),
    "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(kind="fwe", alpha=2.0),
    "qa_1": dict(kind="qa", dataset="squad"),
    "qa_2": dict(kind="qa", dataset="hotpotqa"),
}
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = tuple(100 * i / 39 for i in range(40))  # RULER spreads needles over 40 evenly spaced depths
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATES = {  # RULER switches to the singular when exactly one value is asked for
    False: (
        "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards.\n",
        "What are all the special magic {kind} for {query} mentioned in the provided text?",
        " The special magic {kind} for {query} mentioned in the provided text are",
    ),
    True: (
        "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards.\n",
        "What is the special magic {kind} for {query} mentioned in the provided text?",
        " The special magic {kind} for {query} mentioned in the provided text is",
    ),
}
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
# "assgined" is RULER's own spelling; kept so prompts match the published benchmark token for token.
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{count} variables are assgined the value {value}, they are: "
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the {num} most common words in the above list?"
CWE_PREFIX = " Answer: The top {num} words that appear most often in the list are:"
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."


def fit(build: Callable[[int], Prompt], count: TokenCounter, budget: int, task: str, limit: int | None = None) -> int:
    """Largest haystack size whose whole prompt has at most ``budget`` tokens.

    Prompt length is close to linear in the haystack size, so two secant steps land within a few units of
    the answer and a short exact bracket search finishes: about ten tokenizer calls per sample instead of a
    bisection over the whole range, and every answer is verified on the real prompt.
    """
    sizes: dict[int, float] = {}

    def size(n: int) -> float:
        if limit is not None and n > limit:
            return float("inf")
        if n not in sizes:
            sizes[n] = count(build(n).text)
        return sizes[n]

    base = size(0)
    if base > budget:
        raise KVBenchError(
            f"{task} needs at least {int(base)} prompt tokens, the budget is {budget}; raise dataset.context_length"
        )
    guess = 16 if limit is None else min(16, limit)
    for _ in range(2):
        grown = size(guess) - base
        if grown <= 0:
            break
        guess = max(1, int(guess * (budget - base) / grown))
        guess = guess if limit is None else min(guess, limit)
    step = max(1, guess // 100)
    if size(guess) <= budget:
        lo, hi = guess, guess + step
        while size(hi) <= budget:
            lo, step = hi, step * 2
            hi = lo + step
    else:
        lo, hi = max(0, guess - step), guess
        while size(lo) > budget:
            hi, step = lo, step * 2
            lo = max(0, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return lo


class Stream:
    """Units drawn one at a time from a private generator, so haystack ``n + 1`` extends haystack ``n``."""

    def __init__(self, draw: Callable[[], str]):
        self.draw, self.items = draw, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.draw())
        return self.items[:n]


def insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Place ``items[i]`` at ``depths[i]`` percent of ``units``; equal depths keep the items' order."""
    out = list(units)
    for depth, _, item in sorted(zip(depths, range(len(items)), items), reverse=True):
        out.insert(round(depth / 100 * len(units)), item)
    return out


def distinct(draw: Callable[[], str], count: int, taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < count:
        item = draw()
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


def noise(n: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(n)]


def essay_sentences(n: int) -> list[str]:
    """The first ``n`` essay words (cycling past the end), split into sentences so needles land between them."""
    words = ruler_data.essay_words()
    laps, rest = divmod(n, len(words))
    text = " ".join(words * laps + words[:rest])
    return SENTENCE_END.split(text) if text else []


def random_item(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    lists = ruler_data.word_lists()
    return f"{rng.choice(lists['adjective'])}-{rng.choice(lists['noun'])}"


def join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah(spec: dict, rng: random.Random, budget: int, count: TokenCounter, task: str) -> Prompt:
    """Needles "One of the special magic ... for KEY is: VALUE." hidden at random depths of a haystack."""
    kind, num_k = spec["value"], max(spec["num_k"], spec["num_q"])
    taken: set[str] = set()
    keys = distinct(lambda: random_item(spec["key"], rng), num_k, taken)
    values = [distinct(lambda: random_item(kind, rng), spec["num_v"], taken) for _ in keys]
    needles = [NEEDLE.format(kind=kind, key=key, value=value) for key, vals in zip(keys, values) for value in vals]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    queried = keys[: spec["num_q"]]
    answers = [value for vals in values[: spec["num_q"]] for value in vals]
    one = spec["num_v"] * spec["num_q"] == 1
    noun = kind[:-1] if one else kind
    intro, question, prefix = (part.format(kind=noun, query=join_keys(queried)) for part in NIAH_TEMPLATES[one])
    stream_rng = random.Random(rng.getrandbits(64))

    def distractor() -> str:  # keys and values never repeat a real needle's, so the answer stays unique
        key, value = (distinct(lambda t=t: random_item(t, stream_rng), 1, taken)[0] for t in (spec["key"], kind))
        return NEEDLE.format(kind=kind, key=key, value=value)

    haystack = {"essay": (essay_sentences, " "), "repeat": (noise, " "), "needle": (Stream(distractor).take, "\n")}
    units_of, separator = haystack[spec["haystack"]]

    def build(n: int) -> Prompt:
        body = separator.join(insert(units_of(n), needles, depths))
        return Prompt(intro + body + "\n", question, prefix, answers)

    return build(fit(build, count, budget, task))


def vt_parts(rng: random.Random, names: list[str], chains: int, hops: int) -> tuple[list[str], list[float], str, list[str]]:
    """Assignment chains ``VAR A = 12345``, ``VAR B = VAR A``, ... interleaved in order at random depths."""
    values = distinct(lambda: str(rng.randint(10_000, 99_999)), chains)
    groups = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)]
    statements = [
        [f"VAR {group[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(group, group[1:])]
        for group, value in zip(groups, values)
    ]
    labels = [c for c in range(chains) for _ in range(hops + 1)]
    rng.shuffle(labels)
    pending = [iter(s) for s in statements]
    ordered = [next(pending[c]) for c in labels]
    depths = sorted(100 * rng.random() for _ in ordered)
    return ordered, depths, values[0], groups[0]


def vt(spec: dict, rng: random.Random, budget: int, count: TokenCounter, task: str) -> Prompt:
    chains, hops = spec["num_chains"], spec["num_hops"]
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), 2 * chains * (hops + 1))
    # RULER shows one solved example first, so that even small models answer with bare variable names.
    demo, demo_depths, demo_value, demo_answers = vt_parts(rng, names[: chains * (hops + 1)], chains, hops)
    demo_text = (
        VT_INTRO + " ".join(insert(noise(2 * len(NOISE)), demo, demo_depths)) + "\n"
        + VT_QUESTION.format(value=demo_value)
        + VT_PREFIX.format(count=len(demo_answers), value=demo_value) + " ".join(demo_answers) + "\n\n"
    )
    statements, depths, value, answers = vt_parts(rng, names[chains * (hops + 1) :], chains, hops)
    question, prefix = VT_QUESTION.format(value=value), VT_PREFIX.format(count=len(answers), value=value)

    def build(n: int) -> Prompt:
        return Prompt(demo_text + VT_INTRO + " ".join(insert(noise(n), statements, depths)) + "\n", question, prefix, answers)

    return build(fit(build, count, budget, task))


def numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def cwe(spec: dict, rng: random.Random, budget: int, count: TokenCounter, task: str) -> Prompt:
    """A shuffled numbered word list where ``num_cw`` words repeat ``freq_cw`` times and the rest ``freq_ucw``."""
    num = spec["num_cw"]
    lists = ruler_data.word_lists()
    vocabulary = sorted(set(lists["noun"]) | set(lists["adjective"]) | set(lists["verb"]))
    pool = rng.sample(vocabulary, len(vocabulary))
    demo_common, demo_rare, common, rare = pool[:num], pool[num : 2 * num], pool[2 * num : 3 * num], pool[3 * num :]
    demo_words = demo_common * 2 + demo_rare
    rng.shuffle(demo_words)
    question, prefix = CWE_QUESTION.format(num=num), CWE_PREFIX.format(num=num)
    demo_text = CWE_INTRO + numbered(demo_words) + "\n" + question + prefix + " " + ", ".join(demo_common) + "\n\n"
    shuffle_seed = rng.getrandbits(64)

    def builder(freq_cw: int, freq_ucw: int) -> Callable[[int], Prompt]:
        def build(n: int) -> Prompt:
            words = common * freq_cw + rare[:n] * freq_ucw
            random.Random(shuffle_seed + n).shuffle(words)
            return Prompt(demo_text + CWE_INTRO + numbered(words) + "\n", question, prefix, list(common))

        return build

    freq_cw, freq_ucw = spec["freq_cw"], spec["freq_ucw"]
    configured = builder(freq_cw, freq_ucw)
    if count(configured(num).text) > budget:
        # RULER's frequencies (300 entries for the common words alone) do not fit short prompts; there, keep the
        # common words at about half of the list, still strictly more frequent than the rest, instead of failing.
        empty = count(builder(0, 0)(0).text)
        per_entry = (count(configured(num).text) - empty) / (num * (freq_cw + freq_ucw))
        entries = max(0.0, (budget - empty) / per_entry)
        scaled = max(2, min(freq_cw, int(entries // (2 * num))))
        freq_cw, freq_ucw = scaled, max(1, min(scaled - 1, freq_ucw * scaled // freq_cw))
    build = builder(freq_cw, freq_ucw)
    return build(fit(build, count, budget, task, limit=len(rare)))


def fwe(spec: dict, rng: random.Random, budget: int, count: TokenCounter, task: str) -> Prompt:
    """Coded words drawn from a Zipf(alpha) law; the top rank is the '....' filler the prompt says to ignore."""
    vocabulary = ["...."] + distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))), 999)
    weights = np.arange(1, len(vocabulary) + 1, dtype=float) ** -spec["alpha"]
    generator = np.random.default_rng(rng.getrandbits(64))
    chunks: list[np.ndarray] = []

    def draws(n: int) -> np.ndarray:
        while sum(len(c) for c in chunks) < n:
            chunks.append(generator.choice(len(vocabulary), size=4096, p=weights / weights.sum()))
        return np.concatenate(chunks)[:n] if chunks else np.zeros(0, dtype=int)

    def ranking(n: int) -> list[tuple[int, int]]:
        return Counter(int(i) for i in draws(n) if i != 0).most_common()

    def build(n: int) -> Prompt:
        answers = [vocabulary[i] for i, _ in ranking(n)[:3]]
        return Prompt(FWE_INTRO + " ".join(vocabulary[i] for i in draws(n)) + "\n", FWE_QUESTION, FWE_PREFIX, answers)

    def ambiguous(n: int) -> bool:
        ranked = ranking(n)
        return len(ranked) > 3 and ranked[2][1] == ranked[3][1]

    n = fit(build, count, budget, task)
    # A tie between the third and fourth coded word would make the reference ambiguous: drop words until none.
    while n > 0 and ambiguous(n):
        n -= 1
    if len(ranking(n)) < 3:
        raise KVBenchError(f"{task} cannot fit three distinct coded words in {budget} tokens; raise dataset.context_length")
    return build(n)


def qa(spec: dict, rng: random.Random, budget: int, count: TokenCounter, task: str) -> Prompt:
    """Gold paragraph(s) among as many distractor documents as fit, packed to a tight length."""
    corpus = ruler_data.squad() if spec["dataset"] == "squad" else ruler_data.hotpotqa()

    def build(docs: list[int]) -> Prompt:
        body = "\n\n".join(f"Document {i}:\n{corpus.documents[d]}" for i, d in enumerate(docs, 1))
        context = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{body}\n\n{QA_INSTRUCTION}\n\n"
        return Prompt(context, f"Question: {item.question}", " Answer:", list(item.answers))

    for _ in range(100):  # leave distractors at least a tenth of the budget, else draw another question
        item = corpus.items[rng.randrange(len(corpus.items))]
        used = count(build(list(item.gold)).text)
        if used <= 0.9 * budget:
            break
    else:
        raise KVBenchError(f"{task} found no question whose gold documents fit in {budget} tokens; raise dataset.context_length")
    # Separator and header are measured in place: "\n\n" alone is one token but two after a sentence.
    header = functools.lru_cache(maxsize=None)(lambda k: count(f".\n\nDocument {k}:\n") - count("."))
    sizes: dict[int, int] = {}

    def size(doc: int) -> int:
        if doc not in sizes:
            sizes[doc] = count(corpus.documents[doc])
        return sizes[doc]

    chosen, added = set(item.gold), []
    permutation = np.random.default_rng(rng.getrandbits(64)).permutation(len(corpus.documents)).tolist()
    candidates = [*rng.sample(item.near, len(item.near)), *permutation]
    # First-fit in random order. The first pass takes no document over half the free room, so that several
    # mid-sized distractors give the final trade something to work with; the second fills what the cap left.
    for cap in ((budget - used) // 2, budget):
        misses = 0
        for doc in candidates:
            if budget - used <= budget // 100 or misses >= 200:
                break
            if doc in chosen:
                continue
            extra = size(doc) + header(len(chosen) + 1)
            if size(doc) > cap or used + extra > budget:
                misses += 1
                continue
            chosen.add(doc)
            added.append(doc)
            used += extra
    # The gap left is smaller than every rejected document: trading one chosen distractor for a slightly
    # longer rejected one closes most of it.
    trades = [(size(new) - size(old), slot, new) for slot, old in enumerate(added) for new in sizes if new not in chosen]
    gain, slot, new = max([t for t in trades if 0 < t[0] <= budget - used], default=(0, -1, -1))
    if gain:
        chosen.discard(added[slot])
        chosen.add(new)
        added[slot] = new
    order = sorted(chosen)
    rng.shuffle(order)
    prompt = build(order)
    while count(prompt.text) > budget and added:  # a merge at a join the estimate missed: drop the last filler
        chosen.discard(added.pop())
        prompt = build([d for d in order if d in chosen])
    return prompt


GENERATORS: dict[str, Callable[..., Prompt]] = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe, "qa": qa}


def generate(task: str, seed: int, index: int, budget: int, count: TokenCounter) -> Prompt:
    """One sample; its generator is seeded from (seed, task, index), so samples never depend on each other."""
    rng = random.Random(f"{seed}:{task}:{index}")
    spec = SPECS[task]
    return GENERATORS[spec["kind"]](spec, rng, budget, count, task)
