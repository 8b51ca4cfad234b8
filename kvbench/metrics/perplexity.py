"""Perplexity of the evaluation tokens that follow a (possibly compressed) context window.

The headline pools all windows (exp of total NLL over total tokens), which weighs every token equally
and is what "perplexity on PG-19" usually means; the mean of per-window perplexities is reported too
because a press that fails badly on a few windows shows up there first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvbench.errors import KVBenchError

REQUIRED = ("id", "window", "nll_sum", "num_tokens")


def _perplexity(nll: float, tokens: int) -> float:
    return float(math.exp(nll / tokens))


def compute(predictions: pd.DataFrame) -> dict:
    """Pooled, per-window-mean and per-book perplexities from per-window summed NLLs (natural log)."""
    missing = [c for c in REQUIRED if c not in predictions.columns]
    if missing:
        raise KVBenchError(f"perplexity rows lack column(s) {', '.join(missing)}; score the per-window output of a perplexity run")
    scored = predictions[predictions["num_tokens"] > 0]
    if scored.empty:
        raise KVBenchError("no perplexity windows with evaluation tokens; make the books longer than context_length + eval_length")
    nll = scored["nll_sum"].astype(float)
    tokens = scored["num_tokens"].astype(int)
    pooled = _perplexity(float(nll.sum()), int(tokens.sum()))
    window_ppl = [_perplexity(n, t) for n, t in zip(nll, tokens, strict=True)]
    grouped = scored.assign(nll_sum=nll, num_tokens=tokens).groupby("id", sort=True)[["nll_sum", "num_tokens"]].sum()
    per_book = {str(book): _perplexity(float(row.nll_sum), int(row.num_tokens)) for book, row in grouped.iterrows()}
    return {
        "score": pooled,
        "perplexity": pooled,
        "mean_window_perplexity": float(sum(window_ppl) / len(window_ppl)),
        "per_book": per_book,
        "num_windows": int(len(scored)),
        "num_tokens": int(tokens.sum()),
    }


def _headline(metrics: Mapping[str, Any], label: str) -> float:
    value = metrics.get("perplexity", metrics.get("score"))
    if value is None:
        raise KVBenchError(f"the {label} metrics have no 'perplexity' or 'score'; pass the dict returned by perplexity.compute")
    return float(value)


def compare_to_baseline(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict:
    """Relate a compressed run to the uncompressed ("no press") run on the same windows.

    ``delta`` is the absolute increase and ``ratio`` the relative one; a ratio of 1.0 means compression
    cost nothing.
    """
    value = _headline(metrics, "run")
    reference = _headline(baseline, "baseline")
    if reference <= 0:
        raise KVBenchError(f"baseline perplexity must be positive, got {reference}; check the no-press run")
    return {"no_press_perplexity": reference, "delta": value - reference, "ratio": value / reference}
