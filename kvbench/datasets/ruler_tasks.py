"""The 13 RULER tasks (Hsieh et al., 2024, arXiv:2404.06654), generated from a seeded ``random.Random``.

Templates, haystacks, needle placement, task settings and answer budgets follow NVIDIA/RULER at commit
:data:`RULER_COMMIT` (``scripts/data/synthetic/*.py``, ``constants.py`` and ``scripts/synthetic.yaml``).
Each task builds its prompt from a haystack size ``n`` (essay words, noise lines, distractor needles, list
entries or coded words); :func:`fit` then picks the largest ``n`` whose whole prompt fits the token budget.
Everything that depends on ``n`` is either a prefix-stable stream or reseeded from ``n``, so the token count
grows (almost) monotonically with ``n``, which the search needs, and the sample drawn at the fitted size has
RULER's distribution.

RULER shuffles needles, word lists and qa documents with a generator reseeded from its global seed
(``random.Random(random_seed).shuffle``), so every list of one length gets the same permutation in every
sample; :func:`ruler_shuffle` does the same with ``dataset.seed`` (RULER's default is 42 too). For qa this
decides where the answer is: RULER's list starts with the gold document, and with seed 42 that permutation
puts it among the last three documents, next to the question, whenever there are at most 32 (4096 tokens hold
about 20-30), so a per-sample shuffle would make qa harder than RULER's, most of all for presses that keep the
most recent tokens.

Deliberate differences from RULER's scripts, each for a reason:

- RULER fits the haystack size once per task and backs off in coarse steps when a sample is too long; here
  every sample gets the largest haystack that fits, so prompts are as long as asked.
- RULER takes the first questions of the SQuAD/HotpotQA files in file order; here the question is drawn from
  the seed, so ``dataset.seed`` varies every task and a sample never depends on how many are drawn.
- RULER splits essays into sentences with nltk's punkt model, which needs a download; a regular expression
  that splits after ``.``, ``!`` or ``?`` (and a closing quote or bracket) stands in for it offline.
- Keys and values of distractor needles never repeat the real ones, and vt chains get distinct values, so
  every reference answer stays unique.
- cwe's solved example is text inside the one user turn, as RULER writes it with its ``base`` template, the
  one kvpress' published RULER set was made with (``simonjegou/ruler``, ``--model_template_type base``) before
  its pipeline applies the model's chat template to the whole prompt, as here. With one of RULER's chat
  templates the example would be a templated turn of its own, answer included, before the real prompt's.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable, NamedTuple

from kvbench.datasets import ruler_data
from kvbench.errors import KVBenchError

RULER_COMMIT = "c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a"
TokenCounter = Callable[[str], int]


class Prompt(NamedTuple):
    context: str
    question: str
    answer_prefix: str
    answers: list[str]

    @property
    def text(self) -> str:
        return self.context + self.question + self.answer_prefix


@dataclass(frozen=True)
class Target:
    """What a sample must fit: RULER's ``max_seq_length`` (``length``) and the prompt tokens allowed in it."""

    length: int  # dataset.context_length
    budget: int  # prompt text tokens: length minus the answer's room (RULER's tokens_to_generate) and the template's
    count: TokenCounter
    template: int = 0  # tokens the model's chat template adds around the prompt text (RULER counts them too)

    @property
    def reserved(self) -> int:
        return self.length - self.budget


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
    """Keeps the table below one line per task (k keys, v values per key, q keys queried)."""
    return dict(kind="niah", haystack=haystack, key=key, value=value, num_k=k, num_v=v, num_q=q)


# scripts/synthetic.yaml
SPECS: dict[str, dict] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
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
# constants.py: tokens_to_generate per task family
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

