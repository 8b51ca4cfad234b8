"""The plumbing that applies a press inside a model. It never knows which press it runs.

``compress(model, press)`` hooks every attention module; when a module has just filled an empty cache layer
(the context prefill), it captures the layer's state, asks the press for scores and a selection, and swaps
the cache layer for a ``CompressedLayer``. Later calls (questions, generated tokens) append to that layer
and are never compressed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from torch import nn

from kvbench import model_access
from kvbench.compression import head_mask
from kvbench.compression.cache import CompressedLayer, compress_layer, layer_of
from kvbench.device import synchronize
from kvbench.models import check_supported
from kvbench.presses.base import LayerState, Press


@dataclass
class CompressionStats:
    """What one compressed prefill cost and saved (bytes are the stored K/V tensors)."""

    seconds: float = 0.0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    layers: int = 0
    context_length: int = 0
    kept_pairs: int = 0
    total_pairs: int = 0


def _compress_hook(module: nn.Module, args: tuple, kwargs: dict, output, *, press: Press, stats: CompressionStats, rotary: nn.Module):
    cache = model_access.cache_from_kwargs(kwargs)
    layer = layer_of(cache, module.layer_idx)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    seq_len = hidden.shape[1]
    if layer is None or isinstance(layer, CompressedLayer) or layer.keys is None or layer.keys.shape[-2] != seq_len:
        return None  # not a prefill into an empty layer: questions and decoding are never compressed
    if press.is_noop(seq_len):
        return None
    synchronize(hidden.device)
    start = time.perf_counter()
    cos, sin = kwargs["position_embeddings"]
    state = LayerState(
        module=module,
        layer_idx=module.layer_idx,
        hidden_states=hidden,
        keys=layer.keys,
        values=layer.values,
        cos=cos,
        sin=sin,
        rotary=lambda positions: rotary(hidden, positions),
    )
    with torch.no_grad():
        scores = press.score(state)
        chosen = press.select(scores, state, press.n_kept(seq_len))
        compressed = compress_layer(layer.keys, layer.values, chosen)
    cache.layers[module.layer_idx] = compressed
    synchronize(hidden.device)
    elapsed = time.perf_counter() - start
    stats.seconds += elapsed
    stats.layers += 1
    stats.context_length = seq_len
    stats.kv_bytes_before += layer.keys.nbytes + layer.values.nbytes
    stats.kv_bytes_after += compressed.keys.nbytes + compressed.values.nbytes
    stats.kept_pairs += compressed.kept_pairs()
    stats.total_pairs += layer.keys.shape[0] * layer.keys.shape[1] * seq_len
    return None


@contextmanager
def compress(model: nn.Module, press: Press) -> Iterator[CompressionStats]:
    """Compress the cache filled by the first (prefill) call made inside the block.

    Yields ``CompressionStats`` filled in as layers are compressed.
    """
    check_supported(model.config)
    modules = head_mask.attention_modules(model)
    rotary = model_access.find_rotary_embedding(model)
    head_mask.install(model)
    stats = CompressionStats()
    hook = partial(_compress_hook, press=press, stats=stats, rotary=rotary)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["compress", "CompressionStats", "CompressedLayer"]
