"""No silent truncation: the default limit is the model's length, over-long lengths under test are refused
before anything loads or is written, and wherever a context is cut the run says so and counts it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench import runner
from kvbench.datasets import dataset_module
from kvbench.errors import KVBenchError
from kvbench.generation import build_prompt, truncate_middle

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_MAX = 8192  # max_position_embeddings of SmolLM2-135M-Instruct
CONTEXT = " ".join(f"Fact {i:04d} is true." for i in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- the cut itself -------------------------------------------------------------------------------------


def test_truncate_middle_keeps_both_ends():
    import torch

    ids = torch.arange(10)[None]
    kept, cut = truncate_middle(ids, 6)
    assert kept.tolist() == [[0, 1, 2, 7, 8, 9]] and cut == 4
    kept, cut = truncate_middle(ids, 6, head=1)
    assert kept.tolist() == [[0, 5, 6, 7, 8, 9]] and cut == 4
    assert truncate_middle(ids, 10)[1] == 0 and truncate_middle(ids, None)[1] == 0


def test_the_whole_prompt_and_the_answer_fit_and_only_the_middle_of_the_context_goes(tokenizer):
    questions = ["Which fact is first?", "Which fact is the very last one in the whole list above?"]
    budgets = [20, 40]
    full = build_prompt(tokenizer, CONTEXT, questions, "Answer:")
    cut = build_prompt(tokenizer, CONTEXT, questions, "Answer:", max_length=300, max_new_tokens=budgets)
    longest = max(q.shape[-1] + b for q, b in zip(cut.question_ids, budgets))
    assert cut.context_ids.shape[-1] + longest == 300  # every question's sequence fits, the longest exactly
    assert cut.truncated_tokens == full.context_ids.shape[-1] - cut.context_ids.shape[-1] > 0
    assert [q.tolist() for q in cut.question_ids] == [q.tolist() for q in full.question_ids]  # questions untouched
    text = tokenizer.decode(cut.context_ids[0])
    assert "Fact 0000 is true." in text and "Fact 0399 is true." in text and "Fact 0200" not in text
    # The template's opening is kept whole and the context is cut where LongBench's pred.py cuts its prompt
    # (context + question + answer cue): the first half of that prompt is context, the last half holds the
    # question, so the context keeps as many more tokens before the cut as the (longest) question takes.
    n, kept = full.context_ids.shape[-1], cut.context_ids.shape[-1]
    head = next(i for i in range(kept) if cut.context_ids[0, i] != full.context_ids[0, i])
    assert cut.context_ids[0, head:].tolist() == full.context_ids[0, n - (kept - head) :].tolist()
    start = len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("x")[0],
                          add_special_tokens=False)["input_ids"])
    question = max(len(tokenizer(q + "Answer:", add_special_tokens=False)["input_ids"]) for q in questions)
    assert abs((head - start) - (kept - head) - question) <= 1


def test_the_cut_is_longbench_preds_on_a_raw_text_prompt(tokenizer):
    """No chat template: LongBench tokenizes context + question whole and keeps prompt[:half] + prompt[-half:]."""
    question = "Which fact is the very last one in the whole list above?\nAnswer:"
    cut = build_prompt(tokenizer, CONTEXT, [question], "", max_length=300, max_new_tokens=20, use_chat_template=False)
    ids = tokenizer(CONTEXT + question)["input_ids"]  # BOS (if any) included, as pred.py's tokenizer call
    budget = cut.context_ids.shape[-1] + cut.question_ids[0].shape[-1]  # what pred.py's max_length would be
    half = budget // 2
    reference = ids[:half] + ids[-(budget - half):]
    ours = cut.context_ids[0].tolist() + cut.question_ids[0][0].tolist()
    assert ours == reference


def test_a_prompt_that_fits_is_not_touched(tokenizer):
    full = build_prompt(tokenizer, CONTEXT, ["q?"], "Answer:")
    fits = build_prompt(tokenizer, CONTEXT, ["q?"], "Answer:", max_length=SMOLLM2_MAX, max_new_tokens=128)
    assert fits.truncated_tokens == 0 and fits.context_ids.tolist() == full.context_ids.tolist()


def test_query_aware_keeps_the_question_whole(tokenizer):
    question = "Which fact comes right after Fact 0010?"
    cut = build_prompt(tokenizer, CONTEXT, [question], "Answer:", query_aware=True, max_length=200, max_new_tokens=16)
    assert cut.truncated_tokens > 0
    assert cut.context_ids.shape[-1] + cut.question_ids[0].shape[-1] + 16 == 200
    assert tokenizer.decode(cut.context_ids[0]).endswith(question)


def test_no_room_for_the_context_is_one_clear_error(tokenizer):
    with pytest.raises(KVBenchError, match="max_context_length=40 leaves no room for the context"):
        build_prompt(tokenizer, CONTEXT, ["q?"], "Answer:", max_length=40, max_new_tokens=32)


# ---- refusing a length under test -----------------------------------------------------------------------


def test_the_default_limit_is_the_models_length():
    assert OmegaConf.load(ROOT / "conf" / "config.yaml").max_context_length is None
    cfg = OmegaConf.create({"max_context_length": None, "model": {"name_or_path": "smollm2-135m"}})
    assert runner.length_limit(cfg) == SMOLLM2_MAX  # read from the model's config, without its weights
    assert runner.length_limit(OmegaConf.merge(cfg, {"max_context_length": 2048})) == 2048
    for bad in (0, -1, "long", 1.5):
        with pytest.raises(KVBenchError, match="max_context_length must be a positive integer or null"):
            runner.length_limit(OmegaConf.merge(cfg, {"max_context_length": bad}))


def test_datasets_declare_their_length_under_test():
    assert runner.lengths_under_test(dataset_module("ruler"), {"context_length": 4096}) == [("dataset.context_length", 4096)]
    assert runner.lengths_under_test(dataset_module("needle"), {"context_lengths": [512, 9000, 1024], "max_new_tokens": 32}) == [
        ("dataset.context_lengths + dataset.max_new_tokens", 9032)]
    assert runner.lengths_under_test(dataset_module("longbench_e"), {"num_samples": 3}) == []  # LongBench cuts instead
    # 9000.0 builds a 9000-token haystack, so it is checked as 9000 (it used to skip the check and be cut silently)
    assert runner.lengths_under_test(dataset_module("needle"), {"context_lengths": [9000.0], "max_new_tokens": 32}) == [
        ("dataset.context_lengths + dataset.max_new_tokens", 9032)]
    assert runner.lengths_under_test(dataset_module("ruler"), {"context_length": 4096.0}) == [("dataset.context_length", 4096)]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset=ruler", "dataset.context_length=9000"], "dataset.context_length=9000 is above max_context_length=8192 (the model's max_position_embeddings)"),
        (["dataset=ruler", "dataset.context_length=4096", "max_context_length=2048"], "dataset.context_length=4096 is above max_context_length=2048; lower dataset.context_length or raise"),
        (["dataset=needle", "dataset.context_lengths=[1024,8192]"], "dataset.context_lengths + dataset.max_new_tokens=8224 is above max_context_length=8192"),
        (["dataset=pg19", "dataset.context_length=8192"], "dataset.context_length + dataset.eval_length=8320 is above max_context_length=8192"),
    ],
)
def test_an_over_long_length_is_refused_before_the_model_loads_and_writes_nothing(tmp_path, monkeypatch, overrides, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model or the data was loaded before the length was checked")

    monkeypatch.setattr(runner, "load_model", must_not_run)
    monkeypatch.setattr(runner, "load_dataset", must_not_run)
    out = tmp_path / "results"
    cfg = compose_run(*overrides, f"output_dir={out}", "press=snapkv")
    with pytest.raises(KVBenchError) as error:
        runner.execute(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()  # no result directory, no .partial, nothing


def test_lengths_that_fit_pass_the_check():
    runner.check_lengths(compose_run("dataset=ruler", "dataset.context_length=8192"))
    runner.check_lengths(compose_run("dataset=needle"))  # the default leaderboard grid fits SmolLM2
    runner.check_lengths(compose_run("dataset=pg19"))


# ---- counting what was cut ------------------------------------------------------------------------------


def test_sample_counts():
    predictions = pd.DataFrame({"task": ["a", "a", "a", "b", "b"], "truncated_tokens": [0, 12, 0, 300, 0]})
    assert runner.sample_counts(predictions) == {"num_samples": 5, "num_samples_per_task": 2, "truncated_samples": 2,
                                                 "max_truncated_tokens": 300}
    windows = pd.DataFrame({"id": ["x"] * 7})
    assert runner.sample_counts(windows) == {"num_samples": 7, "num_samples_per_task": 7, "truncated_samples": 0,
                                             "max_truncated_tokens": 0}


@pytest.mark.integration
def test_a_cut_context_is_counted_warned_once_and_shown_on_the_leaderboard(tmp_path, caplog):
    from kvbench.leaderboard import build_leaderboard

    data = tmp_path / "lb"
    data.mkdir()
    long = " ".join(f"Passage {i}: the harbour master logged ship number {i} at dawn." for i in range(60))
    records = [
        {"input": "Who logged the ships?", "context": long, "answers": ["the harbour master"], "length": 700, "_id": "long1"},
        {"input": "Who logged the boats?", "context": long + " The end.", "answers": ["the harbour master"], "length": 700, "_id": "long2"},
        {"input": "Who wrote it?", "context": "Alice wrote the note.", "answers": ["Alice"], "length": 5, "_id": "short"},
    ]
    (data / "hotpotqa_e.jsonl").write_text("".join(json.dumps({**r, "dataset": "hotpotqa_e", "language": "en", "all_classes": None}) + "\n" for r in records))
    out = tmp_path / "results"
    cfg = compose_run("dataset=longbench_e", f"dataset.path={data}", "dataset.tasks=[hotpotqa]", "press=no_press",
                      "max_context_length=256", f"output_dir={out}")
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        metrics = runner.execute(cfg)
    assert metrics["truncated_samples"] == 2 and metrics["max_truncated_tokens"] > 400
    assert metrics["max_context_length"] == 256 and metrics["num_samples_per_task"] == 3
    assert sum("max_context_length=256" in r.getMessage() for r in caplog.records) == 1  # warned once, not per sample
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    saved = pd.read_csv(run_dir / "predictions.csv")
    assert (saved["truncated_tokens"] > 0).sum() == 2
    board = build_leaderboard(out)
    row = board.table.iloc[0]
    assert row["truncated_samples"] == 2 and bool(row["smoke"])
    assert "†" in board.markdown.read_text() and "truncated" in board.markdown.read_text()