# One haystack unit of RULER's noise haystack: the whole line, repeated and joined by newlines.
NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Essay haystacks place needles at 40 evenly spaced whole-percent depths (np.round(np.linspace(0, 100, 40))).
ESSAY_DEPTHS = tuple(int(100 * i / 39 + 0.5) for i in range(40))
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
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
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{count} variables are assigned the value {value}, they are: "
)
VT_EXAMPLE_TOKENS = 500  # the one-shot example is generated to fit 500 tokens (its own noise, 3-letter names)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the {num} most common words in the above list?"
CWE_PREFIX = " Answer: The top {num} words that appear most often in the list are:"
# Below this context length RULER's cwe uses lighter frequencies: (example words, example common/uncommon
# repeats), (common/uncommon repeats); from it on the example has 40 words at 10/3 and the list synthetic.yaml's.
CWE_FULL_LENGTH = 4096
CWE_SHORT = ((20, 3, 1), (6, 1))
CWE_EXAMPLE_FULL = (40, 10, 3)
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_NOISE = "..."  # RULER's top-ranked coded word, the filler the question asks to ignore
FWE_WORD_LENGTH = 6
FWE_TOKENS_PER_WORD = 50  # vocabulary size = (max_seq_length - tokens_to_generate) // 50
QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."


def fit(build: Callable[[int], Prompt], target: Target, task: str, limit: int | None = None) -> int:
    """Largest haystack size whose whole prompt has at most ``target.budget`` tokens.

    Prompt length is close to linear in the haystack size, so two secant steps land within a few units of
    the answer and a short exact bracket search finishes: about ten tokenizer calls per sample instead of a
    bisection over the whole range, and every answer is verified on the real prompt.
    """
    budget, sizes = target.budget, {}

    def size(n: int) -> float:
        if limit is not None and n > limit:
            return float("inf")
        if n not in sizes:
            sizes[n] = target.count(build(n).text)
        return sizes[n]

    base = size(0)
    if base > budget:
        raise KVBenchError(
            f"{task} needs at least {int(base) + target.reserved} tokens ({int(base)} of prompt + "
            f"{target.reserved - target.template} reserved for the answer"
            + (f" + {target.template} of chat template" if target.template else "")
            + f"); dataset.context_length is {target.length}, raise it"
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


def scatter(lines: list[str], items: list[str], rng: random.Random) -> list[str]:
    """RULER's line haystacks: each item goes in before its own uniformly drawn line (never two together)."""
    out = list(lines)
    slots = max(len(lines), len(items))  # fewer lines than items only while fit() measures the bare prompt
    for index, item in zip(sorted(rng.sample(range(slots), len(items)), reverse=True), items):
        out.insert(index, item)
    return out


def thread(lines: list[str], chain: list[str], rng: random.Random) -> list[str]:
    """RULER's vt: a chain's statements go in at uniformly drawn lines, in chain order."""
    out = list(lines)
    slots = max(len(out), len(chain))
    for offset, index in enumerate(sorted(rng.sample(range(slots), len(chain)))):
        out.insert(index + offset, chain[offset])
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


def essay_sentences(n: int) -> list[str]:
    """The first ``n`` essay words (cycling past the end), split into sentences so needles land between them."""
    words = ruler_data.essay_words()
    laps, rest = divmod(n, len(words))
    text = " ".join(words * laps + words[:rest])
    return SENTENCE_END.split(text) if text else []


def essay_with_needles(n: int, needles: list[str], depths: list[int]) -> str:
    """RULER's essay haystack: needle ``i`` goes after ``int(sentences * (depths[i] / 100))`` whole sentences (in
    that order of operations: ``sentences * depth / 100`` rounds otherwise for 14 of 79,960 pairs, 300 at 41 %)."""
    sentences = essay_sentences(n)
    cuts = [0, *(int(len(sentences) * (depth / 100)) for depth in depths), len(sentences)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def random_item(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    lists = ruler_data.word_lists()
    return f"{rng.choice(lists['adjective'])}-{rng.choice(lists['noun'])}"


def ruler_shuffle(items: list, seed: int) -> None:
    """RULER's ``random.Random(random_seed).shuffle``: a fresh generator each call, so the permutation depends on the length only."""
    random.Random(seed).shuffle(items)


def join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah(spec: dict, rng: random.Random, target: Target, task: str, seed: int) -> Prompt:
    """Needles "One of the special magic ... for KEY is: VALUE." hidden in an essay, noise or needle haystack."""
    kind, num_k = spec["value"], max(spec["num_k"], spec["num_q"])
    taken: set[str] = set()
    keys = distinct(lambda: random_item(spec["key"], rng), num_k, taken)
    values = [distinct(lambda: random_item(kind, rng), spec["num_v"], taken) for _ in keys]
    needles = [NEEDLE.format(kind=kind, key=key, value=value) for key, vals in zip(keys, values) for value in vals]
    ruler_shuffle(needles, seed)
    queried = rng.sample(range(num_k), spec["num_q"])
    answers = [value for i in queried for value in values[i]]
    one = spec["num_v"] * spec["num_q"] == 1
    noun = kind[:-1] if one else kind
    intro, question, prefix = (part.format(kind=noun, query=join_keys([keys[i] for i in queried])) for part in NIAH_TEMPLATES[one])

    if spec["haystack"] == "essay":
        depths = sorted(rng.sample(ESSAY_DEPTHS, len(needles)))

        def body(n: int) -> str:
            return essay_with_needles(n, needles, depths)
    else:
        stream_rng, placement = random.Random(rng.getrandbits(64)), rng.getrandbits(64)

        def distractor() -> str:  # keys and values never repeat a real needle's, so the answer stays unique
            key, value = (distinct(lambda t=t: random_item(t, stream_rng), 1, taken)[0] for t in (spec["key"], kind))
            return NEEDLE.format(kind=kind, key=key, value=value)

        units = Stream(distractor).take if spec["haystack"] == "needle" else (lambda n: [NOISE_LINE] * n)

        def body(n: int) -> str:
            return "\n".join(scatter(units(n), needles, random.Random(f"{placement}:{n}")))

    def build(n: int) -> Prompt:
        return Prompt(intro + body(n) + "\n", question, prefix, answers)

    return build(fit(build, target, task))


def vt_chain(names: list[str], value: str) -> list[str]:
    """``VAR A = 12345`` then ``VAR B = VAR A `` ...: one line each, no period (RULER keeps a trailing blank)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def vt_builder(rng: random.Random, spec: dict, name_length: int, answer_text: str = "",
               placement: int | None = None) -> Callable[[int], Prompt]:
    """A vt prompt over ``n`` noise lines, ``answer_text`` (the one-shot example) in front of it; ``placement``
    (default: drawn from ``rng``) decides where the chains' lines go."""
    chains, hops = spec["num_chains"], spec["num_hops"]
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_length)), chains * (hops + 1))
    values = distinct(lambda: str(rng.randrange(10_000, 99_999)), chains)
    groups = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)]
    placement = rng.getrandbits(64) if placement is None else placement
    question = VT_QUESTION.format(value=values[0])
    prefix = VT_PREFIX.format(count=hops + 1, value=values[0])

    def build(n: int) -> Prompt:
        lines, place = [NOISE_LINE] * n, random.Random(f"{placement}:{n}")
        for group, value in zip(groups, values):
            lines = thread(lines, vt_chain(group, value), place)
        return Prompt(answer_text + VT_INTRO + "\n".join(lines) + "\n", question, prefix, groups[0])

    return build


