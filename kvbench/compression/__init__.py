"""The plumbing that applies presses inside a model. It never knows which press it runs.

``compress(model, press)`` hooks every attention module; when a module has just filled an empty cache layer
(the context prefill), it captures the layer's state, asks the press for scores and a selection, and swaps
the cache layer for a compressed one. Later calls (questions, generated tokens) append to that layer and are
never compressed.

``compress_into(model, targets)`` is the same with several presses at once: prefill hidden states do not depend
on compression, so one prefill fills one compressed cache per (press, ratio) target.

Batches: ``lengths`` gives each right-padded context's real length. Each context is scored on its own slice
of the layer state (what a press sees is then exactly what it sees at batch size 1: padding never reaches
a score), and the batch is stored packed, each (context, head) with its own count.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache

from kvbench import model_access
from kvbench.compression import head_mask, query_capture
from kvbench.compression.cache import (
    CompressedLayer,
    PackedLayer,
    TailValidity,
    compress_layer,
    layer_bytes,
    layer_of,
    pack_layer,
)
from kvbench.device import synchronize
from kvbench.errors import KVBenchError
from kvbench.models import check_supported
from kvbench.presses.base import LayerState, Press
from kvbench.presses.selection import Selection, mask_from_indices

LAYOUTS = ("packed", "masked")


@dataclass
class CompressionStats:
    """What one compressed prefill cost and saved (bytes: every tensor the layers hold)."""

    seconds: float = 0.0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    layers: int = 0
    context_length: int = 0
    kept_pairs: int = 0
    total_pairs: int = 0
    # A right-padded batch: each context's real length and kept (head, token) pairs over the layers, so every
    # context is reported as its solo run would be (the padding counted for none of them).
    context_lengths: list[int] = field(default_factory=list)
    kept_per_context: list[int] = field(default_factory=list)


@dataclass
class Target:
    """One press to apply during a prefill, and the cache its compressed layers go to (None: the cache the
    model was called with, compressed in place)."""

    press: Press
    cache: Cache | None = None
    stats: CompressionStats = field(default_factory=CompressionStats)
    tail_validity: TailValidity | None = None


def slice_state(state: LayerState, index: int, length: int) -> LayerState:
    """One context of a right-padded batch, without its padding."""
    weights = state.attention_weights
    return LayerState(
        module=state.module,
        layer_idx=state.layer_idx,
        hidden_states=state.hidden_states[index : index + 1, :length],
        keys=state.keys[index : index + 1, :, :length],
        values=state.values[index : index + 1, :, :length],
        cos=state.cos[min(index, state.cos.shape[0] - 1)][None, :length],
        sin=state.sin[min(index, state.sin.shape[0] - 1)][None, :length],
        rotary=state.rotary,
        attention_weights=None if weights is None else weights[index : index + 1, :, :length, :length],
        queries=None if state.queries is None else state.queries[index : index + 1, :, :length],
        rope_scale=state.rope_scale,
    )


def _kept_mask(chosen: Selection, seq_len: int) -> torch.Tensor:
    return chosen.mask if chosen.head_adaptive else mask_from_indices(chosen.indices, seq_len)


def _select(press: Press, state: LayerState) -> Selection:
    with torch.no_grad():
        return press.select(press.score(state), state, press.n_kept(state.seq_len))


def rerotate(keys: torch.Tensor, kept: torch.Tensor, rotary, scale: float = 1.0) -> torch.Tensor:
    """Keys moved to contiguous positions: a kept key at position p becomes the key at its rank among the kept
    (RoPE composes, so rotating by rank - p does it; dims past the rotary ones are untouched). The keys already
    carry the tables' ``scale`` (YaRN, LongRoPE) once, so the extra rotation is by the unscaled tables."""
    b, h, seq_len, d = keys.shape
    new_positions = kept.long().cumsum(-1) - 1
    delta = new_positions - torch.arange(seq_len, device=keys.device)
    cos, sin = rotary(delta.reshape(1, -1))
    if scale != 1.0:
        cos, sin = cos / scale, sin / scale
    cos, sin = cos.view(b * h, seq_len, -1), sin.view(b * h, seq_len, -1)
    rotated = model_access.apply_rope(keys.reshape(b * h, 1, seq_len, d), cos, sin)  # one rotation table per head
    return rotated.view(b, h, seq_len, d)


