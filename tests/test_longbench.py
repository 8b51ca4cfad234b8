import json
import math
from pathlib import Path

import pandas as pd
import pytest

from kvbench.datasets import longbench as lb
from kvbench.errors import KVBenchError
from kvbench.metrics import longbench as m


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _record(task, index, length, context="Passage one. Passage two.", question="Who?", answers=("Alice",), classes=None):
    return {
        "input": question,
        "context": context,
        "answers": list(answers),
        "length": length,
        "dataset": f"{task}_e",
        "language": "en",
        "all_classes": classes,
        "_id": f"{task}-id-{index}",
    }


@pytest.fixture()
def longbench_dir(tmp_path):
    _write_jsonl(tmp_path / "hotpotqa_e.jsonl", [_record("hotpotqa", i, 1000 * (i + 1)) for i in range(3)])
    # LongBench's un-suffixed file name is accepted too.
    trec_classes = ["Animal", "Food", "Color"]
    _write_jsonl(
        tmp_path / "trec.jsonl",
        [_record("trec", 0, 5000, context="Question: What eats grass?\nType: Animal", question="Question: What is red?\nType:",
                 answers=["Color"], classes=trec_classes)],
    )
    code = "def f(x):\n    return {x}\n"
    _write_jsonl(tmp_path / "lcc_e.jsonl", [_record("lcc", 0, 9000, context=code, question="", answers=["y = f(1)"])])
    _write_jsonl(tmp_path / "passage_count_e.jsonl", [_record("passage_count", 0, 2000, question="", answers=["4"])])
    return tmp_path


def test_load_local_files(longbench_dir):
    df = lb.load({"tasks": ["hotpotqa", "trec", "lcc", "passage_count"], "path": str(longbench_dir)}, None)
    assert list(df["task"].value_counts().sort_index().items()) == [("hotpotqa", 3), ("lcc", 1), ("passage_count", 1), ("trec", 1)]
    extras = ("sample_id", "length", "all_classes", "chat_template")
    for column in ("context", "question", "answer_prefix", "answers", "max_new_tokens", "task", *extras):
        assert column in df.columns
    assert df["sample_id"].is_unique

    hotpot = df[df.task == "hotpotqa"].iloc[0]
    assert hotpot.context.startswith("Answer the question based on the given passages.")
    assert hotpot.context.endswith("The following are given passages.\nPassage one. Passage two.")
    assert hotpot.question.endswith("Question: Who?\n")
    assert hotpot.answer_prefix == "Answer:"
    assert hotpot.max_new_tokens == 32
    assert hotpot.answers == ["Alice"]
    assert hotpot.length == 1000
    assert hotpot.all_classes is None
    assert bool(hotpot.chat_template) is True

    trec = df[df.task == "trec"].iloc[0]
    assert bool(trec.chat_template) is False
    assert trec.answer_prefix == ""
    assert trec.question == "\nQuestion: What is red?\nType:"
    assert trec.all_classes == ["Animal", "Food", "Color"]
    assert trec.max_new_tokens == 64

    lcc = df[df.task == "lcc"].iloc[0]
    assert lcc.context == "Please complete the code given below. \ndef f(x):\n    return {x}\n"
    assert lcc.question == "Next line of code:\n"
    assert bool(lcc.chat_template) is False and lcc.max_new_tokens == 64

    count = df[df.task == "passage_count"].iloc[0]
    assert count.answer_prefix == "The final answer is: "
    assert count.question.endswith("such as 1, 2, 3, and so on.\n\n")


def test_num_samples_and_defaults(longbench_dir):
    df = lb.load({"tasks": ["hotpotqa"], "path": str(longbench_dir), "num_samples": 2}, None)
    assert list(df["sample_id"]) == ["hotpotqa/hotpotqa-id-0", "hotpotqa/hotpotqa-id-1"]
    assert set(lb.TASKS) == set(lb.MAX_NEW_TOKENS) and len(lb.TASKS) == 13


