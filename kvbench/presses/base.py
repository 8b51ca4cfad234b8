"""The press contract: a press scores one layer's prefill state; selection turns scores into kept tokens.

Scoring is a pure function of ``LayerState`` (captured at the end of a layer's prefill), and prefill hidden
states do not depend on compression, so one prefill could serve many (press, ratio) pairs. Presses never
touch hooks or caches: ``kvbench.compression`` captures the state, calls ``score`` then ``select``, and
rewrites the cache.
"""

from __future__ import annotations

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
            return model_access.unrotate(self.queries[:, :, positions], self.cos[:, positions], self.sin[:, positions])
        return model_access.pre_rope_queries(self.module, self.hidden_states[:, positions])

    def pre_rope_keys(self, positions: slice = slice(None)) -> torch.Tensor:
        """Keys before RoPE, the cached keys rotated back (what the key projection and its norm gave)."""
        return model_access.unrotate(self.keys[:, :, positions], self.cos[:, positions], self.sin[:, positions])


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
        if not 0.0 <= float(self.compression_ratio) < 1.0:
            raise KVBenchError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.budget is not None and int(self.budget) < 1:
            raise KVBenchError(f"budget must be a positive number of tokens, got {self.budget}")

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
