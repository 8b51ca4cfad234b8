"""Reading a dataset's config values the one way every benchmark module needs them: checked, with one error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvbench.errors import KVBenchError


def positive_int(cfg: Mapping[str, Any] | None, key: str, default: int | None, *, nullable: bool = False) -> int | None:
    """``dataset.<key>`` as a count: a positive integer, never a bool, a float or text (``int("2.5")`` would
    silently truncate, ``int("abc")`` raise a traceback). Null (or absent) is ``default``, or stays null where
    ``nullable`` (e.g. "every book", "every sample")."""
    value = cfg.get(key, None) if cfg is not None else None
    if value is None:
        if nullable:
            return None
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVBenchError(f"dataset.{key} must be a positive integer{' or null' if nullable else ''}, got {value!r}")
    return value
