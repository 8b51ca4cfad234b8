"""Compressed cache layers: fewer stored tokens, same positions.

After compression a layer stores ``n_kept`` tokens but the sequence is still ``L`` long. ``CompressedLayer``
reports the logical length (so later tokens get positions L, L+1, ... whether or not the caller passes
them) and tells the mask builders the physical length with an offset of ``L - n_kept`` (so causal masks
over new tokens stay exact). Head-adaptive selections keep a per-head ``head_mask`` over the compressed
part, applied by ``kvbench.compression.head_mask``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.presses.selection import Selection, topk_positions


class CompressedLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, removed: int, head_mask: torch.Tensor | None = None):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.removed = removed
        self.head_mask = head_mask  # [batch, kv_heads, n_compressed] bool for head-adaptive layers, else None

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.removed

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.4 passes the new tokens' cache positions, later releases their count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.keys.shape[-2] + query_length, self.removed

    def kept_pairs(self) -> int:
        """(head, token) pairs a query can attend to; below the stored count for head-adaptive layers."""
        b, h, n, _ = self.keys.shape
        hidden = 0 if self.head_mask is None else int((~self.head_mask).sum())
        return b * h * n - hidden


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def compress_layer(keys: torch.Tensor, values: torch.Tensor, chosen: Selection) -> CompressedLayer:
    """Store only what the selection keeps. Head-adaptive: each head's tokens padded to the largest
    per-head count, the padding hidden by the head mask."""
    seq_len = keys.shape[-2]
    head_mask = None
    if chosen.head_adaptive:
        counts = chosen.mask.sum(dim=-1)
        indices = topk_positions(chosen.mask.to(keys.dtype), int(counts.max()))
        # Kept even when all True: layers of one model then differ in stored length, and only a per-layer
        # mask (not the model's shared one) gets each layer's length right.
        head_mask = chosen.mask.gather(-1, indices)
    else:
        indices = chosen.indices
    return CompressedLayer(_gather(keys, indices), _gather(values, indices), seq_len - indices.shape[-1], head_mask)


def layer_of(cache, layer_idx: int):
    if isinstance(cache, Cache) and layer_idx < len(cache.layers):
        return cache.layers[layer_idx]
    return None


def kv_bytes(cache: Cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def stored_lengths(cache: Cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def truncate(cache: Cache, lengths: list[int]) -> None:
    """Drop everything appended after ``stored_lengths`` was taken (restores a shared compressed context)."""
    for layer, n in zip(cache.layers, lengths):
        layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
