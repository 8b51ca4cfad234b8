"""Compressed cache layers: fewer stored tokens, same positions.

Two layouts, both keeping the sequence ``L`` tokens long for position purposes:

- ``CompressedLayer`` (dense): every head keeps the same number of tokens, ``[batch, kv_heads, n_kept, dim]``.
  It reports the logical length (so later tokens get positions L, L+1, ...) and tells the mask builders the
  physical length with an offset of ``L - n_kept``, so the model's own attention (eager, sdpa, flash) runs
  unchanged. With ``head_mask`` it is the *masked* head-adaptive layout: each head padded to the layer's
  longest head, the padding hidden by a per-head mask (kept for comparison; it stores up to the longest
  head's count for every head).
- ``PackedLayer``: each (sequence, head) keeps its own count. The compressed context is one packed block
  ``[sum of counts, dim]`` with per-(sequence, head) ``lengths``; tokens that arrive later go to a dense
  ``[batch, kv_heads, T, dim]`` tail (``keys``/``values``, appended to as in any dynamic layer), so nothing is
  re-packed per step. ``kvbench.compression.packed_attention`` attends to both parts and merges them by
  log-sum-exp. It serves head-adaptive presses and batches of contexts of different lengths.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.presses.selection import Selection, topk_positions


class AppendBuffer:
    """Keys and values appended in place into spare capacity, not re-concatenated per token.

    transformers' dynamic layer concatenates the whole layer for every new token, so a decode step copies the entire
    cache (51 of 108 ms of a SmolLM2 step on the CPU at 2k tokens, profiled). Here ``keys``/``values`` are views of
    buffers that grow when full by a ``SPARE_DIVISOR``-th of the tokens a row of the layer stores (at least
    ``MIN_SPARE``): amortised, a token is copied at most ``SPARE_DIVISOR`` times, a fraction of the whole-cache read
    every step does anyway, and the spare space stays within a few percent of what the layer holds, so a compressed
    cache keeps the size it promised while it decodes (an eighth, at least 64 tokens, took a 1k context at r = 0.75
    from 0.25 to 0.31 of the uncompressed bytes). A buffer is appended to only while ``keys``/``values`` are still
    the very views it handed out; anything that reassigns them (a crop, ``truncate`` back to a shared context, a
    batch selection) makes the next append copy into a new buffer, so a tensor handed out before is never written
    over. The spare capacity is counted in ``layer_bytes`` (a storage is counted whole).
    """

    SPARE_DIVISOR = 32
    MIN_SPARE = 8

    def row_tokens(self, appended: int) -> int:
        """Tokens one (sequence, head) row of the layer stores once ``appended`` tokens are in its buffer."""
        return appended

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        n, added = self.keys.shape[-2], key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        handed_out = getattr(self, "_views", (None, None))
        if buffers is None or self.keys is not handed_out[0] or self.values is not handed_out[1] or n + added > buffers[0].shape[-2]:
            capacity = n + added + max(self.MIN_SPARE, self.row_tokens(n + added) // self.SPARE_DIVISOR)
            buffers = tuple(torch.empty(*x.shape[:-2], capacity, x.shape[-1], dtype=x.dtype, device=x.device)
                            for x in (self.keys, self.values))
            buffers[0][..., :n, :] = self.keys
            buffers[1][..., :n, :] = self.values
            self._buffers = buffers
        buffers[0][..., n : n + added, :] = key_states
        buffers[1][..., n : n + added, :] = value_states
        self.keys, self.values = buffers[0][..., : n + added, :], buffers[1][..., : n + added, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values


class CompressedLayer(AppendBuffer, DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, removed: int, head_mask: torch.Tensor | None = None):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.removed = removed
        self.head_mask = head_mask  # [batch, kv_heads, n_compressed] bool for the masked layout, else None

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.removed

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.4 passes the new tokens' cache positions, later releases their count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.keys.shape[-2] + query_length, self.removed

    def kept_pairs(self) -> int:
        """(head, token) pairs a query can attend to; below the stored count for the masked layout."""
        b, h, n, _ = self.keys.shape
        hidden = 0 if self.head_mask is None else int((~self.head_mask).sum())
        return b * h * n - hidden


class TailValidity:
    """Which tail slots hold real tokens, ``[batch, T]``, shared by every packed layer of one cache.

    Contexts of a batch get questions of different lengths; the shorter ones are left-padded in the tail and
    those slots must stay invisible to every later query. The generation loop appends one column per new token
    (``append``) before the forward call that writes them.
    """

    def __init__(self, batch: int, device: torch.device):
        self.valid = torch.ones(batch, 0, dtype=torch.bool, device=device)

    def append(self, valid: torch.Tensor) -> None:
        self.valid = torch.cat([self.valid, valid.to(self.valid.device, torch.bool)], dim=-1)

    def truncate(self, length: int) -> None:
        self.valid = self.valid[:, :length]


class PackedLayer(AppendBuffer, DynamicLayer):
    """A compressed context stored per (sequence, head): ``packed_keys``/``packed_values`` ``[N, dim]`` in
    (sequence, head, position) order, ``lengths`` ``[batch, kv_heads]`` tokens each; ``keys``/``values`` are
    the dense tail of tokens appended since. ``context_length`` is the logical length the positions of later
    tokens continue from (for batch size 1; batched callers pass position ids)."""

    def __init__(self, packed_keys: torch.Tensor, packed_values: torch.Tensor, lengths: torch.Tensor, context_length: int,
                 tail_validity: TailValidity | None = None):
        super().__init__()
        b, h = lengths.shape
        d_k, d_v = packed_keys.shape[-1], packed_values.shape[-1]
        self.packed_keys, self.packed_values, self.lengths = packed_keys, packed_values, lengths
        self.keys = packed_keys.new_empty(b, h, 0, d_k)
        self.values = packed_values.new_empty(b, h, 0, d_v)
        self.dtype, self.device = packed_keys.dtype, packed_keys.device
        self.is_initialized = True
        self.context_length = context_length
        self.tail_validity = tail_validity

    def get_seq_length(self) -> int:
        return self.context_length + self.keys.shape[-2]

    def row_tokens(self, appended: int) -> int:
        """The tail's tokens plus a row's share of the packed context: the spare space is sized against all the
        layer holds (the tail alone starts empty, so any minimum would dwarf it)."""
        return appended + self.packed_keys.shape[0] // max(1, self.lengths.numel())

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # The model's mask is not used for packed layers (packed_attention builds its own); these sizes only have
        # to be consistent for the mask builders: the tail plus the new tokens.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.keys.shape[-2] + query_length, 0

    def kept_pairs(self) -> int:
        return int(self.lengths.sum())

    def offsets(self) -> torch.Tensor:
        """Start of each (sequence, head) in the packed block, ``[batch, kv_heads]``."""
        flat = self.lengths.flatten()
        return (flat.cumsum(0) - flat).view_as(self.lengths)


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def compress_layer(keys: torch.Tensor, values: torch.Tensor, chosen: Selection) -> CompressedLayer:
    """Dense layout: store only what the selection keeps. Head-adaptive selections give the masked layout (each
    head's tokens padded to the largest per-head count, the padding hidden by the head mask)."""
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


def pack_layer(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, context_length: int,
               tail_validity: TailValidity | None = None) -> PackedLayer:
    """Packed layout from a ``[batch, kv_heads, seq]`` kept mask: boolean indexing walks (sequence, head, position)
    in order, which is exactly the packed order."""
    return PackedLayer(keys[kept], values[kept], kept.sum(dim=-1), context_length, tail_validity)


def layer_of(cache, layer_idx: int):
    if isinstance(cache, Cache) and layer_idx < len(cache.layers):
        return cache.layers[layer_idx]
    return None


def layer_bytes(layer) -> int:
    """Every tensor the layer holds: keys and values, and for compressed layers their masks, lengths, tails and append
    buffers. Memory is what is counted: a view counts its whole storage, and storages shared by several tensors once."""
    tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    tensors += [b for b in getattr(layer, "_buffers", None) or () if isinstance(b, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def kv_bytes(cache: Cache) -> int:
    """Bytes the cache holds, all tensors counted (the shared tail-validity mask once)."""
    total = sum(layer_bytes(layer) for layer in cache.layers if getattr(layer, "keys", None) is not None)
    validities = {id(v): v for v in (getattr(layer, "tail_validity", None) for layer in cache.layers) if v is not None}
    return total + sum(v.valid.nbytes for v in validities.values())


def stored_lengths(cache: Cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def truncate(cache: Cache, lengths: list[int]) -> None:
    """Drop everything appended after ``stored_lengths`` was taken (restores a shared compressed context)."""
    for layer, n in zip(cache.layers, lengths):
        layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        validity = getattr(layer, "tail_validity", None)
        if validity is not None:
            validity.truncate(n)
