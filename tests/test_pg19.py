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
    df = pg19.load({"source": "local", "path": str(tmp_path)}, None)
    assert list(df.columns) == ["id", "text"]
    assert list(df["id"]) == ["a_first", "b_second"]
    assert df.iloc[0].text.startswith("First book.")
    assert list(pg19.load({"source": "local", "path": str(tmp_path), "num_books": 1}, None)["id"]) == ["a_first"]


def test_local_source_errors(tmp_path):
    with pytest.raises(KVBenchError, match="dataset.path"):
        pg19.load({"source": "local"}, None)
    with pytest.raises(KVBenchError, match="no .txt files"):
        pg19.load({"source": "local", "path": str(tmp_path)}, None)
    with pytest.raises(KVBenchError, match="unknown dataset.source"):
        pg19.load({"source": "gutenberg"}, None)


@pytest.mark.parametrize("hub_id", [None, "deepmind/pg19"])
def test_hub_source_with_stand_in(monkeypatch, hub_id):
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        titles = ["The Old Man", "The Old Man", "Sea Stories", "Unread"]
        return ({"short_book_title": t, "publication_date": 1900, "url": "u", "text": f"Text of {t} {i}."} for i, t in enumerate(titles))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = {"source": "hub", "num_books": 3}
    if hub_id:
        cfg["hub_id"] = hub_id
    df = pg19.load(cfg, None)
    assert calls == [(hub_id or "emozilla/pg19-test", "test", True)]
    assert list(df["id"]) == ["the_old_man", "the_old_man_2", "sea_stories"]
    assert df.iloc[2].text == "Text of Sea Stories 2."


def test_hub_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVBenchError, match="dataset.source=austen"):
        pg19.load({"source": "hub"}, None)


def test_austen_source_reads_cache(cache):
    folder = cache / "data" / "austen"
    folder.mkdir(parents=True)
    for book in austen.BOOK_IDS:
        (folder / f"{book}.txt").write_text(f"{book} text", encoding="utf-8")
    df = pg19.load({"source": "austen", "num_books": 2}, None)
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
    df = pg19.load({}, None)
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
    assert (cfg.name, cfg.kind, cfg.source, cfg.hub_id) == ("pg19", "perplexity", "austen", "emozilla/pg19-test")
    assert (cfg.context_length, cfg.eval_length, cfg.stride, cfg.max_windows_per_book) == (1024, 128, 4096, 2)
    (tmp_path / "book.txt").write_text("Words. " * 10, encoding="utf-8")
    cfg.source, cfg.path = "local", str(tmp_path)
    assert list(pg19.load(cfg, None)["id"]) == ["book"]


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
    assert result["higher_is_better"] is False
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
