"""Observed attention (the H2O family, arXiv:2306.14048): keep the keys that the context's queries attended to.

A key's score is the mean attention it received from the queries that could see it (causal: key ``j`` of ``L``
is seen by ``L - j`` queries), averaged over the query heads sharing its KV head. That is the attention the
layer actually computed, so the press needs the attention weights: only eager attention returns them.
kvpress' ObservedAttentionPress (the reference) scores once at the end of the prefill with this normalisation;
H2O itself accumulates the sums while generating, which a prefill-only press cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KVBenchError
from kvbench.presses.base import LayerState, Press


@dataclass
class ObservedAttentionPress(Press):
    """Mean attention each key received during the prefill (needs ``model.attn_implementation=eager``)."""

    # The runner checks this before the model loads: the press cannot score under sdpa or flash attention.
    needs_attention_weights: ClassVar[bool] = True

    def score(self, state: LayerState) -> torch.Tensor:
        weights = state.attention_weights
        if weights is None:
            raise KVBenchError("observed_attention needs the attention weights, which only eager attention returns; "
                               "set model.attn_implementation=eager")
        b, kv_heads, seq_len, _ = state.keys.shape
        received = weights.float().sum(dim=2)  # [batch, heads, seq]
        viewers = torch.arange(seq_len, 0, -1, device=received.device, dtype=received.dtype)
        return (received / viewers).view(b, kv_heads, -1, seq_len).mean(dim=2)
