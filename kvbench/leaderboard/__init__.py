"""Leaderboard: collect finished runs from ``results/`` into one table, then CSV, Markdown, plots and HTML.

Library use::

    from kvbench.leaderboard import load_results, build_leaderboard
    table, skipped = load_results("results")          # one row per complete run
    board = build_leaderboard("results")              # writes results/leaderboard/{csv,md,png,html}

``wandb_report.push_leaderboard`` is imported lazily so that reading results never imports wandb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kvbench.errors import KVBenchError
from kvbench.leaderboard.html import write_html
from kvbench.leaderboard.plots import PlotInfo, make_plots
from kvbench.leaderboard.table import (
    NO_PRESS,
    SMOKE_SAMPLES,
    SkippedRun,
    blocks,
    format_ratio,
    line_label,
    load_results,
    mark_grid,
    score_grid,
    to_markdown,
)

__all__ = [
    "Leaderboard",
    "NO_PRESS",
    "PlotInfo",
    "SMOKE_SAMPLES",
    "SkippedRun",
    "blocks",
    "skipped_warning",
    "build_leaderboard",
    "format_ratio",
    "line_label",
    "load_results",
    "make_plots",
    "mark_grid",
    "score_grid",
    "to_markdown",
    "write_html",
]


@dataclass
class Leaderboard:
    """What ``build_leaderboard`` produced, so callers (CLI, W&B push, tests) need not guess file names."""

    table: pd.DataFrame
    skipped: list[SkippedRun]
    out_dir: Path
    csv: Path
    markdown: Path
    html: Path
    plots: list[PlotInfo] = field(default_factory=list)
    wandb_dir: str | None = None

    def summary(self) -> str:
        """A few human lines for the terminal: counts, where files went, what was skipped."""
        lines = [
            f"leaderboard: {len(self.table)} runs across {len(blocks(self.table))} dataset/model blocks",
            f"  table:  {self.csv}",
            f"          {self.markdown}",
            f"  plots:  {len(self.plots)} PNG in {self.out_dir}",
            f"  page:   {self.html}",
        ]
        if self.wandb_dir:
            lines.append(f"  wandb:  {self.wandb_dir}")
        copies = self.table[self.table["duplicate_of"].fillna("") != ""] if "duplicate_of" in self.table else self.table.iloc[:0]
        if len(copies):
            lines.append(f"  warning: {len(copies)} run dir(s) repeat another's identity (shown once, not averaged):")
            lines.extend(f"    {name} = {first}" for name, first in zip(copies["run_name"], copies["duplicate_of"]))
        lines.extend(f"  {line}" for line in skipped_warning(self.skipped))
        return "\n".join(lines)


def skipped_warning(skipped: list[SkippedRun]) -> list[str]:
    """The lines saying which run directories were left out and why (none when nothing was): every reader of
    ``results/`` says so, so a figure never silently lacks a run."""
    if not skipped:
        return []
    return [f"warning: skipped {len(skipped)} incomplete or corrupt run dir(s):", *(f"  {s.path}: {s.reason}" for s in skipped)]


def build_leaderboard(
    results_dir: str | Path = "results",
    out_dir: str | Path | None = None,
    *,
    push_wandb: bool = False,
    wandb_project: str = "kvbench",
    wandb_mode: str = "online",
    wandb_entity: str | None = None,
) -> Leaderboard:
    """Load every complete run and write the leaderboard files (default: ``<results_dir>/leaderboard/``)."""
    if push_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise KVBenchError("--wandb needs the wandb package: pip install wandb (or leave out --wandb)") from exc
    table, skipped = load_results(results_dir)
    if table.empty:
        hint = f" ({len(skipped)} skipped as incomplete or corrupt)" if skipped else ""
        raise KVBenchError(
            f"no complete runs under '{results_dir}'{hint}; each run dir needs config.yaml, metrics.json and "
            "predictions.csv — run the benchmark first or pass the right results directory"
        )
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "leaderboard"
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "leaderboard.csv"
        table.to_csv(csv_path, index=False)
        md_path = out / "leaderboard.md"
        md_path.write_text(to_markdown(table, skipped), encoding="utf-8")
        plots = make_plots(table, out)
        html_path = write_html(out / "index.html", table, plots, skipped)
    except OSError as exc:  # a file where the folder should be, a read-only or full disk
        raise KVBenchError(f"cannot write the leaderboard to {out} ({exc.strerror or exc}); "
                           "pass --out with a directory you can write") from exc
    board = Leaderboard(table, skipped, out, csv_path, md_path, html_path, plots)
    if push_wandb:
        from kvbench.leaderboard.wandb_report import push_leaderboard

        board.wandb_dir = push_leaderboard(
            table,
            plots,
            project=wandb_project,
            mode=wandb_mode,
            entity=wandb_entity,
            directory=Path(results_dir) / "wandb",
            html_path=html_path,
        )
    return board
