"""Wall time of a press x ratio sweep with ``hydra/launcher=shared_prefill`` against the same sweep job by job
(``hydra/launcher=basic``), both measured in this one run, with the results checked to be the same.

Usage: python benchmarks/shared_prefill_speedup.py [--datasets pg19 ruler] [--presses snapkv knorm adakv_snapkv]
                                                   [--ratios 0.25 0.5 0.75] [--context-length 2048] [--repeats 1]
                                                   [overrides ...]

Each sweep is the whole ``python -m kvbench -m ...`` command a user types (process start, model load, data, every
job, every result directory), in a fresh temporary output directory; with ``--repeats`` > 1 the two launchers
alternate (their order flips every repeat) and the table shows medians. Target (issue 10): the shared sweep takes at
most 0.4 x the job-by-job wall time. A faster sweep that answers differently is not a speed-up, so every result
directory of the shared sweep is compared with the job-by-job one: the same identity, the same predictions (text),
perplexities within 1e-5 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _overrides import overrides_last

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.4
PERPLEXITY_RTOL = 1e-5
# Small data that still prefills several contexts per job at the requested length.
DATA = {
    "pg19": ["dataset=pg19", "dataset.num_books=1", "dataset.max_windows_per_book=4"],
    "ruler": ["dataset=ruler", "dataset.num_samples=1", "dataset.tasks=[niah_single_1,niah_multikey_1,qa_1,vt]"],
}


def sweep(out: Path, launcher: str, arguments: list[str]) -> float:
    """Run one multirun command; return its wall seconds (a failed sweep stops the benchmark with its output)."""
    command = [sys.executable, "-m", "kvbench", "-m", f"hydra/launcher={launcher}", *arguments, f"output_dir={out}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: the {launcher} sweep failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds


def result_dirs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in out.iterdir() if not p.name.startswith(".") and (p / "metrics.json").exists()}


def differences(job_by_job: Path, shared: Path) -> list[str]:
    """What differs between the two sweeps' results (empty: the shared sweep is the job-by-job one)."""
    solo_dirs, shared_dirs = result_dirs(job_by_job), result_dirs(shared)
    if sorted(solo_dirs) != sorted(shared_dirs):
        return [f"other result directories: {sorted(set(solo_dirs) ^ set(shared_dirs))}"]
    found = []
    for name, solo in solo_dirs.items():
        other = shared_dirs[name]
        if json.loads((solo / "identity.json").read_text()) != json.loads((other / "identity.json").read_text()):
            found.append(f"{name}: identity")
        a = pd.read_csv(solo / "predictions.csv", keep_default_na=False)
        b = pd.read_csv(other / "predictions.csv", keep_default_na=False)
        if a["sample_id"].tolist() != b["sample_id"].tolist():  # other rows: the comparisons below would align nothing
            found.append(f"{name}: other samples ({len(a)} rows against {len(b)})")
        elif "prediction" in a.columns:
            if a["prediction"].tolist() != b["prediction"].tolist():
                found.append(f"{name}: {int((a['prediction'] != b['prediction']).sum())} predictions")
        elif not ((a["perplexity"] - b["perplexity"]).abs() / a["perplexity"] <= PERPLEXITY_RTOL).all():  # NaN fails too
            found.append(f"{name}: perplexity beyond {PERPLEXITY_RTOL:g} relative")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--presses", nargs="+", default=["snapkv", "knorm", "adakv_snapkv"])
    parser.add_argument("--ratios", nargs="+", default=["0.25", "0.5", "0.75"])
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both sweeps (after the dataset's)")
    args = parser.parse_args(overrides_last(sys.argv[1:]))

    print(f"{'dataset':<8}{'jobs':>5}{'job by job s':>14}{'shared s':>10}{'ratio':>8}  verdict (target <= {TARGET})  results")
    for dataset in args.datasets:
        arguments = [*DATA[dataset], f"dataset.context_length={args.context_length}", *args.overrides,
                     f"press={','.join(args.presses)}", f"compression_ratio={','.join(args.ratios)}"]
        times: dict[str, list[float]] = {"basic": [], "shared_prefill": []}
        found: list[str] = []
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="kvbench-shared-") as tmp:
                order = ("basic", "shared_prefill") if repeat % 2 == 0 else ("shared_prefill", "basic")
                for launcher in order:
                    times[launcher].append(sweep(Path(tmp) / launcher, launcher, arguments))
                found += differences(Path(tmp) / "basic", Path(tmp) / "shared_prefill")
        solo, shared = statistics.median(times["basic"]), statistics.median(times["shared_prefill"])
        ratio = shared / solo
        verdict = "ok" if ratio <= TARGET else "MISSED"
        same = "identical" if not found else "DIFFER: " + "; ".join(found[:5])
        jobs = len(args.presses) * len(args.ratios)
        print(f"{dataset:<8}{jobs:>5}{solo:>14.1f}{shared:>10.1f}{ratio:>8.2f}  {verdict:<28}{same}", flush=True)
    print(f"command: python -m kvbench -m hydra/launcher=<basic|shared_prefill> <dataset settings> "
          f"dataset.context_length={args.context_length} press={','.join(args.presses)} "
          f"compression_ratio={','.join(args.ratios)}")


if __name__ == "__main__":
    main()
