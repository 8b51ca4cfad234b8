"""Per-run memory and timing on the device, and the CUDA paths (bf16, flash attention routed through sdpa for
head-adaptive layers, CUDA peak memory). The CUDA tests are marked ``gpu`` and skip without a CUDA device."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch

import kvbench
from kvbench import generation
from kvbench.compression.cache import CompressedLayer
from kvbench.device import peak_memory_bytes, reset_peak_memory
from kvbench.model_access import cache_argument
from kvbench.runner import summarize_speed
from tests.tiny_models import tiny_model

CUDA = torch.cuda.is_available()
CONTEXT = 200


def gpu(test):
    """Marked ``gpu`` (``-m gpu`` selects these) and skipped where no CUDA device is visible."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_cpu_peak_memory_is_unavailable_not_the_process_lifetime_peak():
    # ru_maxrss never goes down: a later job of a multirun would report an earlier job's peak as its own.
    assert peak_memory_bytes(torch.device("cpu")) is None
    model = tiny_model("llama")
    _, _, run = generation.continuation_nll(model, _ids(CONTEXT, 0), _ids(8, 1), kvbench.build_press("knorm", compression_ratio=0.5))
    assert run.peak_memory_bytes is None


def test_speed_summary_reports_an_unmeasured_peak_as_none():
    rows = pd.DataFrame({"prefill_seconds": [1.0, 3.0], "peak_memory_bytes": [None, None], "kv_kept_fraction": [0.5, 0.25]})
    speed = summarize_speed(rows)
    assert speed == {"prefill_seconds": 2.0, "kv_kept_fraction": 0.375, "peak_memory_bytes": None}
    assert summarize_speed(rows.assign(peak_memory_bytes=[10, 30]))["peak_memory_bytes"] == 30.0


@gpu
@pytest.mark.parametrize("name", ["snapkv", "adakv_snapkv", "critical_adakv_snapkv"])
def test_bf16_compression_on_cuda(name):
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    press = kvbench.build_press(name, compression_ratio=0.5)
    ids = _ids(CONTEXT, 2).cuda()
    cache, _, stats, _ = generation.prefill(model, ids, press)
    layers = cache.layers
    assert all(isinstance(layer, CompressedLayer) for layer in layers)
    assert all(layer.keys.dtype == torch.bfloat16 and layer.keys.is_cuda for layer in layers)
    assert stats.kept_pairs == stats.total_pairs // 2  # exactly half of every layer's (head, token) pairs
    tokens, _, _ = generation.greedy_decode(model, cache, _ids(4, 3).cuda(), 6, eos_ids=set())
    assert len(tokens) == 6 and all(0 <= t < model.config.vocab_size for t in tokens)



def _next_logits(model, press, ids, question):
    cache, _, _, _ = generation.prefill(model, ids, press)
    with torch.no_grad():
        return model(input_ids=question, **{cache_argument(model): cache}, use_cache=True).logits.float()


@gpu
@pytest.mark.parametrize("name", ["adakv_snapkv", "critical_adakv_snapkv"])
def test_head_adaptive_layers_route_flash_attention_through_sdpa(name):
    """A head-adaptive layer needs a per-head mask that flash kernels cannot take: with flash_attention_2
    (sdpa where flash_attn is not installed) the compressed layers' calls must go through sdpa and give what
    eager attention gives over the same cache, and the model's own implementation must be restored after."""
    impl = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    fast = tiny_model("llama", impl).to("cuda", torch.bfloat16)
    reference = tiny_model("llama", "eager").to("cuda", torch.bfloat16)
    ids, question = _ids(CONTEXT, 4).cuda(), _ids(5, 5).cuda()
    got = _next_logits(fast, kvbench.build_press(name, compression_ratio=0.75), ids, question)
    want = _next_logits(reference, kvbench.build_press(name, compression_ratio=0.75), ids, question)
    assert fast.config._attn_implementation == impl
    assert torch.isfinite(got).all()
    scale = want.abs().max().clamp_min(1e-3)
    assert (got - want).abs().max() / scale < 0.05, f"{impl} differs from eager over a head-adaptive cache"



@gpu
def test_cuda_peak_memory_is_per_run():
    device = torch.device("cuda")
    model = tiny_model("llama").to(device, torch.bfloat16)
    press = kvbench.build_press("snapkv", compression_ratio=0.5)
    big = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=device)  # an earlier job's 512 MiB peak
    del big
    _, _, run = generation.continuation_nll(model, _ids(CONTEXT, 6).to(device), _ids(8, 7).to(device), press)
    assert run.peak_memory_bytes is not None and run.peak_memory_bytes > 0
    assert run.peak_memory_bytes < 256 * 1024 * 1024  # the earlier peak was reset, not inherited
    reset_peak_memory(device)
    assert peak_memory_bytes(device) <= torch.cuda.memory_allocated(device) + 1
