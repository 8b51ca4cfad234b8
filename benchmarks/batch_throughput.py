"""Throughput of ``batch_size=N`` against ``batch_size=1``: the same run (same config, same samples), measured in one
process, with the model loaded once before either timing starts.

Usage: python benchmarks/batch_throughput.py [--batch-sizes 1 4] [--press adakv_snapkv] [overrides ...]
       e.g. ... dataset=pg19 dataset.context_length=1024 dataset.num_books=1

Prints, per batch size, the wall seconds of ``kvbench.runner.execute`` (data, prefill, compression, decoding or
teacher forcing, writing the result), samples per second and the speed-up over the first batch size, and
checks the outputs against the first batch size's: every prediction (RULER, LongBench, needle) identical, every
window's perplexity (PG-19) within 1e-5 relative. A faster batch that answers differently is not a speed-up: in
float32 the script then exits with an error (in lower precisions a near-tie may flip, so it is only reported). Each
batch size writes into its own temporary output directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from _overrides import overrides_last
from kvbench.__main__ import CONF_DIR
from kvbench.runner import execute, get_model

DEFAULTS = ["dataset=ruler", "dataset.context_length=1024", "dataset.num_samples=2"]
PERPLEXITY_RTOL = 1e-5


def _config(overrides: list[str], batch_size: int, out: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=[*overrides, f"batch_size={batch_size}", f"output_dir={out}"])


def _outputs(out: Path) -> pd.DataFrame:
    (predictions,) = out.glob("*/predictions.csv")
    return pd.read_csv(predictions, keep_default_na=False).sort_values("sample_id").reset_index(drop=True)


def _agreement(outputs: pd.DataFrame, reference: pd.DataFrame) -> str:
    """``identical`` / ``within 1e-5`` when the batch answered as batch size 1 did, else what differs."""
    if list(outputs["sample_id"]) != list(reference["sample_id"]):
        return "DIFFER: other samples"
    if "prediction" in reference.columns:
        differ = int((outputs["prediction"] != reference["prediction"]).sum())
        return "identical predictions" if differ == 0 else f"DIFFER: {differ} predictions"
    relative = ((outputs["perplexity"] - reference["perplexity"]).abs() / reference["perplexity"]).max()
    verdict = "within 1e-5" if relative <= PERPLEXITY_RTOL else "DIFFER"
    return f"{verdict}: perplexity max rel. diff {relative:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--press", default="adakv_snapkv")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides (default: {' '.join(DEFAULTS)})")
    args = parser.parse_args(overrides_last(sys.argv[1:]))
    overrides = [*(args.overrides or DEFAULTS), f"press={args.press}", f"compression_ratio={args.ratio}"]

    with tempfile.TemporaryDirectory(prefix="kvbench-batch-") as tmp:
        first_cfg = _config(overrides, args.batch_sizes[0], Path(tmp) / "warm")
        model, _ = get_model(first_cfg, first_cfg.device)  # loaded once, outside the timings (execute reuses it)
        # float32 must answer as batch size 1 does; lower precisions may flip near-ties, which is only reported
        strict = model.dtype == torch.float32
        print(f"{' '.join(overrides)}")
        print(f"{'batch_size':>10}{'samples':>9}{'wall s':>9}{'samples/s':>11}{'speed-up':>10}  outputs")
        reference, base, failed = None, None, []
        for batch_size in dict.fromkeys(args.batch_sizes):  # a repeated size would reuse its own finished run
            out = Path(tmp) / f"b{batch_size}"
            cfg = _config(overrides, batch_size, out)
            start = time.perf_counter()
            execute(cfg)
            seconds = time.perf_counter() - start
            outputs = _outputs(out)
            if reference is None:
                reference, base, same = outputs, seconds, "reference"
            else:
                same = _agreement(outputs, reference)
            rate = len(outputs) / seconds
            print(f"{batch_size:>10}{len(outputs):>9}{seconds:>9.1f}{rate:>11.3f}{base / seconds:>9.2f}x  {same}")
            if same.startswith("DIFFER") and strict:
                failed.append(batch_size)
    if failed:
        sys.exit(f"error: batch_size {', '.join(map(str, failed))} did not answer as batch_size {args.batch_sizes[0]} did")


if __name__ == "__main__":
    main()
