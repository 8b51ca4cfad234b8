"""Measure one model over context lengths x presses x ratios: prefill (with compression), compression alone,
time to first token, decode ms/token, cache bytes and peak memory.

Inputs are seeded random token ids (speed does not depend on what the tokens say); the last
``QUESTION_TOKENS`` of each context length play the question, decoded over the compressed context as a real
run would. Decoding ignores EOS so every row decodes exactly ``decode_tokens`` tokens.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kvbench.compression.cache import kv_bytes
from kvbench.device import device_model, peak_memory_bytes, reset_peak_memory
from kvbench.errors import KVBenchError
from kvbench.generation import greedy_decode, prefill
from kvbench.presses import build_press, check_attention
from kvbench.presses.base import Press

QUESTION_TOKENS = 16  # prompt tokens after the compressed context (never compressed)
WARMUP_TOKENS = 64
CSV_NAME = "speed.csv"


@dataclass(frozen=True)
class BenchmarkOptions:
    model: str = "smollm2-135m"
    context_lengths: tuple[int, ...] = (1024, 2048, 4096)
    presses: tuple[str, ...] = ("no_press", "snapkv", "adakv_snapkv", "expected_attention")
    ratios: tuple[float, ...] = (0.0, 0.5, 0.75)
    decode_tokens: int = 32
    repeats: int = 1
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    out: Path = Path("results/speed")
    seed: int = 0
    bandwidth_gbps: float | None = None  # adds the computed memory-bound floor next to each measured row


@dataclass(frozen=True)
class Job:
    """One (context length, press, ratio) row; ``press`` is None for a pair that would compress nothing."""

    context_length: int
    press_name: str
    ratio: float
    press: Press = field(compare=False)


def check_options(options: BenchmarkOptions, model_max_length: int | None, decoding: bool = True) -> None:
    """Refuse bad values with one actionable line, before any model is loaded or any file written (``decoding``:
    whether tokens are decoded after the context; the computed bound alone decodes none)."""
    if not options.context_lengths or not options.presses or not options.ratios:
        raise KVBenchError("--context-lengths, --presses and --ratios each need at least one value")
    for length in options.context_lengths:
        if length <= QUESTION_TOKENS:
            raise KVBenchError(f"context length {length} is too short: it must exceed the {QUESTION_TOKENS} question tokens")
        if decoding and model_max_length is not None and length + options.decode_tokens - 1 > model_max_length:
            raise KVBenchError(f"context length {length} with {options.decode_tokens} decoded tokens reaches position "
                               f"{length + options.decode_tokens - 1}, above the model's max_position_embeddings="
                               f"{model_max_length}; drop it from --context-lengths or lower --decode-tokens")
    for ratio in options.ratios:
        if not 0.0 <= ratio < 1.0:
            raise KVBenchError(f"ratio {ratio:g} is outside [0, 1): a ratio is the fraction of context KV pairs removed")
    if options.decode_tokens < 2:
        raise KVBenchError(f"--decode-tokens must be at least 2 (ms/token is timed after the first token), got {options.decode_tokens}")
    if options.repeats < 1:
        raise KVBenchError(f"--repeats must be at least 1, got {options.repeats}")
    if options.bandwidth_gbps is not None and not (math.isfinite(options.bandwidth_gbps) and options.bandwidth_gbps > 0):
        raise KVBenchError(f"--bandwidth-gbps must be a positive number, got {options.bandwidth_gbps:g}")
    existing = next(path for path in (options.out, *options.out.parents) if path.exists())
    if not existing.is_dir():
        raise KVBenchError(f"--out {options.out}: {existing} is a file; give a folder for the CSV and plots")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KVBenchError(f"--out {options.out}: {existing} is not writable; give a folder you can write to")


def plan(options: BenchmarkOptions) -> list[Job]:
    """Every row to measure, once each (press names and parameters checked here). ``no_press`` ignores the ratio,
    so it gets one row per context length, at r = 0, measured first: pairs that compress nothing reuse it."""
    names = sorted(dict.fromkeys(options.presses), key=lambda name: name != "no_press")
    jobs = []
    for length in dict.fromkeys(options.context_lengths):
        for name in names:
            ratios = (0.0,) if name == "no_press" else tuple(dict.fromkeys(options.ratios))
            for ratio in ratios:
                press = build_press(name, compression_ratio=ratio)
                check_attention(name, press, options.attn, "pass --attn eager or drop it from --presses")
                jobs.append(Job(length, name, ratio, press))
    return jobs


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model with the cores torch may use."""
    if device.type == "cuda":
        return device_model(device)
    return f"{device_model(device)} ({os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads)"