def rotary_tables(rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of any ``positions`` (future ones, or re-rotation offsets), leaving the model's rotary module as it was.

    Dynamic RoPE grows its frequencies for good once asked for a position past what it has cached, and LongRoPE
    switches its factors by the largest position asked for: a press looking 512 positions ahead would otherwise
    change the rotations the model's own decoding uses. Its state is put back afterwards (``RotaryState``).
    """
    state = model_access.RotaryState([rotary])
    try:
        return rotary(like, positions)
    finally:
        state.restore()


def _compressed_layer(press: Press, state: LayerState, layout: str) -> CompressedLayer | PackedLayer:
    """One context (batch size 1): the dense layout for uniform selections, packed or masked for head-adaptive."""
    seq_len = state.seq_len
    if press.is_noop(seq_len):
        return CompressedLayer(state.keys, state.values, 0)
    chosen = _select(press, state)
    keys = state.keys
    if press.rerotates_keys:
        if chosen.head_adaptive:
            raise KVBenchError(f"{type(press).__name__}: key re-rotation needs the same kept count in every head; "
                               f"drop it for head-adaptive selections")
        keys = rerotate(keys, _kept_mask(chosen, seq_len), state.rotary, state.rope_scale)
    if chosen.head_adaptive and layout == "packed":
        return pack_layer(keys, state.values, chosen.mask, seq_len)
    layer = compress_layer(keys, state.values, chosen)
    if press.rerotates_keys:
        layer.removed = 0  # later tokens continue right after the kept ones
    return layer


def _packed_batch(press: Press, state: LayerState, lengths: list[int], validity: TailValidity) -> PackedLayer:
    """A right-padded batch: each context selected on its own slice, all stored packed."""
    b, h, seq_len, _ = state.keys.shape
    kept = torch.zeros(b, h, seq_len, dtype=torch.bool, device=state.keys.device)
    keys = state.keys
    for i, length in enumerate(lengths):
        if press.is_noop(length):
            kept[i, :, :length] = True
            continue
        chosen = _select(press, slice_state(state, i, length))
        kept[i, :, :length] = _kept_mask(chosen, length)[0]
    if press.rerotates_keys:
        keys = rerotate(keys, kept, state.rotary, state.rope_scale)
    return pack_layer(keys, state.values, kept, seq_len, validity)


def _capture_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before a prefill into an empty layer: keep the queries the module computes (``query_capture``)."""
    layer = layer_of(model_access.cache_from_kwargs(kwargs), module.layer_idx)
    if isinstance(layer, (CompressedLayer, PackedLayer)):
        return
    if layer is None or layer.keys is None or layer.keys.shape[-2] == 0:
        query_capture.route(module)


def _compress_hook(module: nn.Module, args: tuple, kwargs: dict, output, *, targets: list[Target],
                   lengths: list[int] | None, layout: str, rotary: nn.Module):
    queries = query_capture.take(module)
    cache = model_access.cache_from_kwargs(kwargs)
    layer = layer_of(cache, module.layer_idx)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    seq_len = hidden.shape[1]
    if layer is None or isinstance(layer, (CompressedLayer, PackedLayer)) or layer.keys is None or layer.keys.shape[-2] != seq_len:
        return None  # not a prefill into an empty layer: questions and decoding are never compressed
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor) else None
    cos, sin = kwargs["position_embeddings"]
    state = LayerState(
        module=module,
        layer_idx=module.layer_idx,
        hidden_states=hidden,
        keys=layer.keys,
        values=layer.values,
        cos=cos,
        sin=sin,
        rotary=partial(rotary_tables, rotary, hidden),
        attention_weights=weights,
        queries=queries if queries is not None and queries.shape[-2] == seq_len else None,
        rope_scale=model_access.rope_scale(rotary),
    )
    before = layer_bytes(layer)
    for target in targets:
        if lengths is None and target.cache is None and target.press.is_noop(seq_len):
            # Nothing to remove: the same tensors, in a layer that decodes exactly as the compressed ones do (appends in
            # place), so an uncompressed baseline is timed on the same cache implementation as the presses.
            cache.layers[module.layer_idx] = CompressedLayer(layer.keys, layer.values, 0)
            continue
        synchronize(hidden.device)
        start = time.perf_counter()
        if lengths is None:
            compressed = _compressed_layer(target.press, state, layout)
        else:
            compressed = _packed_batch(target.press, state, lengths, target.tail_validity)
        synchronize(hidden.device)
        stats = target.stats
        stats.seconds += time.perf_counter() - start
        stats.layers += 1
        stats.context_length = seq_len
        stats.kv_bytes_before += before
        stats.kv_bytes_after += layer_bytes(compressed)
        stats.kept_pairs += compressed.kept_pairs()
        stats.total_pairs += layer.keys.shape[1] * (sum(lengths) if lengths is not None else layer.keys.shape[0] * seq_len)
        if lengths is not None:
            per_context = compressed.lengths.sum(dim=-1).tolist()
            stats.context_lengths = list(lengths)
            stats.kept_per_context = [a + int(b) for a, b in zip(stats.kept_per_context or [0] * len(lengths), per_context)]
        (target.cache if target.cache is not None else cache).layers[module.layer_idx] = compressed
    if all(target.cache is not None for target in targets):
        # Nothing reads this layer of the prefill's own cache again: free it now, not at the end of the prefill.
        # (cloned: an empty slice of the old tensors would keep their storage alive)
        cache.layers[module.layer_idx] = CompressedLayer(layer.keys[..., :0, :].clone(), layer.values[..., :0, :].clone(), seq_len)
    return None


