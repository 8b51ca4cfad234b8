"""SnapKV design-space study: perplexity, latency, KV memory and compression cost against the token budget.

Reads the runs of ``hydra/sweeper=snapkv_grid`` (SnapKV over window x kernel x pooling at token budgets) and
``hydra/sweeper=snapkv_grid_baselines`` (no_press, knorm at the same budgets) through ``kvbench.leaderboard``,
and writes into ``--out``:

- ``perplexity_vs_budget.png``: one panel per kernel size, one line per window x pooling, knorm and no_press;
- ``latency_vs_budget.png``: time to first token and time per output token;
- ``kv_memory_vs_budget.png``: KV-cache bytes after compression;
- ``compression_share_vs_budget.png``: scoring + selection time over the prefill without it;
- ``design_space.csv``: one row per run, everything the plots show.

Latency: the presets set ``decode_timing_tokens=16``, so each perplexity window is also decoded for 16 tokens over
its compressed cache after scoring; the run then records time to first token (prefill + compression: the first
scored token comes out of the prefill) and time per output token (``latency_source`` = ``decode``). Runs made
without it decoded nothing; for those the panels use what the run did measure, and say so in the axis label and
the CSV's ``latency_source``: prefill + compression for the first token, teacher-forced seconds per scored token
(all scored tokens in one forward over the compressed cache) for the next ones.

    python analysis/snapkv_design_space.py results --out results/leaderboard/snapkv_design_space [--model pythia-70m]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import yaml
from matplotlib.figure import Figure

from kvbench.errors import KVBenchError
from kvbench.leaderboard import load_results, skipped_warning
from kvbench.results import flat_keys

STUDY_PRESS = "snapkv"
REFERENCES = ("knorm", "no_press")
PRESS_KEYS = ("window_size", "kernel_size", "pooling", "clustering")
MEASURED, PROXY = "decode", "perplexity run: prefill+compression, teacher-forced s/token"
CSV_COLUMNS = ("model", "dataset", "press", "budget", *PRESS_KEYS, "perplexity", "kv_kept_fraction", "kv_bytes_after",
               "ttft_seconds", "seconds_per_token", "latency_source", "prefill_seconds", "compression_seconds",
               "compression_share", "run_name")


def _press_config(run_dir: str) -> dict:
    """The press section a run recorded (window, kernel, pooling, clustering are not in the leaderboard table)."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
    press = config.get("press") if isinstance(config, dict) else None
    return press if isinstance(press, dict) else {}


def _teacher_forced_seconds_per_token(run_dir: str) -> float:
    """Mean seconds per teacher-forced token of a perplexity run (its predictions.csv), NaN when not recorded."""
    predictions = pd.read_csv(Path(run_dir) / "predictions.csv")
    if not {"teacher_forced_seconds", "num_tokens"} <= set(predictions.columns):
        return math.nan
    forced = (pd.to_numeric(predictions["num_tokens"], errors="coerce") - 1).clip(lower=1)
    return float((pd.to_numeric(predictions["teacher_forced_seconds"], errors="coerce") / forced).mean())


def study_table(results_dir: str | Path, model: str | None = None, dataset: str = "pg19") -> pd.DataFrame:
    """One row per budget run of snapkv, knorm or no_press on ``dataset``; raises KVBenchError when there is none, or
    when the runs answer different questions (another context length, seed, decode timing...): a line averages over
    everything it does not name, so two grids in one folder would draw points no run produced."""
    table, skipped = load_results(results_dir)
    for line in skipped_warning(skipped):
        print(line, file=sys.stderr)
    if table.empty:
        raise KVBenchError(f"no complete runs in '{results_dir}'; run `python -m kvbench -m hydra/sweeper=snapkv_grid` "
                           f"(and snapkv_grid_baselines) with output_dir={results_dir} first")
    table = table[(table["dataset"] == dataset) & table["press"].isin((STUDY_PRESS, *REFERENCES)) & table["budget"].notna()]
    models = sorted(set(table["model"]))
    if model is not None:
        table = table[table["model"] == model]
    elif len(models) > 1:
        raise KVBenchError(f"runs of several models in '{results_dir}' ({', '.join(models)}); choose one with --model")
    if (table["press"] == STUDY_PRESS).sum() == 0:
        raise KVBenchError(f"no SnapKV budget runs on dataset '{dataset}'{f' for model {model}' if model else ''} in "
                           f"'{results_dir}'; run `python -m kvbench -m hydra/sweeper=snapkv_grid output_dir={results_dir}`")
    _check_one_study(table, results_dir)
    rows = []
    for record in table.to_dict("records"):
        press = _press_config(record["run_dir"])
        measured = not math.isnan(record["ttft_seconds"])
        prefill, compression = record["prefill_seconds"], record["compression_seconds"]
        rows.append({
            "model": record["model"], "dataset": record["dataset"], "press": record["press"], "budget": int(record["budget"]),
            **{key: press.get(key) for key in PRESS_KEYS},
            "perplexity": record["score"],
            "kv_kept_fraction": record["kv_kept_fraction"],
            "kv_bytes_after": record["kv_bytes_after"],
            "ttft_seconds": record["ttft_seconds"] if measured else prefill,
            "seconds_per_token": record["seconds_per_token"] if measured else _teacher_forced_seconds_per_token(record["run_dir"]),
            "latency_source": MEASURED if measured else PROXY,
            "prefill_seconds": prefill,
            "compression_seconds": compression,
            # the cost over the prefill it rides on (prefill_seconds includes scoring + selection)
            "compression_share": compression / (prefill - compression) if prefill > compression else math.nan,
            "run_name": record["run_name"],
        })
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS)).sort_values(["press", *PRESS_KEYS[:3], "budget"], na_position="first",
                                                                     kind="stable").reset_index(drop=True)


