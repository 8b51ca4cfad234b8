import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kvbench.datasets import austen, pg19
from kvbench.errors import KVBenchError
from kvbench.metrics import perplexity


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KVBENCH_CACHE", str(root))
    monkeypatch.delenv(austen.ENV_DEB, raising=False)
    return root


def test_local_source(tmp_path):
    (tmp_path / "b_second.txt").write_text("Second book. " * 50, encoding="utf-8")
    (tmp_path / "a_first.txt").write_text("First book. " * 50, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a book", encoding="utf-8")
    df = pg19.books({"source": "local", "path": str(tmp_path)})
    assert list(df.columns) == ["id", "text"]
    assert list(df["id"]) == ["a_first", "b_second"]
    assert df.iloc[0].text.startswith("First book.")
    assert list(pg19.books({"source": "local", "path": str(tmp_path), "num_books": 1})["id"]) == ["a_first"]


def test_local_source_errors(tmp_path):
    with pytest.raises(KVBenchError, match="dataset.path"):
        pg19.books({"source": "local"})
    with pytest.raises(KVBenchError, match="no .txt files"):
        pg19.books({"source": "local", "path": str(tmp_path)})
    with pytest.raises(KVBenchError, match="unknown dataset.source"):
        pg19.books({"source": "gutenberg"})


def test_a_script_dataset_on_the_hub_names_the_parquet_copy(monkeypatch):
    """deepmind/pg19 is a loading script; datasets >= 4 raises on it, and the error says which id to use instead."""
    import datasets

    def script_dataset(name, split, streaming, revision):
        raise RuntimeError("Dataset scripts are no longer supported, but found pg19.py")

    monkeypatch.setattr(datasets, "load_dataset", script_dataset)
    with pytest.raises(KVBenchError, match=r"'deepmind/pg19' is a loading script, .* use dataset.hub_id=emozilla/pg19-test"):
        pg19.books({"source": "hub", "hub_id": "deepmind/pg19", "revision": "f" * 40})


@pytest.mark.parametrize("hub_id", [None, "someone/pg19-copy"])
def test_hub_source_with_stand_in(monkeypatch, hub_id):
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming, revision):
        calls.append((name, split, streaming, revision))
        titles = ["The Old Man", "The Old Man", "Sea Stories", "Unread"]
        return ({"short_book_title": t, "publication_date": 1900, "url": "u", "text": f"Text of {t} {i}."} for i, t in enumerate(titles))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = {"source": "hub", "num_books": 3, "revision": "f" * 40}
    if hub_id:
        cfg["hub_id"] = hub_id
    df = pg19.books(cfg)
    assert calls == [(hub_id or "emozilla/pg19-test", "test", True, "f" * 40)]  # the commit the identity records
    assert list(df["id"]) == ["the_old_man", "the_old_man_2", "sea_stories"]
    assert df.iloc[2].text == "Text of Sea Stories 2."


def test_a_title_that_looks_like_a_numbered_repeat_keeps_every_book_apart(monkeypatch):
    """Emma, Emma, Emma 2: the second Emma became emma_2, the id the third book already has."""
    import datasets

    titles = ["Emma", "Emma", "Emma 2", "Emma"]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming, revision: (
        {"short_book_title": t, "text": f"Text {i}."} for i, t in enumerate(titles)))
    df = pg19.books({"source": "hub", "revision": "f" * 40})
    assert list(df["id"]) == ["emma", "emma_2", "emma_2_2", "emma_3"]
    assert list(df["text"]) == [f"Text {i}." for i in range(4)]


def test_hub_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVBenchError, match="dataset.source=austen"):
        pg19.books({"source": "hub"})


def test_austen_source_reads_cache(cache):
    folder = cache / "data" / "austen"
    folder.mkdir(parents=True)
    for book in austen.BOOK_IDS:
        (folder / f"{book}.txt").write_text(f"{book} text", encoding="utf-8")
    df = pg19.books({"source": "austen", "num_books": 2})
    assert list(df["id"]) == ["sense_and_sensibility", "pride_and_prejudice"]
    assert austen.ensure_austen() == folder


