"""``python -m kvbench.benchmark``: the speed benchmark (prefill, compression, time to first token, decode
ms/token, cache bytes, peak memory) over context lengths x presses x ratios, for one model.

argparse rather than Hydra: the benchmark is one process that loads the model once and times a grid inside
it (a Hydra multirun would reload per point and write a results directory per job, which timings do not need).
Output: ``<out>/speed.csv`` (one row per context length, press and ratio), ``decode_ms_per_token.png``,
``cache_bytes.png``, and a compact table on stdout.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvbench import atomic
from kvbench.benchmark import bound, model_source
from kvbench.benchmark.speed import CSV_NAME, QUESTION_TOKENS, BenchmarkOptions, check_options, plan, run_grid
from kvbench.errors import KVBenchError
from kvbench.models import max_length

DECODE_PLOT = "decode_ms_per_token.png"
CACHE_PLOT = "cache_bytes.png"
TABLE_COLUMNS = ["context_length", "press", "ratio", "prefill_seconds", "compression_seconds", "ttft_seconds",
                 "decode_ms_per_token", "kv_bytes", "kv_kept_fraction", "peak_memory_bytes"]

__all__ = ["BenchmarkOptions", "run", "bound_only", "format_table"]


def _write_csv(df: pd.DataFrame, out: Path) -> None:
    atomic.write_text(out / CSV_NAME, df.to_csv(index=False))


def format_table(df: pd.DataFrame) -> str:
    """The compact stdout view: seconds and ms rounded, bytes in MiB."""
    view = df[[c for c in TABLE_COLUMNS + ["memory_bound_ms_per_token"] if c in df]].copy()
    view["kv_MiB"] = view.pop("kv_bytes") / 2**20
    peak = view.pop("peak_memory_bytes")
    view["peak_MiB"] = ["n/a" if pd.isna(p) else f"{p / 2**20:.0f}" for p in peak]
    return view.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def run(options: BenchmarkOptions) -> pd.DataFrame:
    """Check everything, load the model, measure the grid (the CSV is rewritten after every row, so an
    interrupted run keeps what it measured), then draw the plots. Nothing is written when a check fails."""
    from kvbench.benchmark.plots import plot_cache, plot_decode

    source = model_source.resolve_source(options.model)
    check_options(options, max_length(source.config))
    model_source.check_runtime(options.device, options.dtype, options.attn)
    jobs = plan(options)
    model = model_source.load(source, options.device, options.dtype, options.attn, options.seed)
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # what the permission check cannot see (a read-only or virtual filesystem)
        raise KVBenchError(f"--out {options.out} cannot be created ({exc.strerror or exc}); give a folder you can write to") from exc
    for stale in (DECODE_PLOT, CACHE_PLOT):  # an earlier run's plots beside this run's CSV would show other numbers
        (options.out / stale).unlink(missing_ok=True)
    df = run_grid(model, options, jobs, source.name, on_row=lambda partial: _write_csv(partial, options.out))
    _write_csv(df, options.out)
    plot_decode(df, options.out / DECODE_PLOT)
    plot_cache(df, options.out / CACHE_PLOT)
    return df


def bound_only(options: BenchmarkOptions) -> pd.DataFrame:
    """The computed memory-bound table for ``options`` (no weights loaded, nothing measured or written)."""
    source = model_source.resolve_source(options.model)
    check_options(options, max_length(source.config), decoding=False)
    _, dtype = model_source.check_runtime(options.device, options.dtype, options.attn)
    return bound.bound_table(source.config, dtype, list(options.context_lengths), list(options.ratios), options.bandwidth_gbps,
                             QUESTION_TOKENS)
