"""KeyDiff (arXiv:2504.15364): keys that differ most from the average key carry the most distinct information.

Each key is scored by minus its cosine similarity to the anchor, the mean of the layer's unit-normalised keys
(per KV head): keys close to the anchor are redundant and go first. The paper evicts block by block while the
prompt streams in; kvpress' KeyDiffPress (the reference here) scores the whole prefilled context at once, and so
does this press. No attention is needed, so it works with every attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import LayerState, Press


def key_anchor_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every key to the mean unit key of its head, ``[batch, kv_heads, seq]``."""
    keys = keys.float()
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=-2, keepdim=True)
    return F.cosine_similarity(keys, anchor, dim=-1)


@dataclass
class KeyDiffPress(Press):
    """KeyDiff: keep the keys least similar (cosine) to the head's mean unit key."""

    def score(self, state: LayerState) -> torch.Tensor:
        return -key_anchor_similarity(state.keys)