@contextmanager
def compress_into(model: nn.Module, targets: list[Target], *, lengths: list[int] | None = None,
                  layout: str = "packed") -> Iterator[list[Target]]:
    """Compress the cache filled by the first (prefill) call made inside the block, once per target.

    ``lengths``: real lengths of a right-padded batch (every layer then stored packed). ``layout``: how
    head-adaptive selections are stored, ``packed`` (per-head counts) or ``masked`` (padded to the longest
    head, for comparison). Yields the targets, whose stats fill in as layers are compressed.
    """
    if layout not in LAYOUTS:
        raise KVBenchError(f"unknown cache layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    if lengths is not None and layout != "packed":
        raise KVBenchError("a batch of contexts needs cache_layout=packed (per-context lengths); use batch_size=1 for masked")
    check_supported(model.config)
    modules = head_mask.attention_modules(model)
    rotary = model_access.find_rotary_embedding(model)
    head_mask.install(model)
    if lengths is not None:
        for target in targets:
            target.tail_validity = TailValidity(len(lengths), model.device)
    query_capture.register()
    hook = partial(_compress_hook, targets=targets, lengths=lengths, layout=layout, rotary=rotary)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    handles += [m.register_forward_pre_hook(_capture_hook, with_kwargs=True) for m in modules]
    try:
        yield targets
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            query_capture.take(module)  # a prefill that raised mid-layer leaves its routing and queries behind


@contextmanager
def compress(model: nn.Module, press: Press, *, lengths: list[int] | None = None,
             layout: str = "packed") -> Iterator[CompressionStats]:
    """Compress the cache filled by the first (prefill) call made inside the block; yields its stats."""
    with compress_into(model, [Target(press)], lengths=lengths, layout=layout) as targets:
        yield targets[0].stats


__all__ = ["compress", "compress_into", "Target", "CompressionStats", "CompressedLayer", "PackedLayer", "LAYOUTS"]