def _study_setting(row: dict) -> dict:
    """What a run measured apart from its press and budget (the leaderboard's setting less the budget), flattened,
    with whether it timed decoding (perplexity runs without it report other latencies)."""
    try:
        setting = json.loads(row["setting"])
    except (TypeError, ValueError):  # a run without config.yaml: its variant text
        setting = {"variant": str(row["setting"])}
    flat = {key: json.dumps(value, sort_keys=True, default=str)
            for key, value in flat_keys({k: v for k, v in setting.items() if k != "budget"}).items()}
    flat["decode timing"] = "yes" if not math.isnan(row["ttft_seconds"]) else "no"
    return flat


def _check_one_study(table: pd.DataFrame, results_dir: str | Path) -> None:
    settings = [_study_setting(row) for row in table.to_dict("records")]
    differing = sorted({key for s in settings for key in s if len({t.get(key) for t in settings}) > 1})
    if differing:
        shown = "; ".join(f"{key}: {', '.join(sorted({str(s.get(key)) for s in settings}))}" for key in differing[:4])
        raise KVBenchError(f"the budget runs in '{results_dir}' are of several settings ({shown}); a line would average "
                           "across them: give each grid its own output_dir")


def line_name(row: pd.Series, clusterings: int) -> str:
    """Legend entry: a SnapKV setting by window and pooling (the clustering too when the study has several)."""
    if row["press"] != STUDY_PRESS:
        return str(row["press"])
    name = f"snapkv w={int(row['window_size'])} {row['pooling']}"
    return f"{name} {row['clustering']}" if clusterings > 1 else name


def _lines(block: pd.DataFrame, value: str) -> dict[str, pd.Series]:
    """``label -> value by budget`` (mean over anything the label does not name, e.g. kernel sizes)."""
    clusterings = block["clustering"].nunique()
    labels = block.apply(line_name, axis=1, clusterings=clusterings)
    return {label: group.groupby("budget")[value].mean() for label, group in block.groupby(labels, sort=True)}


def _draw(ax, block: pd.DataFrame, value: str, ylabel: str) -> None:
    for label, series in _lines(block, value).items():
        reference = not label.startswith(STUDY_PRESS)
        ax.plot(series.index, series.values, marker="o", markersize=3, label=label,
                linestyle="--" if reference else "-", color="black" if label == "no_press" else None)
    ax.set_xscale("log", base=2)
    budgets = sorted(set(block["budget"]))
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens per head)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def figures(study: pd.DataFrame) -> dict[str, Figure]:
    """The four figures of the study, by file name."""
    title = f"{study['model'].iloc[0]} on {study['dataset'].iloc[0]}"
    references = study[study["press"] != STUDY_PRESS]
    snap = study[study["press"] == STUDY_PRESS]
    kernels = sorted(int(k) for k in snap["kernel_size"].dropna().unique())
    out = {}

    fig = Figure(figsize=(4.2 * len(kernels) + 1.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(kernels), squeeze=False)[0]
    for ax, kernel in zip(axes, kernels):
        _draw(ax, pd.concat([snap[snap["kernel_size"] == kernel], references]), "perplexity", "perplexity (lower is better)")
        ax.set_title(f"kernel {kernel}")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    fig.suptitle(f"SnapKV perplexity vs budget: {title}")
    out["perplexity_vs_budget.png"] = fig

    proxy = (study["latency_source"] == PROXY).any()
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ttft, tpot = fig.subplots(1, 2)
    _draw(ttft, study, "ttft_seconds", "prefill + compression (s)" if proxy else "time to first token (s)")
    _draw(tpot, study, "seconds_per_token", "teacher-forced s / token" if proxy else "time per output token (s)")
    tpot.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    fig.suptitle(f"latency vs budget (mean over kernel sizes): {title}")
    out["latency_vs_budget.png"] = fig

    for name, value, ylabel, heading in (
        ("kv_memory_vs_budget.png", "kv_mib", "KV cache after compression (MiB)", "KV memory vs budget"),
        ("compression_share_vs_budget.png", "compression_pct", "scoring + selection (% of prefill)", "compression cost vs budget"),
    ):
        data = study.assign(kv_mib=study["kv_bytes_after"] / 2**20, compression_pct=100 * study["compression_share"])
        if value == "compression_pct":
            data = data[data["press"] != "no_press"]  # nothing is scored without compression
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        ax = fig.subplots()
        _draw(ax, data, value, ylabel)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
        fig.suptitle(f"{heading}: {title}")
        out[name] = fig
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: write the four figures and the CSV into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--out", default=None, help="output folder (default: <results_dir>/leaderboard/snapkv_design_space)")
    parser.add_argument("--model", default=None, help="model to draw (required when the results hold several)")
    parser.add_argument("--dataset", default="pg19", help="perplexity dataset of the study (default: pg19)")
    args = parser.parse_args(argv)
    try:
        study = study_table(args.results_dir, args.model, args.dataset)
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.results_dir) / "leaderboard" / "snapkv_design_space"
    try:
        out.mkdir(parents=True, exist_ok=True)
        study.to_csv(out / "design_space.csv", index=False)
        for name, fig in figures(study).items():
            fig.savefig(out / name, dpi=150)
    except OSError as exc:
        print(f"error: cannot write --out {out} ({exc.strerror or exc}); choose a folder you can write", file=sys.stderr)
        return 2
    print(f"wrote {len(study)} runs: {out}/design_space.csv and 4 figures")
    return 0


if __name__ == "__main__":
    matplotlib.use("Agg")
    sys.exit(main())
