"""Compactor (arXiv:2507.08143): blend statistical leverage of the keys with chunked attention.

Leverage finds keys that are geometrically unusual (hard to reconstruct from the others); the chunked,
non-causal attention finds keys that nearby queries actually use. Both are z-normalised per head so the
``blending`` weight (default: the compression ratio, i.e. lean on leverage when pruning hard) is meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.compression import model_access
from kvbench.presses.base import LayerState, Press
from kvbench.presses.snapkv import pool_same_length


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + 1e-6)


def leverage(keys: torch.Tensor, sketch_dimension: int, generator: torch.Generator) -> torch.Tensor:
    """Approximate leverage x_i^T (X^T X)^-1 x_i of centred keys [b, h, L, d] via a Gaussian sketch."""
    x = keys - keys.mean(dim=-2, keepdim=True)
    d = x.shape[-1]
    if sketch_dimension < d:
        sketch = torch.randn(d, sketch_dimension, generator=generator, device=x.device) / math.sqrt(sketch_dimension)
        x = x @ sketch
    gram = x.transpose(-1, -2) @ x
    gram = gram + 1e-5 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(x.shape[-1], device=x.device)
    solved = torch.linalg.solve(gram, x.transpose(-1, -2)).transpose(-1, -2)
    return (solved * x).sum(dim=-1)


def chunked_attention_mass(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Column sums of non-causal attention inside non-overlapping chunks: [b, H, L] -> how much each key is used."""
    b, n_heads, seq_len, d = queries.shape
    keys = keys.repeat_interleave(n_heads // keys.shape[1], dim=1)
    out = []
    for start in range(0, seq_len, chunk_size):
        q, k = queries[:, :, start : start + chunk_size], keys[:, :, start : start + chunk_size]
        attn = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
        out.append(attn.sum(dim=-2))
    return torch.cat(out, dim=-1)


@dataclass
class CompactorPress(Press):
    blending: float | None = None
    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    seed: int = 0

    def score(self, state: LayerState) -> torch.Tensor:
        module, keys, values = state.module, state.keys, state.values
        b, kv_heads, seq_len, _ = keys.shape
        generator = torch.Generator(device=keys.device).manual_seed(self.seed + state.layer_idx)
        lev = leverage(model_access.pre_rope_keys(module, state.hidden_states).float(), self.sketch_dimension, generator)
        q = model_access.queries(module, state.hidden_states, state.cos, state.sin).float()
        mass = chunked_attention_mass(q, keys.float(), self.chunk_size)
        mass = mass.view(b, kv_heads, -1, seq_len).mean(dim=2) * values.float().norm(dim=-1)
        mass = pool_same_length(mass, 3, "avg")
        blending = self.blending if self.blending is not None else 1.0 - self.n_kept(seq_len) / seq_len
        scores = blending * zscore(lev) + zscore(mass)
        scores[..., : self.sink_size_start] = float("inf")
        if self.sink_size_end:
            scores[..., -self.sink_size_end :] = float("inf")
        return scores
