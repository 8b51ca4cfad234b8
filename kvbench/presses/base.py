"""The press contract: a press scores one layer's prefill state; selection turns scores into kept tokens.

Scoring is a pure function of ``LayerState`` (captured at the end of a layer's prefill), and prefill hidden
states do not depend on compression, so one prefill could serve many (press, ratio) pairs. Presses never
touch hooks or caches: ``kvbench.compression`` captures the state, calls ``score`` then ``select``, and
rewrites the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from kvbench import model_access
from kvbench.errors import KVBenchError
from kvbench.presses import selection


@dataclass
class LayerState:
    """One layer at the end of prefill. Keys/values are post-RoPE, ``[batch, kv_heads, seq, head_dim]``."""

    module: nn.Module
    layer_idx: int
    hidden_states: torch.Tensor  # the attention input (after the layer's input norm), [batch, seq, hidden]
    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor  # rotary tables of the context positions, [batch, seq, rotary_dim]
    sin: torch.Tensor
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions [1, n] -> (cos, sin) [1, n, r]
    # softmax attention of every context query, [batch, heads, seq, seq]: only when the attention implementation
    # returns it (eager); None under sdpa / flash attention
    attention_weights: torch.Tensor | None = None
    # post-RoPE queries of every context token, [batch, heads, seq, head_dim], as the attention computed them
    # during the prefill (kvbench.compression.query_capture); None when they were not captured
    queries: torch.Tensor | None = None
    # the factor cos/sin carry on top of the rotation (model_access.rope_scale): 1 but for YaRN / LongRoPE
    rope_scale: float = 1.0

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    def context_queries(self, positions: slice = slice(None)) -> torch.Tensor:
        """Post-RoPE queries of the context ``positions``: the captured ones, else projected again."""
        if self.queries is not None:
            return self.queries[:, :, positions]
        return model_access.queries(self.module, self.hidden_states[:, positions], self.cos[:, positions],
                                    self.sin[:, positions])

    def pre_rope_queries(self, positions: slice = slice(None)) -> torch.Tensor:
        """Queries before RoPE: the captured ones rotated back (cheaper than projecting again), else projected."""
        if self.queries is not None:
            return model_access.unrotate(self.queries[:, :, positions], self.cos[:, positions], self.sin[:, positions],
                                         self.rope_scale)
        return model_access.pre_rope_queries(self.module, self.hidden_states[:, positions])

    def pre_rope_keys(self, positions: slice = slice(None)) -> torch.Tensor:
        """Keys before RoPE, the cached keys rotated back (what the key projection and its norm gave)."""
        return model_access.unrotate(self.keys[:, :, positions], self.cos[:, positions], self.sin[:, positions],
                                     self.rope_scale)


# Seeds up to 2^32 - 1, as numpy takes them: with a layer index added they stay within torch's 64-bit seeds.
SEED_LIMIT = 2**32 - 1


def require_int(press: object, name: str, low: int, high: int | None = None) -> None:
    """A count parameter: an integer (not a bool) in ``[low, high]`` (``high=None``: no upper end), else one line
    naming it and its range.

    Out-of-range counts do not fail where they are read: a window of 0 crashes mid-prefill, zero future
    positions give NaN scores, a negative sink count silently keeps other tokens. So they are refused here.
    """
    value = getattr(press, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise KVBenchError(f"press parameter {name} must be an integer {span}, got {value!r}")


def require_seed(press: object, name: str = "seed") -> None:
    """A seed torch takes for every layer (``seed + layer_idx``): a larger one passed this check and failed in the
    first prefill, after the model had loaded."""
    require_int(press, name, 0, SEED_LIMIT)


def require_number(press: object, name: str, low: float, high: float | None = None) -> None:
    """A finite real parameter in ``[low, high]`` (``high=None``: no upper end); bools and strings are refused, and
    so is infinity (an infinite epsilon or blending makes every score infinite: the kept tokens would be arbitrary)."""
    value = getattr(press, name)
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (high is not None and value > high):
        span = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise KVBenchError(f"press parameter {name} must be a number {span}, got {value!r}")


def require_bool(press: object, name: str) -> None:
    value = getattr(press, name)
    if not isinstance(value, bool):
        raise KVBenchError(f"press parameter {name} must be true or false, got {value!r}")


@dataclass
class Press:
    """Base press: uniform top-k selection of ``score``; subclasses override ``score`` only.

    ``compression_ratio`` is the fraction of context KV pairs removed; ``budget`` (tokens kept per head,
    SnapKV's ``max_capacity_prompt``) overrides it when set.
    """

    compression_ratio: float = 0.0
    budget: int | None = None

    head_adaptive: ClassVar[bool] = False

    def __post_init__(self) -> None:
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise KVBenchError(f"compression_ratio must be a number in [0, 1), got {ratio!r}")
        if self.budget is not None:
            require_int(self, "budget", 1)

    def n_kept(self, seq_len: int) -> int:
        if self.budget is not None:
            return min(int(self.budget), seq_len)
        return int(seq_len * (1.0 - self.compression_ratio))

    def is_noop(self, seq_len: int) -> bool:
        return self.n_kept(seq_len) >= seq_len

    @property
    def window(self) -> int | None:
        """Trailing context tokens the press always keeps (an observation window), or None when it has none.

        The runner asks this (it never reads a press' fields) to flag contexts no longer than the window,
        where the press cannot compress.
        """
        return None

    @property
    def rerotates_keys(self) -> bool:
        """True when the kept keys are re-rotated to the contiguous positions 0..n_kept-1, so the cache forgets
        the removed tokens and later tokens continue at position n_kept (StreamingLLM's rolling cache)."""
        return False

    def score(self, state: LayerState) -> torch.Tensor:
        """Return ``[batch, kv_heads, seq]`` scores, higher = keep."""
        raise KVBenchError(f"{type(self).__name__} defines no score; subclass Press and implement score()")

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        return selection.uniform(scores, n_kept)
