"""Scoring: one module per benchmark, each exposing ``compute(predictions: DataFrame) -> dict``.

The dict is JSON-able and always holds a headline ``score`` plus its breakdown. A module may also define
``write_artifacts(predictions, run_dir)`` for per-run figures (e.g. the needle heatmap).
"""

from __future__ import annotations

import importlib

METRICS = {
    "ruler": "kvbench.metrics.ruler",
    "longbench_e": "kvbench.metrics.longbench",
    "pg19": "kvbench.metrics.perplexity",
    "needle": "kvbench.metrics.needle",
}


def metrics_module(name: str):
    return importlib.import_module(METRICS[name])