def test_records_sharing_an_id_are_each_their_own_sample():
    """A run's checkpoint finds samples by id: two records under one id made a resumed run drop one of them."""
    records = [_record("hotpotqa", 0, 1000, answers=("Paris",)), _record("hotpotqa", 0, 1000, answers=("Rex",)),
               _record("hotpotqa", 0, 1000, answers=("Ann",)), _record("hotpotqa", 1, 1000)]
    rows = lb.build_rows("hotpotqa", records)
    assert [row["sample_id"] for row in rows] == ["hotpotqa/hotpotqa-id-0", "hotpotqa/hotpotqa-id-0_2",
                                                  "hotpotqa/hotpotqa-id-0_3", "hotpotqa/hotpotqa-id-1"]
    assert [row["answers"] for row in rows][:3] == [["Paris"], ["Rex"], ["Ann"]]


def test_a_dataset_giving_two_samples_one_id_is_refused(monkeypatch):
    from kvbench import datasets
    from kvbench.datasets import pg19

    monkeypatch.setattr(pg19, "load", lambda cfg, tokenizer: pd.DataFrame({"sample_id": ["emma-000", "emma-001", "emma-000"]}))
    with pytest.raises(KVBenchError, match="gives more than one sample the id 'emma-000'; give every sample"):
        datasets.load_dataset("pg19", {}, None)


@pytest.mark.parametrize("task", lb.TASKS)
def test_template_split_reassembles_longbench_prompt(task):
    context_t, question_t, prefix = lb.split_template(task)
    assert context_t.endswith("{context}") and "{context}" not in question_t
    assert context_t + question_t + prefix == lb.PROMPTS[task]
    expected = {
        "qasper": "Answer:", "multifieldqa_en": "Answer:", "hotpotqa": "Answer:", "2wikimqa": "Answer:",
        "gov_report": "Summary:", "multi_news": "Summary:",
        "passage_count": "The final answer is: ", "passage_retrieval_en": "The answer is: ",
    }
    assert prefix == expected.get(task, "")


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("task", ["passage_count", "passage_retrieval_en", "hotpotqa"])
def test_prompt_text_is_longbench_prompt_without_a_chat_template(longbench_dir, tokenizer, task):
    """A base model reads LongBench's pred.py prompt to the last character ("The answer is: " keeps its space);
    a chat model gets the same cue verbatim at the start of its turn, as kvpress' answer_prefix."""
    from kvbench.generation import build_prompt

    record = _record(task, 0, 2000, question="Which paragraph?")
    _write_jsonl(longbench_dir / f"{task}_e.jsonl", [record])
    row = lb.load({"tasks": [task], "path": str(longbench_dir)}, None).iloc[0]
    plain = build_prompt(tokenizer, row.context, [row.question], row.answer_prefix, use_chat_template=False)
    text = tokenizer.decode(plain.context_ids[0].tolist() + plain.question_ids[0][0].tolist())
    assert text == lb.PROMPTS[task].format(context=record["context"], input=record["input"])

    chat = build_prompt(tokenizer, row.context, [row.question], row.answer_prefix, use_chat_template=True)
    turn = tokenizer.decode(chat.question_ids[0][0].tolist())
    assert turn.endswith("<|im_start|>assistant\n" + lb.PROMPTS[task].rsplit("\n", 1)[1])


def test_bad_inputs(longbench_dir):
    with pytest.raises(KVBenchError, match="unknown LongBench-E task"):
        lb.load({"tasks": ["narrativeqa_zh"], "path": str(longbench_dir)}, None)
    with pytest.raises(KVBenchError, match="gov_report_e.jsonl"):
        lb.load({"tasks": ["gov_report"], "path": str(longbench_dir)}, None)
    with pytest.raises(KVBenchError, match="dataset.tasks must be null, a task name or a list of task names, got 5"):
        lb.load({"tasks": 5, "path": str(longbench_dir)}, None)


def test_a_task_named_twice_runs_once(longbench_dir):
    """It was refused as 'more than one sample with the id hotpotqa/...', after the model had loaded."""
    twice = lb.load({"tasks": ["hotpotqa", "trec", "hotpotqa"], "path": str(longbench_dir)}, None)
    assert twice.equals(lb.load({"tasks": ["hotpotqa", "trec"], "path": str(longbench_dir)}, None))


def test_hub_offline_points_to_path(monkeypatch):
    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(KVBenchError, match=r"dataset.path=<dir of LongBench jsonl>"):
        lb.load({"tasks": ["qasper"], "path": None}, None)


PINNED = "e" * 40  # a commit: resolves to itself, online or offline


