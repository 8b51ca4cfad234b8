"""What kvbench refuses to load, in one line, rather than benchmark something else than was asked for (a random LM
head, a truncated cached conversion) or fail with a traceback after the model loaded (a tokenizer that cannot be
read, a device kvbench does not run on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from kvbench import atomic, models
from kvbench.errors import KVBenchError
from kvbench.models import ModelSpec, load_model, load_tokenizer, resolve_device, resolve_dtype

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def _saved(folder: Path, model, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def test_a_checkpoint_without_its_lm_head_is_refused(tmp_path, tokenizer):
    """A base ``LlamaModel`` loads into ``LlamaForCausalLM`` with a random head: two loads predicted different tokens."""
    torch.manual_seed(0)
    base = _saved(tmp_path / "base", LlamaModel(LlamaConfig(**CONFIG)), tokenizer)
    with pytest.raises(KVBenchError, match=r"lacks weights a causal language model needs \(lm_head.weight\)"):
        load_model(ModelSpec(name_or_path=str(base), device="cpu"))
    complete = _saved(tmp_path / "lm", LlamaForCausalLM(LlamaConfig(**CONFIG)), tokenizer)
    model, _ = load_model(ModelSpec(name_or_path=str(complete), device="cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_weights_that_contradict_their_config_are_one_line(tmp_path, tokenizer):
    folder = _saved(tmp_path / "m", LlamaForCausalLM(LlamaConfig(**CONFIG)), tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))  # the weights have 256 rows
    with pytest.raises(KVBenchError, match=f"could not load a model from {folder}: .*config.json matches its weights"):
        load_model(ModelSpec(name_or_path=str(folder), device="cpu"))


def test_a_missing_or_damaged_tokenizer_is_one_line(tmp_path, tokenizer):
    folder = _saved(tmp_path / "m", LlamaForCausalLM(LlamaConfig(**CONFIG)))
    with pytest.raises(KVBenchError, match=f"could not read a tokenizer from {folder}: .*save the model's tokenizer"):
        load_tokenizer(str(folder))
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": ')  # cut short
    with pytest.raises(KVBenchError, match=f"could not read a tokenizer from {folder}"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_kvbench_does_not_run_on_is_refused(device):
    with pytest.raises(KVBenchError, match=f"device={device} is not supported; kvbench runs on auto, cpu, cuda"):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_index_past_the_visible_ones_is_refused():
    with pytest.raises(KVBenchError, match="names a GPU this machine lacks"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("alias", ["float", "half", "double", "bf16", "fp32"])
def test_only_the_dtype_names_are_accepted(alias):
    """``float``/``half`` reached torch's aliases and named one computation two ways (float vs float32)."""
    with pytest.raises(KVBenchError, match=f"unknown dtype '{alias}'"):
        resolve_dtype(alias, torch.device("cpu"))
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16


def _fake_conversion(monkeypatch, tmp_path) -> list[str]:
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf: Path, staging: Path) -> None:
        calls.append(gguf.name)
        (staging / "model.safetensors").write_bytes(b"w" * 1000)
        (staging / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return calls


def test_a_truncated_cached_conversion_is_converted_again(tmp_path, monkeypatch):
    """Only the stamp was checked: a weights file cut short (a full disk, a power loss) failed every later load."""
    calls = _fake_conversion(monkeypatch, tmp_path)
    folder = models.packaged_model_dir("smollm2-135m")
    assert json.loads((folder / models.CONVERSION_STAMP).read_text())["files"]["model.safetensors"] == 1000
    assert models.packaged_model_dir("smollm2-135m") == folder and len(calls) == 1
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(300)
    assert models.packaged_model_dir("smollm2-135m") == folder and len(calls) == 2
    assert (folder / "model.safetensors").stat().st_size == 1000


def test_a_killed_build_leaves_nothing_behind_after_the_next_one(tmp_path):
    """A SIGKILL skips the cleanup: its staging directory (up to a whole converted model) stayed forever."""
    target = tmp_path / "thing"
    killed = atomic.staging_dir(target)
    (killed / "half").write_bytes(b"x" * 100)
    atomic.ensure_dir(target, lambda staging: (staging / "done").write_text("ok"), lambda p: (p / "done").exists())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]