def vt(spec: dict, rng: random.Random, target: Target, task: str, seed: int) -> Prompt:
    """Variable tracking after RULER's one-shot example: a solved vt prompt of its own, fitted to 500 tokens.

    RULER builds that example once per task file and gives each sample fresh names and a fresh value in it, so
    every sample shows one layout: here the layout and its size come from the seed and the task, the names and the
    value from the sample."""
    shared = random.Random(f"{seed}:{task}:vt example")
    layout = shared.getrandbits(64)
    size = fit(vt_builder(shared, spec, 3, placement=layout), Target(VT_EXAMPLE_TOKENS, VT_EXAMPLE_TOKENS, target.count),
               f"{task} example")
    solved = vt_builder(rng, spec, 3, placement=layout)(size)
    shown = solved.text + " " + " ".join(solved.answers) + "\n" + "\n"
    build = vt_builder(rng, spec, name_length=5, answer_text=shown)
    return build(fit(build, target, task))


def numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def cwe(spec: dict, rng: random.Random, target: Target, task: str, seed: int) -> Prompt:
    """A shuffled numbered word list where ``num_cw`` words repeat more often than the rest, after one example."""
    num = spec["num_cw"]
    lists = ruler_data.word_lists()
    vocabulary = sorted(set(lists["noun"]) | set(lists["adjective"]) | set(lists["verb"]))
    if target.length < CWE_FULL_LENGTH:
        (example_size, example_cw, example_ucw), (freq_cw, freq_ucw) = CWE_SHORT
    else:
        (example_size, example_cw, example_ucw), freq_cw, freq_ucw = CWE_EXAMPLE_FULL, spec["freq_cw"], spec["freq_ucw"]
    question, prefix = CWE_QUESTION.format(num=num), CWE_PREFIX.format(num=num)
    example = rng.sample(vocabulary, example_size)
    example_words = example[:num] * example_cw + example[num:] * example_ucw
    ruler_shuffle(example_words, seed)
    shown = CWE_INTRO + numbered(example_words) + "\n" + question + prefix + " " + numbered(example[:num]) + "\n"
    pool = rng.sample(vocabulary, len(vocabulary))  # RULER samples the list's words independently of the example's
    common, rare = pool[:num], pool[num:]

    def build(n: int) -> Prompt:
        words = common * freq_cw + rare[:n] * freq_ucw
        ruler_shuffle(words, seed)
        return Prompt(shown + CWE_INTRO + numbered(words) + "\n", question, prefix, list(common))

    n = fit(build, target, task, limit=len(rare))
    if n == len(rare) and target.count(build(n).text) < 0.95 * target.budget:
        raise KVBenchError(
            f"{task} runs out of words at {target.count(build(n).text)} prompt tokens (RULER's extra english_words.json "
            f"is not in the packaged data); lower dataset.context_length"
        )
    return build(n)