def test_hub_loader_used_with_e_config(monkeypatch):
    import datasets

    calls = []

    def fake_load(hub_id, config, split, revision):
        calls.append((hub_id, config, split, revision))
        return [_record("samsum", i, 3000, question="Dialogue: hi\nSummary:") for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    df = lb.load({"tasks": ["samsum"], "num_samples": 1, "revision": PINNED}, None)
    assert calls == [("THUDM/LongBench", "samsum_e", "test", PINNED)]  # the commit the identity records
    assert len(df) == 1 and df.iloc[0].max_new_tokens == 128 and not df.iloc[0].chat_template


def test_hub_zip_fallback_when_scripts_are_refused(monkeypatch, tmp_path):
    import zipfile

    import datasets
    import huggingface_hub

    def refuse_script(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported")

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("data/qasper_e.jsonl", json.dumps(_record("qasper", 0, 4500)) + "\n")
        zipped.writestr("data/qasper.jsonl", json.dumps(_record("qasper", 9, 100)) + "\n")
    requested = []

    def fake_download(repo_id, filename, repo_type, revision):
        requested.append((repo_id, filename, repo_type, revision))
        return str(archive)

    monkeypatch.setattr(datasets, "load_dataset", refuse_script)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    df = lb.load({"tasks": ["qasper"], "revision": PINNED}, None)
    assert requested == [("THUDM/LongBench", "data.zip", "dataset", PINNED)]
    assert list(df["sample_id"]) == ["qasper/qasper-id-0"] and df.iloc[0].length == 4500


def test_hydra_config_file(longbench_dir):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "longbench_e.yaml")
    assert cfg.name == "longbench_e" and lb.KIND == "generate" and "kind" not in cfg and cfg.tasks is None
    cfg.path = str(longbench_dir)
    cfg.tasks = ["hotpotqa", "lcc"]
    assert len(lb.load(cfg, None)) == 4


# ---- metrics: figures computed with LongBench's own code -----------------------------------------------
# Every expected value below was produced by running THUDM/LongBench's metrics.py / eval.py (revision 2e00731,
# with rouge 1.0.1 and fuzzywuzzy 0.18.0 without python-Levenshtein, CPython 3.11) on these inputs in a
# throw-away environment; only the resulting figures are kept here.

TREC = ["Abbreviation", "Animal", "Color", "Disease and medicine", "Food", "Individual", "Description of a person",
        "Other location", "City", "Country", "Date", "Other number", "Count"]
GOV_REF = ("The report examines federal spending on highways. It finds that costs grew 3.5 percent a year. "
           "GAO recommends that the agency improve its oversight of state programs.")
GOV_HYP = ("GAO reviewed federal highway spending. Costs grew by 3.5 percent each year, the report finds. "
           "The agency should improve oversight of state programs, GAO recommends. No other findings.")

# (metric, prediction, ground truth, all_classes, LongBench's value)
METRIC_FIGURES = [
    ("qa_f1_score", "The Eiffel Tower!", "eiffel tower", None, 1.0),
    ("qa_f1_score", "Paris, France is the city", "Paris", None, 0.4),
    ("qa_f1_score", "a b", "c", None, 0.0),
    ("qa_f1_score", "An apple a day keeps the doctor away", "the apple", None, 0.33333333333333337),
    ("qa_f1_score", "", "yes", None, 0.0),
    ("qa_f1_score", "the", "a", None, 0.0),
    ("qa_f1_score", "U.S.A.", "USA", None, 1.0),
    ("qa_f1_score", "Anne-Marie Smith", "anne marie smith", None, 0.4),
    ("qa_f1_score", "1,000 people", "1000", None, 0.6666666666666666),
    ("qa_f1_score", "cat cat dog", "cat dog dog", None, 0.6666666666666666),
    ("qa_f1_score", "Théâtre  du   Châtelet", "théâtre du châtelet", None, 1.0),
    ("qa_f1_score", "the theater and the atheist", "theater atheist", None, 0.8),
    ("qa_f1_score", "Yes, it was founded in 1998 by Larry Page and Sergey Brin.", "Larry Page and Sergey Brin", None, 0.5882352941176471),
    ("rouge_score", "the cat sat on the mat", "the cat is on the mat", None, 0.7999999950000002),
    ("rouge_score", "police killed the gunman", "the gunman was killed by police", None, 0.39999999520000007),
    ("rouge_score", "", "anything at all", None, 0.0),
    ("rouge_score", "anything at all", "", None, 0.0),
    ("rouge_score", "...", "a b c", None, 0.0),
    ("rouge_score", "same words here", "same words here", None, 0.999999995),
    ("rouge_score", "The Cat sat", "the cat sat", None, 0.3333333283333334),
    ("rouge_score", "Hello, world! How are you?", "hello world how are you", None, 0.19999999500000015),
    ("rouge_score", "a a a b", "a b b b", None, 0.999999995),
    ("rouge_score", "The cat sat. The dog ran.", "The dog ran. A cat sat down.", None, 0.8333333284722222),
    ("rouge_score", "It grew 3.5 percent", "It grew 3 percent", None, 0.8888888839506174),
    ("rouge_score", "x y. . z", "x y z", None, 0.8571428522448981),
    ("rouge_score", "x. .", "y. .", None, 0.4999999950000001),
    ("rouge_score", "line one\nline two", "line one line two", None, 0.999999995),
    ("rouge_score", "   ", "a", None, 0.0),
    ("rouge_score", GOV_HYP, GOV_REF, None, 0.5818181768198348),
    ("rouge_score", "w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5", None, 0.6153846106508877),
    ("rouge_score", "Amanda will bring the cookies tomorrow.", "Amanda baked cookies and will bring Jerry some tomorrow.", None, 0.5333333285333334),
    ("classification_score", "Person name", "Person name", ["Person", "Person name", "Place"], 1.0),
    ("classification_score", "Person name or Place", "Person name", ["Person", "Person name", "Place"], 0.5),
    ("classification_score", "Place", "Person name", ["Person", "Person name", "Place"], 0.0),
    ("classification_score", "ABC", "ABC", ["A", "AB", "ABC", "X"], 0.5),
    ("classification_score", "Animal", "Animal", TREC, 1.0),
    ("classification_score", "animal", "Animal", TREC, 0.0),
    ("classification_score", "Food or Animal or Color", "Animal", TREC, 0.3333333333333333),
    ("classification_score", "Other location, maybe City", "City", TREC, 0.5),
    ("classification_score", "Description of a person", "Description of a person", TREC, 1.0),
    ("classification_score", "Count", "Other number", TREC, 0.0),
    ("classification_score", "Country", "Count", TREC, 0.5),
    ("retrieval_score", "Paragraph 3", "Paragraph 3", None, 1.0),
    ("retrieval_score", "Paragraph 3 or Paragraph 12", "Paragraph 3", None, 0.5),
    ("retrieval_score", "Paragraph 30", "Paragraph 3", None, 0.0),
    ("retrieval_score", "no idea", "Paragraph 3", None, 0.0),
    ("retrieval_score", "paragraph 03", "Paragraph 3", None, 0.0),
    ("retrieval_score", "The answer is Paragraph 7, since paragraph 7 of 30 mentions it.", "Paragraph 7", None, 0.6666666666666666),
    ("count_score", "7", "7", None, 1.0),
    ("count_score", "7 or 8", "7", None, 0.5),
    ("count_score", "seven", "7", None, 0.0),
    ("count_score", "There are 17 unique paragraphs", "7", None, 0.0),
    ("count_score", "1, 2, 3", "3", None, 0.3333333333333333),
    ("count_score", "12 paragraphs out of 30, so 12", "12", None, 0.6666666666666666),
    ("code_sim_score", "print(x)", "print(y)", None, 0.88),
    ("code_sim_score", "abcdefgh", "aXXXXXXX", None, 0.12),
    ("code_sim_score", "\n```python\n# comment\nx = 1\n```", "x = 1", None, 1.0),
    ("code_sim_score", "\n\n    return a + b\n}", "    return a + b", None, 1.0),
    ("code_sim_score", "// done\nint y = f(x);", "int y = f(x) + 1;", None, 0.87),
    ("code_sim_score", "# only comments\n# here", "x = 1", None, 0.0),
    ("code_sim_score", "", "x", None, 0.0),
    ("code_sim_score", "", "", None, 1.0),
    ("code_sim_score", "self.assertEqual(result, expected)", "self.assertEqual(expected, result)", None, 0.76),
    ("code_sim_score", "x" * 150 + " = compute(" + "y" * 100 + ")", "x" * 150 + " = compute(" + "z" * 100 + ")", None, 0.62),
]

# (task, prediction, answers, all_classes, eval.py's scorer figure for that one sample): first-line cut, max over answers
TASK_FIGURES = [
    ("trec", "\nAnimal\nFood", ["Animal"], ["Animal", "Food"], 100.0),
    ("trec", "Food\nAnimal", ["Animal"], ["Animal", "Food"], 0.0),
    ("triviaqa", "Paris\nQuestion: next?", ["London", "Paris"], None, 100.0),
    ("triviaqa", "\n\nThe Paris of France\nAnswer: London", ["paris", "London"], None, 50.0),
    ("hotpotqa", "Paris\nFrance", ["Paris"], None, 66.67),
    ("samsum", "Amanda will bring cookies.\nDialogue: more text here", ["Amanda baked cookies and will bring Jerry some tomorrow."], None, 46.15),
    ("gov_report", "Costs grew.\nGAO recommends oversight.", ["GAO recommends oversight. Costs grew."], None, 100.0),
    ("lsht", "体育\n财经", ["体育"], ["体育", "财经"], 100.0),
    ("passage_retrieval_en", "Paragraph 4", ["Paragraph 4", "Paragraph 5"], None, 100.0),
    ("lcc", "# next\nreturn x", ["return x", "return y"], None, 100.0),
    ("qasper", "", ["unanswerable"], None, 0.0),
]


@pytest.mark.parametrize(("metric", "prediction", "ground_truth", "classes", "expected"), METRIC_FIGURES)
def test_metric_equals_longbench(metric, prediction, ground_truth, classes, expected):
    assert getattr(m, metric)(prediction, ground_truth, all_classes=classes) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("task", "prediction", "answers", "classes", "expected"), TASK_FIGURES)