def random_prompt(vocab_size: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ids ``[1, length]`` split into the compressed context and the question."""
    ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed + length))
    return ids[:, : length - QUESTION_TOKENS], ids[:, length - QUESTION_TOKENS :]


def _layout(cache) -> str:
    return "+".join(sorted({type(layer).__name__ for layer in cache.layers}))


def measure(model, press: Press, context_ids: torch.Tensor, question_ids: torch.Tensor, decode_tokens: int, repeats: int) -> dict:
    """Median timings over ``repeats`` fresh prefill + decode runs; bytes from the last run (they do not vary)."""
    runs = []
    for _ in range(repeats):
        reset_peak_memory(model.device)
        cache, prefill_seconds, stats, _ = prefill(model, context_ids, press)
        after = kv_bytes(cache)
        layout = _layout(cache)
        tokens, question_seconds, per_token = greedy_decode(model, cache, question_ids, decode_tokens, set())
        runs.append({
            "prefill_seconds": prefill_seconds,
            "compression_seconds": stats.seconds,
            "question_seconds": question_seconds,
            "ttft_seconds": prefill_seconds + question_seconds,
            "decode_ms_per_token": per_token * 1e3,
            "decoded_tokens": len(tokens),
            "kv_bytes": after,
            "kv_bytes_uncompressed": stats.kv_bytes_before if stats.layers else after,
            "kv_kept_fraction": stats.kept_pairs / stats.total_pairs if stats.total_pairs else 1.0,
            "cache_layout": layout,
            "peak_memory_bytes": peak_memory_bytes(model.device),
        })
        del cache
    timed = ("prefill_seconds", "compression_seconds", "question_seconds", "ttft_seconds", "decode_ms_per_token")
    row = dict(runs[-1])
    row.update({key: statistics.median(run[key] for run in runs) for key in timed})
    peaks = [run["peak_memory_bytes"] for run in runs if run["peak_memory_bytes"] is not None]
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    return row


def run_grid(model, options: BenchmarkOptions, jobs: list[Job], model_name: str,
             on_row: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Measure every job; a pair that compresses nothing (ratio 0) reuses its context length's uncompressed
    measurement (``measured_with`` names the row that ran). ``on_row`` sees the table after each new row."""
    import transformers

    import kvbench.benchmark.bound as bound

    device = model.device
    fixed = {
        "model": model_name,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn": model.config._attn_implementation,
        "batch_size": 1,
        "question_tokens": QUESTION_TOKENS,
        "decode_tokens": options.decode_tokens,
        "repeats": options.repeats,
        "seed": options.seed,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    weights = bound.weight_bytes_per_step(model.config, model.dtype) if options.bandwidth_gbps else None
    question_bytes = QUESTION_TOKENS * bound.kv_bytes_per_token(model.config, model.dtype)  # read by every step too
    vocab = int(model.config.vocab_size)
    warm_context, warm_question = random_prompt(vocab, WARMUP_TOKENS + QUESTION_TOKENS, options.seed)
    measure(model, build_press("no_press"), warm_context, warm_question, 2, 1)  # first-call allocations and kernels
    # Each press once more, at the grid's shortest length, before its first row: its own first calls (kernels a GPU
    # loads lazily, scratch buffers) would otherwise land in that row's compression time, with --repeats 1 alone.
    shortest = random_prompt(vocab, min(job.context_length for job in jobs), options.seed)
    rows, uncompressed, warmed = [], {}, {"no_press"}  # no_press: the warm-up above
    for job in jobs:
        context_ids, question_ids = random_prompt(vocab, job.context_length, options.seed)
        noop = job.press.is_noop(context_ids.shape[-1])
        if noop and job.context_length in uncompressed:
            measured = uncompressed[job.context_length]
        else:
            if job.press_name not in warmed:
                measure(model, job.press, *shortest, 2, 1)
                warmed.add(job.press_name)
            measured = measure(model, job.press, context_ids, question_ids, options.decode_tokens, options.repeats)
            measured["measured_with"] = job.press_name
            if noop:
                uncompressed[job.context_length] = measured
        row = {"context_length": job.context_length, "press": job.press_name, "ratio": job.ratio, **measured, **fixed}
        if weights is not None:
            kv = row["kv_bytes"] + question_bytes
            row["memory_bound_ms_per_token"] = bound.bound_ms_per_token(weights, kv, options.bandwidth_gbps)
        rows.append(row)
        if on_row is not None:
            on_row(pd.DataFrame(rows))
    return pd.DataFrame(rows)

