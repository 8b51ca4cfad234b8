"""Compactor (arXiv:2507.08143): blend statistical leverage of the keys with chunked attention.

Leverage finds keys that are geometrically unusual (hard to reconstruct from the others); the chunked,
non-causal attention finds keys that nearby queries actually use. Each score is z-normalised over the whole
layer (all heads and tokens together), not per head: a per-head normalisation would give every head the
same spread and so cancel the reallocation AdaKV makes between heads. ``blending`` weighs leverage against
attention; by default it is the compression ratio (lean on leverage when pruning hard), as in kvpress.

The ``sink_size_start`` first and ``sink_size_end`` last tokens are kept unconditionally and taken out before
scoring, so they do not enter the centring, the sketch's Gram matrix, the chunk boundaries or the
normalisation statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.presses.base import LayerState, Press, require_int, require_number, require_seed
from kvbench.presses.snapkv import pool_same_length


def layer_zscore(x: torch.Tensor) -> torch.Tensor:
    """z-score over every head and token of the layer (one mean, one unbiased std per batch element)."""
    return (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def _cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, tries: int = 5) -> torch.Tensor:
    """Cholesky factor of ``gram + jitter * I``, raising the jitter tenfold until every matrix factorises."""
    identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * identity)
        if bool((info == 0).all()):
            return factor
        jitter *= 10.0
    raise torch.linalg.LinAlgError(f"leverage: the keys' Gram matrix is not positive definite even with jitter {jitter / 10:g}")


def leverage(keys: torch.Tensor, sketch_dimension: int, generator: torch.Generator) -> torch.Tensor:
    """Approximate leverage x_i^T (X^T X)^-1 x_i of centred pre-RoPE keys [b, h, L, d], clamped at 0.

    X is sketched on the right by a Gaussian matrix drawn per (batch, head), which keeps the k x k solve cheap;
    a small jitter on the Gram matrix keeps the Cholesky factorisation stable for rank-deficient keys. With
    X^T X = C C^T, x^T (X^T X)^-1 x = ||C^-1 x||^2: one k x k triangular inverse and one product over the
    context, instead of two triangular solves with L right-hand sides.
    """
    b, h, _, d = keys.shape
    sketch = torch.randn(b, h, d, sketch_dimension, generator=generator, device=keys.device, dtype=keys.dtype)
    x = (keys - keys.mean(dim=-2, keepdim=True)) @ (sketch / math.sqrt(sketch_dimension))
    x = x.float()
    gram = x.transpose(-1, -2) @ x
    factor = _cholesky_with_jitter(0.5 * (gram + gram.transpose(-1, -2)))
    identity = torch.eye(sketch_dimension, device=x.device, dtype=x.dtype).expand_as(factor)
    inverse = torch.linalg.solve_triangular(factor, identity, upper=False)  # C^-1, [b, h, k, k]
    whitened = x @ inverse.transpose(-1, -2)  # rows C^-1 x_i, [b, h, L, k]
    return whitened.square_().sum(dim=-1).clamp_min(0)


# Chunks scored at once: their logits (group * chunk * chunk per KV head) stay in cache while they are
# exponentiated and summed; the whole context's logits at once would go through memory several times.
CHUNK_ELEMENTS = 1 << 20
# exp() of a float32 below this is a denormal or zero: computing one takes the slow path of the vector exp (about
# ten times the cost), and unscaled logits put a few percent of a real model's entries there. Clamping the shifted
# logits here changes an attention weight by less than 2e-38.
EXP_FLOOR = -87.0


def chunked_attention_mass(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Column sums of non-causal attention inside non-overlapping chunks: [b, H, L] -> how much each key is used.

    The logits are plain dot products (no 1/sqrt(d)), and a last partial chunk is zero-padded to the chunk
    size, so padded keys take a zero logit and padded queries spread uniform attention over the chunk: the
    method's published formulation, kept so rankings match it. The query heads sharing a KV head are stacked
    against that head's keys (no repeated keys), a few chunks at a time.

    A key's mass is ``sum_i exp(l_ij - m_i) / Z_i``: the exponentiated logits are summed with the row weights
    ``1 / Z_i`` as one batched vector-matrix product, so the softmax is never normalised in memory.
    """
    b, n_heads, seq_len, d = queries.shape
    kv_heads = keys.shape[1]
    group = n_heads // kv_heads
    n_chunks = math.ceil(seq_len / chunk_size)
    padded = n_chunks * chunk_size
    # [b, kv, chunk, group * chunk_size, d]: the group's queries of one chunk, stacked (one copy, zeros after the end)
    q = queries.new_zeros(b, kv_heads, n_chunks, group, chunk_size, d)
    full, rest = divmod(seq_len, chunk_size)
    grouped = queries.view(b, kv_heads, group, seq_len, d)
    q[:, :, :full] = grouped[:, :, :, : full * chunk_size].view(b, kv_heads, group, full, chunk_size, d).transpose(2, 3)
    if rest:
        q[:, :, full, :, :rest] = grouped[:, :, :, full * chunk_size :]
    q = q.view(b, kv_heads, n_chunks, group * chunk_size, d)
    k = torch.nn.functional.pad(keys, (0, 0, 0, padded - seq_len)).view(b, kv_heads, n_chunks, chunk_size, d)
    mass = queries.new_empty(b, kv_heads, n_chunks, group, 1, chunk_size, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // (b * kv_heads * group * chunk_size * chunk_size))
    for start in range(0, n_chunks, step):
        chunks = slice(start, start + step)
        weights = (q[:, :, chunks] @ k[:, :, chunks].transpose(-1, -2)).float()  # [b, kv, n, group * cs, cs]
        weights = weights.sub_(weights.amax(dim=-1, keepdim=True)).clamp_min_(EXP_FLOOR).exp_()
        rows = weights.sum(dim=-1).reciprocal_()
        n = weights.shape[2]
        mass[:, :, chunks] = rows.view(b, kv_heads, n, group, 1, chunk_size) @ weights.view(b, kv_heads, n, group, chunk_size, chunk_size)
    return mass.view(b, kv_heads, n_chunks, group, chunk_size).transpose(2, 3).reshape(b, n_heads, padded)[..., :seq_len]


@dataclass
class CompactorPress(Press):
    blending: float | None = None
    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("sink_size_start", 0), ("sink_size_end", 0), ("chunk_size", 1), ("sketch_dimension", 1)):
            require_int(self, name, low)
        require_seed(self)
        if self.blending is not None:
            require_number(self, "blending", 0.0)

    def score(self, state: LayerState) -> torch.Tensor:
        seq_len = state.seq_len
        start = min(self.sink_size_start, seq_len)
        end = min(self.sink_size_end, max(0, seq_len - start))
        inner = slice(start, seq_len - end)
        keys, values = state.keys[:, :, inner], state.values[:, :, inner]
        if keys.shape[-2] == 0:
            return torch.full(state.keys.shape[:-1], float("inf"), device=state.keys.device)
        b, kv_heads, _, _ = keys.shape
        generator = torch.Generator(device=keys.device).manual_seed(self.seed + state.layer_idx)
        lev = leverage(state.pre_rope_keys(inner).float(), self.sketch_dimension, generator)
        q = state.context_queries(inner).float()
        mass = chunked_attention_mass(q, keys.float(), self.chunk_size)
        mass = mass.view(b, kv_heads, -1, mass.shape[-1]).mean(dim=2) * values.float().norm(dim=-1)
        mass = pool_same_length(mass, 3, "avg")
        scores = self.blending_weight(seq_len) * layer_zscore(lev) + layer_zscore(mass)
        return torch.nn.functional.pad(scores, (start, end), value=float("inf"))

    def blending_weight(self, seq_len: int) -> float:
        """``blending`` if set, else the share of the context removed (the ratio, or what a budget removes)."""
        if self.blending is not None:
            return float(self.blending)
        if self.budget is None:
            return float(self.compression_ratio)
        return 1.0 - self.n_kept(seq_len) / seq_len