def test_sample_and_task_score_equal_eval_py(task, prediction, answers, classes, expected):
    assert m.task_score([m.sample_score(task, prediction, answers, classes)]) == expected


def test_rouge_l_is_longbench_rouge_not_rouge_score():
    # (prediction, reference, LongBench's figure, rouge-score 0.1.2's rougeL F on the same pair). rouge-score
    # lower-cases, strips punctuation and counts repeated words; LongBench's `rouge` does none of that.
    pairs = [
        ("The Cat sat", "the cat sat", 0.3333333283333334, 1.0),
        ("Hello, world! How are you?", "hello world how are you", 0.19999999500000015, 1.0),
        ("a a a b", "a b b b", 0.999999995, 0.5),
        ("The cat sat. The dog ran.", "The dog ran. A cat sat down.", 0.8333333284722222, 0.4615384615384615),
        ("the cat sat on the mat", "the cat is on the mat", 0.7999999950000002, 0.8333333333333334),
    ]
    for prediction, reference, longbench, rouge_score_value in pairs:
        value = m.rouge_score(prediction, reference)
        assert value == pytest.approx(longbench, rel=1e-12)
        assert abs(value - rouge_score_value) > 0.03


def _words(n):
    return " ".join(f"w{k}" for k in range(n))


def test_rouge_recursion_failure_where_eval_py_fails():
    # LongBench's eval.py (CPython 3.11-3.13) scores a one-sentence hypothesis of 988 words against
    # "w0 beta gamma" (figure 0.2 after x100 and rounding) and 0.0 for 989 words: the rouge package's
    # recursive LCS overflows and LongBench's bare except returns 0. The caller's own stack must not matter.
    def deep(k, n):
        return m.rouge_score(_words(n), "w0 beta gamma") if k == 0 else deep(k - 1, n)

    for depth in (0, 400):
        scored = deep(depth, 988)
        assert scored == pytest.approx(0.0020181634108795525, rel=1e-12)
        assert m.bucket_score([scored]) == 0.2
        assert deep(depth, 989) == 0.0


