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
    assert count.answer_prefix == "The final answer is:"
    assert count.question.endswith("such as 1, 2, 3, and so on.\n\n")


def test_num_samples_and_defaults(longbench_dir):
    df = lb.load({"tasks": ["hotpotqa"], "path": str(longbench_dir), "num_samples": 2}, None)
    assert list(df["sample_id"]) == ["hotpotqa/hotpotqa-id-0", "hotpotqa/hotpotqa-id-1"]
    assert set(lb.TASKS) == set(lb.MAX_NEW_TOKENS) and len(lb.TASKS) == 13


@pytest.mark.parametrize("task", lb.TASKS)
def test_template_split_reassembles_longbench_prompt(task):
    context_t, question_t, prefix = lb.split_template(task)
    assert context_t.endswith("{context}") and "{context}" not in question_t
    assert (context_t + question_t + prefix).rstrip() == lb.PROMPTS[task].rstrip()
    expected = {
        "qasper": "Answer:", "multifieldqa_en": "Answer:", "hotpotqa": "Answer:", "2wikimqa": "Answer:",
        "gov_report": "Summary:", "multi_news": "Summary:",
        "passage_count": "The final answer is:", "passage_retrieval_en": "The answer is:",
    }
    assert prefix == expected.get(task, "")


def test_bad_inputs(longbench_dir):
    with pytest.raises(KVBenchError, match="unknown LongBench-E task"):
        lb.load({"tasks": ["narrativeqa_zh"], "path": str(longbench_dir)}, None)
    with pytest.raises(KVBenchError, match="gov_report_e.jsonl"):
        lb.load({"tasks": ["gov_report"], "path": str(longbench_dir)}, None)


def test_hub_offline_points_to_path(monkeypatch):
    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(KVBenchError, match=r"dataset.path=<dir of LongBench jsonl>"):
        lb.load({"tasks": ["qasper"], "path": None}, None)


def test_hub_loader_used_with_e_config(monkeypatch):
    import datasets

    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [_record("samsum", i, 3000, question="Dialogue: hi\nSummary:") for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    df = lb.load({"tasks": ["samsum"], "num_samples": 1}, None)
    assert calls == [("THUDM/LongBench", "samsum_e", "test")]
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

    def fake_download(repo_id, filename, repo_type):
        requested.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(datasets, "load_dataset", refuse_script)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    df = lb.load({"tasks": ["qasper"]}, None)
    assert requested == [("THUDM/LongBench", "data.zip", "dataset")]
    assert list(df["sample_id"]) == ["qasper/qasper-id-0"] and df.iloc[0].length == 4500


def test_hydra_config_file(longbench_dir):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "longbench_e.yaml")
    assert cfg.name == "longbench_e" and cfg.kind == "generate" and cfg.tasks is None
    cfg.path = str(longbench_dir)
    cfg.tasks = ["hotpotqa", "lcc"]
    assert len(lb.load(cfg, None)) == 4


# ---- metrics, hand-computed -------------------------------------------------------------------------


def test_qa_f1():
    assert m.normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"
    assert m.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    # prediction tokens: paris france is city (4); overlap 1 -> P=1/4, R=1 -> F1=0.4
    assert m.qa_f1_score("Paris, France is the city", "Paris") == pytest.approx(0.4)
    assert m.qa_f1_score("a b", "c") == 0.0
    assert m.token_f1(["cat", "cat", "dog"], ["cat", "dog", "dog"]) == pytest.approx(2 / 3)


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 words on both sides
    assert m.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "the gunman" = 2: P=2/4, R=2/6 -> F=0.4
    assert m.rouge_score("police killed the gunman", "the gunman was killed by police") == pytest.approx(0.4)
    assert m.rouge_score("", "anything") == 0.0


def test_classification():
    classes = ["Person", "Person name", "Place"]
    assert m.classification_score("Person name", "Person name", all_classes=classes) == 1.0
    assert m.classification_score("Person name or Place", "Person name", all_classes=classes) == 0.5
    assert m.classification_score("Place", "Person name", all_classes=classes) == 0.0
    assert m.classification_score("no idea", "Place", all_classes=classes) == 0.0
    # LongBench removes sub-labels while iterating the same list, skipping "AB": 1/2, not 1.
    assert m.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC", "X"]) == 0.5
    with pytest.raises(KVBenchError):
        m.classification_score("x", "y")


def test_retrieval_and_count():
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert m.retrieval_score("Paragraph 30", "Paragraph 3") == 0.0
    assert m.retrieval_score("no idea", "Paragraph 3") == 0.0
    assert m.count_score("There are 7 unique paragraphs", "7") == 1.0
    assert m.count_score("7 or 8", "7") == 0.5
    assert m.count_score("seven", "7") == 0.0


def test_code_sim():
    # difflib: 3 matching chars of 8 total -> 2*3/8 = 75%
    assert m.fuzz_ratio("abcd", "abce") == 75
    # 7 matching of 16 -> 87.5 -> fuzzywuzzy rounds to the integer 88 (a raw Levenshtein ratio would give 87.5)
    assert m.code_sim_score("print(x)", "print(y)") == pytest.approx(0.88)
    assert m.first_code_line("\n```python\n# comment\nx = 1\n```") == "x = 1"
    assert m.code_sim_score("\n```python\n# add\nreturn a + b\n```", "return a + b") == 1.0
    assert m.code_sim_score("", "x") == 0.0
    assert m.fuzz_ratio("", "") == 100


def test_score_task_first_line_and_max():
    classes = ["Animal", "Food"]
    assert m.score_task("trec", "\nAnimal\nFood", ["Animal"], all_classes=classes) == 100.0
    assert m.score_task("triviaqa", "Paris\nQuestion: next?", ["London", "Paris"]) == 100.0
    # not a first-line task: the whole prediction counts
    assert m.score_task("hotpotqa", "Paris\nFrance", ["Paris"]) == pytest.approx(200 / 3)
    with pytest.raises(KVBenchError):
        m.score_task("vcsum", "x", ["y"])


def test_compute_buckets():
    df = pd.DataFrame(
        [
            {"task": "hotpotqa", "prediction": "Paris", "answers": ["Paris"], "length": 1000, "all_classes": None},
            {"task": "hotpotqa", "prediction": "Paris, France is the city", "answers": ["Paris"], "length": 5000, "all_classes": None},
            {"task": "hotpotqa", "prediction": "London", "answers": ["Paris"], "length": 9000, "all_classes": None},
            {"task": "passage_count", "prediction": "7 or 8", "answers": ["7"], "length": 2000, "all_classes": None},
            {"task": "passage_count", "prediction": "3", "answers": ["3"], "length": 9500, "all_classes": None},
        ]
    )
    result = m.compute(df)
    assert result["per_task"] == pytest.approx({"hotpotqa": 140 / 3, "passage_count": 75.0})
    assert result["score"] == pytest.approx((140 / 3 + 75) / 2)
    assert result["per_task_bucket"]["hotpotqa"] == pytest.approx({"0-4k": 100.0, "4-8k": 40.0, "8k+": 0.0})
    assert result["per_task_bucket"]["passage_count"] == pytest.approx({"0-4k": 50.0, "8k+": 100.0})
    assert result["per_bucket"] == pytest.approx({"0-4k": 75.0, "4-8k": 40.0, "8k+": 50.0})
    json.dumps(result)
    assert all(isinstance(v, float) and not math.isnan(v) for v in result["per_task"].values())
