"""Answer lists as the scorers read them, whether the predictions are still in memory or were read back from a
``predictions.csv``, where ``results.serialise_predictions`` stored every list as JSON text."""

from __future__ import annotations

import json
from typing import Any


def text_list(value: Any) -> list[str]:
    """The strings of ``value``: a list, tuple or array; the JSON list text a ``predictions.csv`` holds (read as one
    string, it was scored as one answer, or letter by letter); a lone string as one item."""
    if isinstance(value, str):
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return [str(item) for item in parsed]
        return [value]
    return [str(item) for item in value]