def test_eval_py_arithmetic_task_vs_bucket():
    # eval.py's scorer gives 65.63 for these 8 passage_count samples, its scorer_e 65.62 (numpy mean, same bucket).
    preds = ["7 7 7 7 7 8", "7", "There are 7", "7 8 9", "7, 8 or 9", "7 7 7 8 9", "7 7 8 9 10", "7 7 7 8"]
    scores = [m.sample_score("passage_count", p, ["7"]) for p in preds]
    assert m.task_score(scores) == 65.63
    assert m.bucket_score(scores) == 65.62


TREC_SMALL = ["Animal", "Food", "Color", "City"]
# (task, prediction, answers, length, all_classes): a small LongBench-E predictions table
TABLE = [
    ("passage_count", "7 7 7 7 7 8", ["7"], 1200, None),
    ("passage_count", "7", ["7"], 1500, None),
    ("passage_count", "There are 7", ["7"], 2500, None),
    ("passage_count", "7 8 9", ["7"], 3100, None),
    ("passage_count", "7, 8 or 9", ["7"], 3999, None),
    ("passage_count", "7 7 7 8 9", ["7"], 100, None),
    ("passage_count", "7 7 8 9 10", ["7"], 2000, None),
    ("passage_count", "7 7 7 8", ["7"], 3000, None),
    ("passage_count", "I count 12", ["12"], 4000, None),
    ("passage_count", "13", ["12"], 9000, None),
    ("hotpotqa", "Paris", ["Paris"], 1000, None),
    ("hotpotqa", "Paris, France is the city", ["London", "Paris"], 5000, None),
    ("hotpotqa", "London\nParis", ["Paris"], 7999, None),
    ("hotpotqa", "Berlin", ["Paris"], 8000, None),
    ("trec", "Animal\nFood", ["Animal"], 2000, TREC_SMALL),
    ("trec", "\nFood or Color", ["Color"], 6000, TREC_SMALL),
    ("trec", "City", ["Animal"], 12000, TREC_SMALL),
    ("samsum", "Amanda will bring cookies.\nDialogue: Tom: hi", ["Amanda baked cookies and will bring Jerry some tomorrow."], 3000, None),
    ("samsum", "", ["Tom and Anna meet at 5 pm."], 4500, None),
    ("samsum", "Tom meets Anna at 5 pm. They go to the cinema.", ["Tom and Anna meet at 5 pm. They will watch a film."], 9500, None),
    ("gov_report", "GAO reviewed federal highway spending. Costs grew by 3.5 percent each year.",
     ["The report examines federal spending on highways. It finds that costs grew 3.5 percent a year."], 8500, None),
    ("gov_report", "The agency should improve oversight of state programs, GAO recommends.",
     ["GAO recommends that the agency improve its oversight of state programs."], 15000, None),
    ("lcc", "    return a + b\n", ["    return a + b"], 2000, None),
    ("lcc", "```\n# add\nresult = add(a, b)", ["result = add(b, a)"], 4100, None),
    ("passage_retrieval_en", "Paragraph 3", ["Paragraph 3"], 5000, None),
    ("passage_retrieval_en", "Paragraph 30 or Paragraph 3", ["Paragraph 3"], 10000, None),
]
# eval.py's result.json for TABLE: `python eval.py` (per task) and `python eval.py --e` (per bucket; NaN buckets omitted)
EVAL_PY = {
    "gov_report": 47.14, "trec": 50.0, "hotpotqa": 51.67, "lcc": 94.5, "samsum": 32.78, "passage_count": 62.5,
    "passage_retrieval_en": 75.0,
}
EVAL_PY_E = {
    "gov_report": {"8k+": 47.14},
    "trec": {"0-4k": 100.0, "4-8k": 50.0, "8k+": 0.0},
    "hotpotqa": {"0-4k": 100.0, "4-8k": 53.33, "8k+": 0.0},
    "lcc": {"0-4k": 100.0, "4-8k": 89.0},
    "samsum": {"0-4k": 46.15, "4-8k": 0.0, "8k+": 52.17},
    "passage_count": {"0-4k": 65.62, "4-8k": 100.0, "8k+": 0.0},
    "passage_retrieval_en": {"4-8k": 100.0, "8k+": 50.0},
}
# kvbench's labels say the unit the buckets are counted in (words of context); eval.py's omit it
EVAL_PY_E = {task: {f"{bucket} words": v for bucket, v in buckets.items()} for task, buckets in EVAL_PY_E.items()}


