"""TOVA (arXiv:2401.06104): the attention of the last token decides which earlier tokens stay.

TOVA treats the cache as a fixed set of slots and evicts, at each step, the token the newest query attends to
least, with one policy per layer (attention averaged over all query heads). At the end of a prefill this is one
ranking: the last context token's attention over the earlier ones, averaged over the layer's query heads, the
same for every KV head. The last token itself is always kept (kvpress does so too; TOVA does not force it, but
a token's attention to itself is usually the largest, so it would stay anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.presses.base import LayerState, Press
from kvbench.presses.snapkv import window_votes


def last_query_attention(state: LayerState) -> torch.Tensor:
    """Softmax attention of the last context query over every context key, ``[batch, heads, seq]`` (fp32).

    Read from the attention weights when the implementation returned them (eager), else recomputed from the
    last hidden state, exactly as the layer computed it.
    """
    if state.attention_weights is not None:
        return state.attention_weights[:, :, -1].float()
    votes = window_votes(state, 1)  # [batch, kv_heads, group, seq]
    return votes.flatten(1, 2)


@dataclass
class TOVAPress(Press):
    """TOVA: keep the tokens the last context token attends to most (head-averaged: one ranking per layer)."""

    def score(self, state: LayerState) -> torch.Tensor:
        b, kv_heads, seq_len, _ = state.keys.shape
        scores = last_query_attention(state).mean(dim=1, keepdim=True).expand(b, kv_heads, seq_len).clone()
        scores[..., -1] = float("inf")  # the last token is always kept
        return scores
