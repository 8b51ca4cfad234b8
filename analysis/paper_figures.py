"""Paper-style figure: score vs compression ratio, one panel per dataset (rows: models).

Thin on purpose: loading, line identity and styling all come from ``kvbench.leaderboard`` so the paper
figure can never disagree with the leaderboard. Usage::

    python analysis/paper_figures.py results --out paper/score_vs_ratio.pdf [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from kvbench.errors import KVBenchError
from kvbench.leaderboard import load_results, skipped_warning
from kvbench.leaderboard.plots import draw_vs_ratio, line_styles
from kvbench.leaderboard.table import format_ratio, higher_is_better

# Reading order used in the paper; datasets not listed here follow alphabetically.
DATASET_ORDER = ("ruler", "longbench_e", "needle", "pg19")
DATASET_TITLES = {"ruler": "RULER", "longbench_e": "LongBench-E", "needle": "Needle-in-a-haystack", "pg19": "PG-19"}
PAPER_RC = {
    "font.family": "serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def score_vs_ratio_grid(results_dir: str | Path, models: list[str] | None = None,
                        datasets: list[str] | None = None) -> Figure:
    """Build the grid figure; raises KVBenchError when the selection matches no runs. Run directories left out
    (incomplete or corrupt) are named on stderr, as the leaderboard names them."""
    table, skipped = load_results(results_dir)
    for line in skipped_warning(skipped):
        print(line, file=sys.stderr)
    if models:
        table = table[table["model"].isin(models)]
    if datasets:
        table = table[table["dataset"].isin(datasets)]
    if table.empty:
        raise KVBenchError(
            f"no complete runs in '{results_dir}' match the chosen --model/--dataset; "
            "check the names with `python -m kvbench.leaderboard`"
        )
    present = list(dict.fromkeys(table["dataset"]))
    columns = [d for d in DATASET_ORDER if d in present] + sorted(d for d in present if d not in DATASET_ORDER)
    rows = list(dict.fromkeys(table["model"]))
    styles = line_styles(table)
    pairs = set(zip(table["model"], table["dataset"]))
    first_model = {d: next(m for m in rows if (m, d) in pairs) for d in columns}
    first_dataset = {m: next(d for d in columns if (m, d) in pairs) for m in rows}
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=(2.6 * len(columns) + 0.6, 2.3 * len(rows) + 0.7), layout="constrained")
        axes = fig.subplots(len(rows), len(columns), squeeze=False)
        for r, model in enumerate(rows):
            for c, dataset in enumerate(columns):
                ax = axes[r][c]
                block = table[(table["model"] == model) & (table["dataset"] == dataset)]
                higher = higher_is_better(table, dataset)
                if not draw_vs_ratio(ax, block, "score", styles):
                    ax.set_axis_off()
                    continue
                # a dataset's title on its column's first panel with runs, a model's name on its row's first (the
                # first row or column may have none of them)
                if model == first_model[dataset]:
                    ax.set_title(DATASET_TITLES.get(dataset, dataset))
                if r == len(rows) - 1:
                    ax.set_xlabel("compression ratio")
                ylabel = "perplexity (↓)" if not higher else "score (↑)"
                ax.set_ylabel(f"{model}\n{ylabel}" if dataset == first_dataset[model] else ylabel)
                ticks = sorted(set(block.loc[block["press"] != "no_press", "compression_ratio"]))
                if ticks:
                    ax.set_xticks(ticks, [format_ratio(t) for t in ticks], rotation=0)
        handles, labels = {}, []
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in handles:
                    handles[label] = handle
                    labels.append(label)
        fig.legend([handles[x] for x in labels], labels, loc="outside lower center",
                   ncol=min(len(labels), 5), frameon=False)
    return fig


def main(argv: list[str] | None = None) -> int:
    """CLI: write the grid figure (format from the --out suffix: pdf, png, svg)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--out", default=None, help="figure path (default: <results_dir>/leaderboard/paper_score_vs_ratio.pdf)")
    parser.add_argument("--model", action="append", help="model(s) to include (repeatable; default: all)")
    parser.add_argument("--dataset", action="append", help="dataset(s) to include (repeatable; default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results_dir) / "leaderboard" / "paper_score_vs_ratio.pdf"
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:  # matplotlib would say so after the whole figure was built
        print(f"error: --out {out} names no figure format; end it in one of {', '.join('.' + f for f in sorted(formats))}",
              file=sys.stderr)
        return 2
    try:
        fig = score_vs_ratio_grid(args.results_dir, args.model, args.dataset)
        out.parent.mkdir(parents=True, exist_ok=True)
        with matplotlib.rc_context(PAPER_RC):
            fig.savefig(out, dpi=200, bbox_inches="tight")
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write --out {out} ({exc.strerror or exc}); choose a path you can write", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