def _table():
    columns = ("task", "prediction", "answers", "length", "all_classes")
    return pd.DataFrame([dict(zip(columns, row)) for row in TABLE])


def test_compute_equals_eval_py():
    result = m.compute(_table())
    assert result["per_task"] == EVAL_PY
    assert result["per_task_bucket"] == EVAL_PY_E
    assert result["score"] == pytest.approx(sum(EVAL_PY.values()) / len(EVAL_PY))
    for bucket in m.BUCKETS:
        figures = [buckets[bucket] for buckets in EVAL_PY_E.values() if bucket in buckets]
        assert result["per_bucket"][bucket] == pytest.approx(sum(figures) / len(figures))
    assert result["num_samples"] == len(TABLE)
    json.dumps(result)
    assert all(isinstance(v, float) and not math.isnan(v) for v in result["per_task"].values())


def test_compute_reads_missing_predictions_as_empty():
    # an empty prediction comes back from predictions.csv as NaN; it must score as "" does, not as the text "nan"
    df = pd.DataFrame([{"task": "qasper", "prediction": float("nan"), "answers": ["nan"], "length": 10, "all_classes": None}])
    assert m.compute(df)["per_task"] == {"qasper": 0.0}
    assert m.sample_score("qasper", None, ["nan"]) == 0.0
    assert m.sample_score("qasper", "NaN", ["nan"]) == 1.0


