"""Scoring: one module per benchmark, each exposing ``compute(predictions: DataFrame) -> dict``.

The dict is JSON-able and always holds a headline ``score`` plus its breakdown. A module may also define
``write_artifacts(predictions, run_dir)`` for per-run figures (e.g. the needle heatmap).

A dataset is scored by the metrics module of the same file name (``kvbench.datasets.ruler`` ->
``kvbench.metrics.ruler``) unless its module names another in ``METRICS`` (PG-19 -> ``perplexity``), so
this package keeps no second list of benchmark names.
"""

from __future__ import annotations

import importlib

from kvbench.datasets import dataset_module


def metrics_module(name: str):
    """The metrics module that scores dataset ``name`` (unknown names fail in the dataset registry)."""
    module = dataset_module(name)
    return importlib.import_module(f"kvbench.metrics.{getattr(module, 'METRICS', module.__name__.rsplit('.', 1)[-1])}")
