"""Push a built leaderboard into one W&B run, so a W&B Report can be assembled from a single source.

Individual runs are already logged by ``kvbench.tracking``; this run holds the cross-run view (the
tidy table, one score grid per dataset/model and every leaderboard figure) that a report embeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from kvbench.leaderboard.plots import PlotInfo
from kvbench.leaderboard.table import NO_PRESS, block_rows, blocks, score_grid
from kvbench.tracking import predictions_table, start_run


def _plot_items(plot_paths: Iterable[PlotInfo | Path | str] | Mapping[str, Path | str]) -> dict[str, Path]:
    if isinstance(plot_paths, Mapping):
        return {str(k): Path(v) for k, v in plot_paths.items()}
    items: dict[str, Path] = {}
    for entry in plot_paths:
        path = Path(entry.path if isinstance(entry, PlotInfo) else entry)
        items[path.stem] = path
    return items


def push_leaderboard(
    table: pd.DataFrame,
    plot_paths: Iterable[PlotInfo | Path | str] | Mapping[str, Path | str],
    project: str = "kvbench",
    mode: str = "online",
    entity: str | None = None,
    group: str | None = None,
    name: str = "leaderboard",
    directory: str | Path | None = None,
    html_path: str | Path | None = None,
) -> str | None:
    """Log the leaderboard table, per-block score grids and plots into one run; return its local dir.

    Returns None (after a warning from ``start_run``) when no W&B run could be started, so a CLI can
    still finish writing its local files, and in ``disabled`` mode (which writes nothing).
    """
    if mode == "disabled":
        return None
    run = start_run(
        project=project,
        mode=mode,
        entity=entity,
        group=group,
        name=name,
        directory=directory,
        config={"num_runs": int(len(table)), "datasets": sorted(set(table.get("dataset", [])))},
        job_type="leaderboard",
        tags=["leaderboard"],
    )
    if run is None:
        return None
    try:
        import wandb

        payload: dict[str, object] = {"leaderboard": predictions_table(table)}
        for dataset, model in blocks(table):
            grid = score_grid(table, dataset, model).reset_index()
            payload[f"grid/{dataset}/{model}"] = wandb.Table(dataframe=grid)
        for key, path in _plot_items(plot_paths).items():
            if path.is_file():
                payload[f"plots/{key}"] = wandb.Image(str(path))
        if html_path is not None and Path(html_path).is_file():
            payload["leaderboard_page"] = wandb.Html(Path(html_path).read_text(encoding="utf-8"))
        run.log(payload)
        summary = {"num_runs": int(len(table))}
        for dataset, model in blocks(table):
            block = block_rows(table, dataset, model)
            block = block[block["press"] != NO_PRESS]
            if block.empty:
                continue
            # Runs of one setting only (the block's most common one): a quick run at another context length or
            # on other tasks answers another question.
            counts = block["setting"].value_counts(sort=False)
            block = block[block["setting"] == max(dict.fromkeys(block["setting"]), key=counts.get)]
            full = block[~block["smoke"].astype(bool)]
            block = full if len(full) else block  # a smoke run is the best only of smoke runs
            higher = bool(block["higher_is_better"].iloc[0])
            best = block.loc[block["score"].idxmax() if higher else block["score"].idxmin()]
            # Best *compressed* cell: the uncompressed reference would trivially win most blocks.
            summary[f"best/{dataset}/{model}/score"] = float(best["score"])
            summary[f"best/{dataset}/{model}/label"] = f"{best['label']} @ {best['ratio_label']}"
        run.summary.update(summary)
        return str(getattr(run, "dir", "") or "") or None
    finally:
        run.finish()