def test_length_buckets_as_eval_py():
    assert [m.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 50000)] == ["0-4k words", "0-4k words", "4-8k words", "4-8k words", "8k+ words", "8k+ words"]


def test_bad_metric_inputs():
    with pytest.raises(KVBenchError, match="known tasks"):
        m.sample_score("no_such_task", "x", ["y"])
    with pytest.raises(KVBenchError, match="jieba"):
        m.sample_score("vcsum", "x", ["y"])
    with pytest.raises(KVBenchError, match="all_classes"):
        m.classification_score("x", "y")
    with pytest.raises(KVBenchError, match="Paragraph 7"):
        m.retrieval_score("Paragraph 1", "the first one")
    with pytest.raises(KVBenchError, match="missing|lack"):
        m.compute(pd.DataFrame([{"task": "qasper", "prediction": "x"}]))
    with pytest.raises(KVBenchError, match="no LongBench predictions"):
        m.compute(pd.DataFrame(columns=["task", "prediction", "answers"]))


class _NewlineTokenizer:
    """Just what decoding reads of a tokenizer: no EOS, "\\n" encoding to ``newline`` last, text with leading blanks."""

    eos_token_id = None

    def __init__(self, newline: int):
        self.newline = newline

    def encode(self, text, add_special_tokens=False):
        assert text == "\n" and not add_special_tokens
        return [7, self.newline]  # a Llama-2-like encoding: a prefix-space piece, then the newline

    def decode(self, ids, skip_special_tokens=True):
        return "\n  " + " ".join(map(str, ids))


@pytest.mark.parametrize("newline_at", ["first", "later"])
def test_samsum_answers_end_where_longbench_pred_py_ends_them(newline_at):
    """samsum decodes as pred.py's ``generate(eos_token_id=[eos, newline], min_length=context_length + 1)``: a newline
    as the first token is passed over for the next best, a later one ends the answer; the answer is the decoded text
    as generated (leading newline and blanks kept, as pred.py writes it). Next to a question without a stop, in one
    batch, each answers as alone."""
    import torch

    import kvbench
    from kvbench.generation import Prompt, answer_prompts
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(5))
    context, question = ids[:, :52], ids[:, 52:]
    free = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 60:].tolist()
    later = next(t for i, t in enumerate(free) if i > 0 and t not in free[:i])
    newline = free[0] if newline_at == "first" else later
    expected = model.generate(ids, max_new_tokens=24, do_sample=False, min_length=61, eos_token_id=[newline],
                              pad_token_id=0)[0, 60:].tolist()
    tokenizer = _NewlineTokenizer(newline)
    press = kvbench.build_press("no_press")
    answer = answer_prompts(model, tokenizer, [Prompt(context, [question])], [press], [[24]], stop_texts=[["\n"]])[0][0].answers[0]
    assert answer.token_ids == expected
    if newline_at == "first":
        assert expected[0] != newline  # the ban was needed: unbanned, the newline would have come first
    else:
        assert expected[-1] == newline and len(expected) < 24  # the stop was needed
    assert answer.text == "\n  " + " ".join(map(str, expected))

    other = Prompt(ids[:, :40], [ids[:, 40:44]])
    batched = answer_prompts(model, tokenizer, [Prompt(context, [question]), other], [press], [[24], [24]],
                             stop_texts=[["\n"], [None]])[0]
    alone = answer_prompts(model, tokenizer, [other], [press], [[24]])[0][0]
    assert [run.answers[0].token_ids for run in batched] == [expected, alone.answers[0].token_ids]


