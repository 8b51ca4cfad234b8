"""RULER scoring (Hsieh et al., 2024): case-insensitive substring recall, reported on a 0-100 scale.

Substring matching rather than exact match lets a model answer in a sentence; RULER requires every reference
for the retrieval, tracking and aggregation tasks ("all") but any one for QA, whose references are
alternative phrasings of a single answer ("part"). A task's figure is RULER's own (``scripts/eval``:
``round(sum(shares) / n * 100, 2)``, as kvpress' leaderboard also reports it) and RULER's summary counts the
empty predictions ("nulls") next to it. The headline score averages the task figures, not samples, so a task
with more samples does not weigh more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import pandas as pd

from kvbench.errors import KVBenchError
from kvbench.metrics.answer_lists import text_list

_CONTROL = re.compile(r"[\x00-\x1f]")


def _references(references: Iterable[str] | str) -> list[str]:
    return text_list(references)


def _found(prediction: str, references: Iterable[str] | str) -> list[bool]:
    text = (prediction or "").lower()
    return [reference.lower() in text for reference in _references(references)]


def _share_all(prediction: str, references: list[str]) -> float:
    found = _found(prediction, references)
    return sum(found) / len(found) if found else 0.0


def _share_part(prediction: str, references: list[str]) -> float:
    return 1.0 if any(_found(prediction, references)) else 0.0


def string_match_all(prediction: str, references: list[str]) -> float:
    """Percentage of references found in the prediction (0 when there are none)."""
    return 100.0 * _share_all(prediction, references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is found in the prediction, else 0."""
    return 100.0 * _share_part(prediction, references)


def _share(task: str, prediction: str, answers: list[str]) -> float:
    """RULER's per-task rule: QA tasks accept any reference, every other task needs all of them."""
    return (_share_part if task.startswith("qa") else _share_all)(prediction, answers)


def score_task(task: str, prediction: str, answers: list[str]) -> float:
    """One sample's score on the 0-100 scale, by its task's rule (:func:`_share`)."""
    return 100.0 * _share(task, prediction, answers)


def task_figure(shares: list[float]) -> float:
    """RULER's task score from the samples' shares in [0, 1]: summed in order, ``/ n * 100``, rounded to 2 places."""
    return round(sum(shares) / len(shares) * 100, 2)


def _postprocessed(prediction: str) -> str:
    """RULER's ``postprocess_pred``: stripped, control characters made newlines, stripped again. Substring matching
    of references (which hold no control characters) gives the same result on it as on the raw text, so only the
    null count reads it."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def compute(predictions: pd.DataFrame) -> dict:
    """``{"score", "per_task", "num_samples"}``; needs columns ``task``, ``prediction`` and ``answers``."""
    missing = {"task", "prediction", "answers"} - set(predictions.columns)
    if missing:
        raise KVBenchError(f"RULER scoring needs the column(s) {', '.join(sorted(missing))} in the predictions")
    if predictions.empty:
        return {"score": 0.0, "per_task": {}, "per_task_nulls": {}, "num_samples": 0}
    shares: dict[str, list[float]] = {}
    nulls: dict[str, int] = {}
    for task, prediction, answers in zip(predictions["task"], predictions["prediction"], predictions["answers"]):
        task, text = str(task), _text(prediction)
        shares.setdefault(task, []).append(_share(task, text, answers))
        nulls[task] = nulls.get(task, 0) + (not _postprocessed(text))
    per_task = {task: task_figure(values) for task, values in shares.items()}
    return {
        "score": float(sum(per_task.values()) / len(per_task)),
        "per_task": per_task,
        "per_task_nulls": nulls,
        "num_samples": int(len(predictions)),
    }
