"""Needle retrieval score and the length x depth heatmap.

A sample scores the share (0-100) of the needle's key phrases that appear in the prediction,
case-insensitively and ignoring runs of whitespace. Partial credit keeps the grid informative for small
models that recall "Dolores Park" but not the sandwich, where exact match would show only zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kvbench.errors import KVBenchError
from kvbench.metrics.answer_lists import text_list

HEATMAP_FILE = "needle_heatmap.png"


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def keyword_score(prediction: str, answers: Sequence[str]) -> float:
    """Percentage of ``answers`` (key phrases) contained in ``prediction``."""
    phrases = [_normalize(str(a)) for a in answers if str(a).strip()]
    if not phrases:
        raise KVBenchError("a needle sample has no answers (key phrases) to look for; check dataset.answers")
    text = _normalize(str(prediction or ""))
    return 100.0 * sum(phrase in text for phrase in phrases) / len(phrases)


def _label(value: float) -> str:
    return f"{float(value):g}"


def _scored(predictions: pd.DataFrame) -> pd.DataFrame:
    missing = {"prediction", "answers", "context_length", "depth"} - set(predictions.columns)
    if missing:
        raise KVBenchError(f"needle predictions lack column(s) {', '.join(sorted(missing))}; score the output of the needle dataset")
    if predictions.empty:
        raise KVBenchError("no needle predictions to score; check that the run produced outputs")
    scores = [keyword_score(p, text_list(a)) for p, a in zip(predictions["prediction"], predictions["answers"], strict=True)]
    return pd.DataFrame(
        {
            "context_length": predictions["context_length"].astype(int).to_numpy(),
            "depth": predictions["depth"].astype(float).to_numpy(),
            "sample_score": scores,
        }
    )


def compute(predictions: pd.DataFrame) -> dict:
    """Mean keyword score, plus per cell, per length and per depth means (keys are strings for JSON)."""
    scored = _scored(predictions)
    per_cell: dict[str, dict[str, float]] = {}
    for (length, depth), group in scored.groupby(["context_length", "depth"], sort=True):
        per_cell.setdefault(str(int(length)), {})[_label(depth)] = float(group["sample_score"].mean())
    per_length = {str(int(k)): float(v) for k, v in scored.groupby("context_length")["sample_score"].mean().items()}
    per_depth = {_label(k): float(v) for k, v in scored.groupby("depth")["sample_score"].mean().items()}
    return {
        "score": float(scored["sample_score"].mean()),
        "per_cell": per_cell,
        "per_length": per_length,
        "per_depth": per_depth,
        "num_samples": int(len(scored)),
    }


def write_artifacts(predictions: pd.DataFrame, run_dir: Path) -> None:
    """Draw ``needle_heatmap.png``: depth down the rows, context length across, score as colour and text.

    Uses the object-oriented Figure API with the Agg canvas so that no global pyplot backend is touched
    (safe inside Hydra multirun workers and headless machines).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = _scored(predictions)
    grid = scored.pivot_table(index="depth", columns="context_length", values="sample_score", aggfunc="mean").sort_index()
    figure = Figure(figsize=(1.2 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 1.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns])
    axes.set_yticks(range(grid.shape[0]), [f"{_label(d)}%" for d in grid.index])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    axes.set_title(f"Needle retrieval (mean {scored['sample_score'].mean():.1f})")
    for row in range(grid.shape[0]):
        for column in range(grid.shape[1]):
            value = grid.iat[row, column]
            if pd.notna(value):
                colour = "white" if value >= 85 or value <= 15 else "black"  # legible on the dark ends of RdYlGn
                axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=9, color=colour)
    figure.colorbar(image, ax=axes, label="score (% of key phrases recalled)")
    figure.tight_layout()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(run_dir / HEATMAP_FILE)