def test_only_samsum_rows_carry_a_stop_text(longbench_dir):
    _write_jsonl(longbench_dir / "samsum_e.jsonl", [_record("samsum", 0, 3000, question="Dialogue: hi\nSummary:")])
    df = lb.load({"tasks": ["samsum", "hotpotqa"], "path": str(longbench_dir)}, None)
    stops = df.set_index("task")["stop_text"]
    assert stops["samsum"] == "\n" and stops["hotpotqa"].isna().all()


@pytest.mark.parametrize("num_samples", [2.5, "abc", 0, True])
def test_a_sample_count_that_is_not_a_count_is_refused_before_loading(num_samples):
    """int(2.5) would silently take 2 samples and int("abc") raise a traceback; both are one clear error."""
    with pytest.raises(KVBenchError, match=r"dataset.num_samples must be a positive integer or null, got "):
        lb.check({"tasks": ["hotpotqa"], "num_samples": num_samples})
    lb.check({"tasks": ["hotpotqa"], "num_samples": None})
    with pytest.raises(KVBenchError, match="unknown LongBench-E task"):
        lb.check({"tasks": ["nope"]})


def test_records_of_another_schema_are_refused_not_scored_as_empty(longbench_dir):
    """A file with question/passage/answer keys used to load as empty questions with no answers and score 0."""
    _write_jsonl(longbench_dir / "hotpotqa_e.jsonl", [{"question": "Who?", "passage": "text", "answer": "x", "_id": "a"}])
    with pytest.raises(KVBenchError, match=r"record 0 has no context, input, answers; its records need the keys"):
        lb.load({"tasks": ["hotpotqa"], "path": str(longbench_dir)}, None)
    record = _record("lcc", 0, 300)
    record["input"] = ""  # lcc has no question: an empty input is LongBench's own
    _write_jsonl(longbench_dir / "lcc_e.jsonl", [record])
    assert len(lb.load({"tasks": ["lcc"], "path": str(longbench_dir)}, None)) == 1


QWEN3_STYLE_TEMPLATE = (  # the part of Qwen3's template that decides thinking
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_a_thinking_template_is_told_not_to_think(tokenizer):
    """Qwen3 thinks unless the template gets enable_thinking=False, as kvpress' pipeline passes it; a thinking turn
    would spend the answer's few tokens inside <think>."""
    import copy

    from kvbench.generation import build_prompt

    qwen_like = copy.deepcopy(tokenizer)
    qwen_like.chat_template = QWEN3_STYLE_TEMPLATE
    prompt = build_prompt(qwen_like, "Some context.", ["Which?"], "Answer:", use_chat_template=True)
    turn = qwen_like.decode(prompt.question_ids[0][0].tolist())
    assert turn.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nAnswer:"), turn


def test_every_task_is_scored_by_longbenchs_own_metric():
    """LongBench's eval.py ``dataset2metric`` (the jieba-segmented Chinese metrics aside, which kvbench refuses)."""
    from kvbench.metrics.longbench import TASK_METRICS

    reference = {
        "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score", "hotpotqa": "qa_f1_score",
        "2wikimqa": "qa_f1_score", "musique": "qa_f1_score", "gov_report": "rouge_score", "qmsum": "rouge_score",
        "multi_news": "rouge_score", "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
        "lsht": "classification_score", "passage_retrieval_en": "retrieval_score", "passage_count": "count_score",
        "passage_retrieval_zh": "retrieval_zh_score", "lcc": "code_sim_score", "repobench-p": "code_sim_score",
    }
    assert {task: metric.__name__ for task, metric in TASK_METRICS.items()} == reference