def zeta(s: float) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin after 64 terms: error far below 1e-12), as RULER's scipy call."""
    n = 64
    head = sum(k**-s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720


def fwe(spec: dict, rng: random.Random, target: Target, task: str, seed: int) -> Prompt:
    """Coded words with RULER's fixed Zipf counts ``int(n * k**-alpha / zeta(alpha))``; rank 1 is the '...' filler."""
    alpha = float(spec["alpha"])
    size = (target.length - MAX_NEW_TOKENS["fwe"]) // FWE_TOKENS_PER_WORD
    if alpha <= 1 or size < 5:
        raise KVBenchError(
            f"{task} needs a vocabulary of at least 5 coded words ((context_length - {MAX_NEW_TOKENS['fwe']}) // "
            f"{FWE_TOKENS_PER_WORD}) and alpha > 1; raise dataset.context_length"
        )
    vocabulary = sorted(distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)), size))
    ruler_shuffle(vocabulary, seed)  # RULER ranks its sorted vocabulary in this fixed order
    vocabulary[0] = FWE_NOISE
    shares = [k**-alpha / zeta(alpha) for k in range(1, size + 1)]

    def counts(n: int) -> list[int]:
        return [int(n * share) for share in shares]

    def build(n: int) -> Prompt:
        words = [word for word, times in zip(vocabulary, counts(n)) for _ in range(times)]
        ruler_shuffle(words, seed)
        return Prompt(FWE_INTRO + " ".join(words) + "\n", FWE_QUESTION, FWE_PREFIX, vocabulary[1:4])

    n = fit(build, target, task)
    top = counts(n)[1:5]
    if not all(a > b for a, b in zip(top, top[1:])) or top[2] < 1:
        raise KVBenchError(f"{task} cannot rank three coded words apart in {target.budget} tokens; raise dataset.context_length")
    return build(n)


