"""RULER scoring (Hsieh et al., 2024): case-insensitive substring recall, reported on a 0-100 scale.

Substring matching rather than exact match lets a model answer in a sentence; RULER requires every reference
for the retrieval, tracking and aggregation tasks ("all") but any one for QA, whose references are
alternative phrasings of a single answer ("part"). The headline score averages tasks, not samples, so a
task with more samples does not weigh more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from kvbench.errors import KVBenchError


def _references(references: Iterable[str] | str) -> list[str]:
    # A lone string would otherwise be scored character by character.
    return [references] if isinstance(references, str) else [str(r) for r in references]


def _found(prediction: str, references: Iterable[str] | str) -> list[bool]:
    text = (prediction or "").lower()
    return [reference.lower() in text for reference in _references(references)]


def string_match_all(prediction: str, references: list[str]) -> float:
    """Percentage of references found in the prediction (0 when there are none)."""
    found = _found(prediction, references)
    return 100.0 * sum(found) / len(found) if found else 0.0


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is found in the prediction, else 0."""
    return 100.0 if any(_found(prediction, references)) else 0.0


def score_task(task: str, prediction: str, answers: list[str]) -> float:
    """RULER's per-task rule: QA tasks accept any reference, every other task needs all of them."""
    scorer = string_match_part if task.startswith("qa") else string_match_all
    return scorer(prediction, answers)


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def compute(predictions: pd.DataFrame) -> dict:
    """``{"score", "per_task", "num_samples"}``; needs columns ``task``, ``prediction`` and ``answers``."""
    missing = {"task", "prediction", "answers"} - set(predictions.columns)
    if missing:
        raise KVBenchError(f"RULER scoring needs the column(s) {', '.join(sorted(missing))} in the predictions")
    if predictions.empty:
        return {"score": 0.0, "per_task": {}, "num_samples": 0}
    triples = zip(predictions["task"], predictions["prediction"], predictions["answers"])
    scores = pd.Series([score_task(str(t), _text(p), a) for t, p, a in triples], index=predictions.index)
    per_task = scores.groupby(predictions["task"].astype(str), sort=False).mean()
    return {
        "score": float(per_task.mean()),
        "per_task": {str(task): float(value) for task, value in per_task.items()},
        "num_samples": int(len(predictions)),
    }