def test_austen_error_without_apt(cache, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(austen.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    with pytest.raises(KVBenchError, match="apt-get download r-cran-janeaustenr"):
        austen.ensure_austen()
    monkeypatch.setenv(austen.ENV_DEB, str(cache / "missing.deb"))
    with pytest.raises(KVBenchError, match="KVBENCH_AUSTEN_DEB"):
        austen.ensure_austen()


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not available on this machine")


@needs_apt
def test_ensure_austen_fetches_six_novels(cache):
    folder = austen.ensure_austen()
    assert folder == cache / "data" / "austen"
    texts = {path.stem: path.read_text(encoding="utf-8") for path in folder.glob("*.txt")}
    assert set(texts) == set(austen.BOOK_IDS)
    assert all(len(text) > 100_000 for text in texts.values())
    assert texts["emma"].startswith("EMMA")
    assert "It is a truth universally acknowledged" in texts["pride_and_prejudice"]
    df = pg19.books({})
    assert len(df) == 6


@needs_apt
def test_deb_env_var_and_pure_python_reader(cache, tmp_path, monkeypatch):
    deb = austen._download_deb(tmp_path)
    monkeypatch.setenv(austen.ENV_DEB, str(deb))
    folder = austen.ensure_austen()
    without_dpkg = austen.books_from_deb(deb, use_dpkg=False)
    assert without_dpkg == {book: (folder / f"{book}.txt").read_text(encoding="utf-8") for book in austen.BOOK_IDS}


def test_hydra_config_file(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "pg19.yaml")
    assert (cfg.name, cfg.source, cfg.hub_id) == ("pg19", "austen", "emozilla/pg19-test")
    assert pg19.KIND == "perplexity" and "kind" not in cfg  # the module declares its kind, the yaml does not repeat it
    assert (cfg.context_length, cfg.eval_length, cfg.max_windows_per_book) == (1024, 128, 22)
    (tmp_path / "book.txt").write_text("Words. " * 10, encoding="utf-8")
    cfg.source, cfg.path = "local", str(tmp_path)
    assert list(pg19.books(cfg)["id"]) == ["book"]


# ---- windows ------------------------------------------------------------------------------------------


class WordTokenizer:
    """One token per whitespace-separated word, so window positions can be checked by eye."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [int(word[1:]) for word in text.split()]}


def _numbered_book(folder: Path, name: str, words: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.txt").write_text(" ".join(f"w{i}" for i in range(words)), encoding="utf-8")


@pytest.mark.parametrize("length,window,count", [(10_000, 100, 8), (10_000, 1152, 8), (1_000, 100, 10), (999, 100, 3), (168_000, 1152, 22)])
def test_window_starts_spread_over_the_whole_book(length, window, count):
    starts = pg19.window_starts(length, window, count)
    assert len(starts) == count and starts == sorted(starts)
    assert all(b - a >= window for a, b in zip(starts, starts[1:]))  # no overlap
    assert starts[0] >= 0 and starts[-1] + window <= length
    segment = length / count
    # one window in each of `count` equal segments: the scored text samples the beginning, middle and end
    assert all(i * segment <= start and start + window <= (i + 1) * segment for i, start in enumerate(starts))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert pg19.window_starts(length, window, count) == starts  # deterministic


def test_window_starts_when_the_book_is_short():
    assert pg19.window_starts(350, 100, 8) == [pg19.window_starts(350, 100, 3)[i] for i in range(3)]
    assert len(pg19.window_starts(350, 100, None)) == 3
    assert pg19.window_starts(99, 100, 4) == []


def test_load_cuts_windows_from_every_part_of_every_book(tmp_path):
    books = tmp_path / "books"
    _numbered_book(books, "long", 20_000)
    _numbered_book(books, "short", 700)
    _numbered_book(books, "tiny", 50)
    cfg = {"source": "local", "path": str(books), "context_length": 96, "eval_length": 32, "max_windows_per_book": 10}
    df = pg19.load(cfg, WordTokenizer())
    assert df["sample_id"].is_unique
    assert df.groupby("id").size().to_dict() == {"long": 10, "short": 5}  # 700 // 128 = 5 fit; tiny holds none
    for row in df.itertuples():
        assert row.input_ids == list(range(row.start, row.start + 128))  # the book's own tokens, in order
        assert row.context_tokens == 96
    long = df[df["id"] == "long"]
    assert long["start"].min() < 2_000 and long["start"].max() + 128 > 18_000  # first and last tenth of the book
    assert long["book_tokens"].iloc[0] == 20_000


@pytest.mark.parametrize("key,value", [("eval_length", 0), ("context_length", -5), ("max_windows_per_book", 0), ("eval_length", "x")])
def test_bad_window_settings_are_refused(tmp_path, key, value):
    _numbered_book(tmp_path, "book", 1_000)
    with pytest.raises(KVBenchError, match=f"dataset.{key} must be a positive integer"):
        pg19.load({"source": "local", "path": str(tmp_path), key: value}, WordTokenizer())
    with pytest.raises(KVBenchError, match="no book is longer than"):
        pg19.load({"source": "local", "path": str(tmp_path), "context_length": 2_000}, WordTokenizer())


def test_the_length_under_test_is_the_whole_window():
    from kvbench.runner import lengths_under_test

    assert lengths_under_test(pg19, {"context_length": 1024, "eval_length": 128}) == [("dataset.context_length + dataset.eval_length", 1152)]


@pytest.mark.skipif(not (austen.austen_dir() / "emma.txt").exists(), reason="the Austen novels are not extracted (make data)")
def test_default_run_scores_at_least_16k_tokens_spread_over_each_novel():
    from omegaconf import OmegaConf

    from kvbench.models import load_tokenizer

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "pg19.yaml")
    df = pg19.load(cfg, load_tokenizer("smollm2-135m"))
    assert len(df) * cfg.eval_length == 16_896  # the README's figure: 6 novels x 22 windows x 128 tokens (16k at least)
    for _, book in df.groupby("id"):
        position = (book["start"] + cfg.context_length) / book["book_tokens"]  # where the scored tokens sit
        assert position.min() < 0.1 and position.max() > 0.9


@pytest.mark.parametrize("eval_length", [1, 5])
def test_continuation_nll_equals_the_plain_forward(eval_length):
    """eval_length=1 has no teacher-forced step (the prefill output predicts the only token); with no
    press the summed NLL is exactly what one uncompressed forward over the whole window gives."""
    import torch

    from kvbench.generation import continuation_nll
    from kvbench.presses import build_press
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    split = 40 - eval_length
    nll, n, _ = continuation_nll(model, ids[:, :split], ids[:, split:], build_press("no_press"))
    with torch.no_grad():
        logits = model(ids).logits[0, split - 1 : -1].float()
    expected = torch.nn.functional.cross_entropy(logits, ids[0, split:], reduction="sum")
    assert n == eval_length
    assert nll == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_timing_decodes_over_the_compressed_context_and_changes_no_score(batch, monkeypatch):
    """decode_tokens times real decoding: the tokens it decodes are what a fresh greedy decode from the continuation's
    first token over the same compressed context gives (so the teacher-forced tokens were cut away first), and every
    NLL is the one without it."""
    import torch

    from kvbench import generation
    from kvbench.presses import build_press
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    ids = [torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (72, 64)[:batch]]
    contexts, continuations = [i[:, :-8] for i in ids], [i[:, -8:] for i in ids]
    presses = [build_press(name, compression_ratio=0.5) for name in ("no_press", "snapkv", "adakv_snapkv")]
    decoded = []
    original = generation.greedy_decode_batch

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        decoded.append(result[0])
        return result

    monkeypatch.setattr(generation, "greedy_decode_batch", recording)
    timed = generation.continuations_nll(model, contexts, continuations, presses, decode_tokens=5)
    plain = generation.continuations_nll(model, contexts, continuations, presses)
    assert len(decoded) == len(presses)
    for press, tokens, with_timing, without in zip(presses, decoded, timed, plain):
        assert [nll for nll, *_ in with_timing] == pytest.approx([nll for nll, *_ in without], rel=1e-6)
        assert all(run.extra["decode_seconds_per_token"] > 0 for *_, run in with_timing)
        assert all("decode_seconds_per_token" not in run.extra for *_, run in without)
        for context, continuation, got in zip(contexts, continuations, tokens):
            cache, *_ = generation.prefill(model, context, press)
            expected, _, _ = original(model, cache, [continuation[:, :1]], [5], set())
            assert got == expected[0] and len(got) == 5


# ---- metric, by hand ---------------------------------------------------------------------------------


def _windows():
    return pd.DataFrame(
        [
            {"id": "a", "window": 0, "nll_sum": 10.0, "num_tokens": 5},  # ppl e^2
            {"id": "a", "window": 1, "nll_sum": 3.0, "num_tokens": 3},  # ppl e^1
            {"id": "b", "window": 0, "nll_sum": 0.0, "num_tokens": 2},  # ppl 1
        ]
    )


def test_perplexity_metric():
    result = perplexity.compute(_windows())
    assert result["score"] == pytest.approx(math.exp(13 / 10))
    assert result["perplexity"] == result["score"]
    assert result["mean_window_perplexity"] == pytest.approx((math.exp(2) + math.exp(1) + 1) / 3)
    assert result["per_book"] == pytest.approx({"a": math.exp(13 / 8), "b": 1.0})
    assert result["num_windows"] == 3


def test_compare_to_baseline():
    assert perplexity.compare_to_baseline({"perplexity": 12.0}, {"perplexity": 10.0}) == pytest.approx(
        {"no_press_perplexity": 10.0, "delta": 2.0, "ratio": 1.2}
    )
    assert perplexity.compare_to_baseline({"score": 5.0}, {"score": 5.0})["ratio"] == 1.0


def test_perplexity_metric_errors():
    with pytest.raises(KVBenchError, match="nll_sum"):
        perplexity.compute(pd.DataFrame({"id": ["a"], "window": [0], "num_tokens": [1]}))
    with pytest.raises(KVBenchError):
        perplexity.compute(_windows().iloc[0:0])
    # a window with no evaluation tokens is left out of every figure; only such windows: no perplexity, one line
    empty = pd.DataFrame([{"id": "c", "window": 0, "nll_sum": 0.0, "num_tokens": 0}])
    assert perplexity.compute(pd.concat([_windows(), empty])) == perplexity.compute(_windows())
    with pytest.raises(KVBenchError, match="no perplexity windows with evaluation tokens"):
        perplexity.compute(empty)