def qa(spec: dict, rng: random.Random, target: Target, task: str, seed: int) -> Prompt:
    """Gold paragraph(s), then distractors from the same article (RULER's order), then random ones, packed tight."""
    corpus = ruler_data.squad() if spec["dataset"] == "squad" else ruler_data.hotpotqa()
    budget, count = target.budget, target.count

    def build(docs: list[int]) -> Prompt:
        body = "\n\n".join(f"Document {i}:\n{corpus.documents[d]}" for i, d in enumerate(docs, 1))
        # RULER repeats the instruction after the documents; kvpress' split (at the instruction's last occurrence)
        # puts the repeat in the question, so it is never compressed and SnapKV's window ends on the documents
        context = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{body}\n\n"
        return Prompt(context, f"{QA_INSTRUCTION}\n\nQuestion: {item.question}", " Answer:", list(item.answers))

    for _ in range(100):  # leave distractors at least a tenth of the budget, else draw another question
        item = corpus.items[rng.randrange(len(corpus.items))]
        used = count(build(list(item.gold)).text)
        if used <= 0.9 * budget:
            break
    else:
        raise KVBenchError(
            f"{task} found no question whose gold documents fit in {budget} prompt tokens; raise dataset.context_length"
        )
    # Separator and header are measured in place: "\n\n" alone is one token but two after a sentence.
    headers: dict[int, int] = {}
    sizes: dict[int, int] = {}

    def header(k: int) -> int:
        if k not in headers:
            headers[k] = count(f".\n\nDocument {k}:\n") - count(".")
        return headers[k]

    def size(doc: int) -> int:
        if doc not in sizes:
            sizes[doc] = count(corpus.documents[doc])
        return sizes[doc]

    chosen = set(item.gold)

    def take(candidates: list[int], misses_allowed: int) -> list[int]:
        """First fit in the given order; stops when the room is nearly full or too many documents failed."""
        nonlocal used
        added, misses = [], 0
        for doc in candidates:
            if budget - used <= budget // 100 or misses >= misses_allowed:
                break
            extra = size(doc) + header(len(chosen) + 1)
            if doc in chosen or used + extra > budget:
                misses += doc not in chosen
                continue
            chosen.add(doc)
            added.append(doc)
            used += extra
        return added

    fillers = take(rng.sample(item.near, len(item.near)), len(item.near))
    article_only = not chosen >= set(item.near)
    if not article_only:  # the whole article is in: random paragraphs fill the rest, as in RULER
        fillers += take(rng.sample(range(len(corpus.documents)), min(len(corpus.documents), 4000)), 200)
    # The gap left is smaller than every rejected document: trading one filler for a slightly longer rejected
    # one of the same group (the article's own paragraphs, or random ones once the article is in) closes most of it.
    pool = item.near if article_only else [d for d in sizes if d not in item.near]
    group = [(slot, old) for slot, old in enumerate(fillers) if (old in item.near) == article_only]
    trades = [(size(new) - size(old), slot, new) for slot, old in group for new in pool if new not in chosen]
    gain, slot, new = max([t for t in trades if 0 < t[0] <= budget - used], default=(0, -1, -1))
    if gain:
        chosen.discard(fillers[slot])
        chosen.add(new)
        fillers[slot] = new
    near = set(item.near)

    def arrange() -> list[int]:
        """RULER's list (the question's own documents, its article's others, random ones), RULER-shuffled."""
        own = [d for d in item.own if d in chosen]
        article = [d for d in (item.near if near <= chosen else fillers) if d in near and d in chosen and d not in own]
        order = own + article + [d for d in fillers if d not in near and d not in own]
        ruler_shuffle(order, seed)
        return order

    prompt = build(arrange())
    while count(prompt.text) > budget and fillers:  # a merge at a join the estimate missed: drop a filler
        chosen.discard(fillers.pop())
        prompt = build(arrange())
    return prompt


GENERATORS: dict[str, Callable[..., Prompt]] = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe, "qa": qa}


def generate(task: str, seed: int, index: int, target: Target) -> Prompt:
    """One sample; its generator is seeded from (seed, task, index), so samples never depend on each other.

    ``seed`` alone also seeds RULER's fixed shuffles (:func:`ruler_shuffle`), shared by every sample.
    """
    rng = random.Random(f"{seed}:{task}:{index}")
    spec = SPECS[task]
    return GENERATORS[spec["kind"]](spec, rng, target, task, seed)
