"""SnapKV (arXiv:2404.14469): the last ``window_size`` context queries vote for the keys worth keeping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import KVBenchError
from kvbench.presses.base import LayerState, Press, require_int
from kvbench.presses.clustering import CLUSTERINGS, kmeans_rescore

POOLINGS = ("avg", "max")
# Logits of the query heads scored together on CPU (window x seq fp32 each): what stays in a core's cache.
LOGITS_CHUNK_BYTES = 1 << 20


def pool_same_length(x: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last dim that keeps its length (smooths votes onto neighbouring tokens)."""
    if kernel_size <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "avg":
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif pooling == "max":
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        raise KVBenchError(f"unknown pooling '{pooling}'; use avg or max")
    return out[..., : shape[-1]].reshape(shape)


def window_votes(state: LayerState, window: int) -> torch.Tensor:
    """Mean attention of the last ``window`` queries over all keys (fp32, causal inside the window).

    Returns ``[batch, kv_heads, group, seq]`` so GQA groups can be reduced by the caller. This runs once per layer
    inside prefill and must stay cheap. On CPU the query heads go through in chunks of at most
    ``LOGITS_CHUNK_BYTES`` of logits, into one logits and one softmax buffer reused by every chunk: a layer's logits
    at once (9 MB for 9 heads x 64 queries x 4k keys) are page-faulted in, written out to memory and read back by
    the softmax and again by the mean, which took ~1.3x the time of chunks that stay in the core's cache (128-135 ms
    against 100-105 ms over a 4k prefill of the packaged model, 2-core Intel VM).
    Accelerators take the layer in one chunk. Batched matmuls within a chunk, the mean over queries too.
    """
    seq_len = state.seq_len
    q = state.context_queries(slice(seq_len - window, seq_len))
    b, n_heads, _, d = q.shape
    kv_heads = state.keys.shape[1]
    group = n_heads // kv_heads
    q = q.detach().reshape(b * kv_heads, group * window, d).float() / math.sqrt(d)  # out= buffers take no autograd
    keys_t = state.keys.detach().float().reshape(b * kv_heads, seq_len, d).transpose(-1, -2)
    future = torch.ones(window, window, dtype=torch.bool, device=q.device).triu(1)
    chunk = b * n_heads if q.device.type != "cpu" else max(1, LOGITS_CHUNK_BYTES // (4 * window * seq_len))
    # whole KV heads, or query heads of one KV head (so a buffer's slice is always contiguous)
    per_kv, per_group = max(1, chunk // group), min(group, chunk)
    logits_buffer = q.new_empty(min(per_kv, b * kv_heads), per_group * window, seq_len)
    attn_buffer = q.new_empty(logits_buffer.shape[0] * per_group, window, seq_len)
    mean = torch.full((attn_buffer.shape[0], 1, window), 1.0 / window, device=q.device)
    votes = torch.empty(b * kv_heads, group, seq_len, device=q.device)
    for kv in range(0, b * kv_heads, per_kv):
        n_kv = min(per_kv, b * kv_heads - kv)
        for g in range(0, group, per_group):
            n_q = min(per_group, group - g)
            logits = torch.matmul(q[kv : kv + n_kv, g * window : (g + n_q) * window], keys_t[kv : kv + n_kv],
                                  out=logits_buffer[:n_kv, : n_q * window]).view(-1, window, seq_len)
            logits[..., seq_len - window :].masked_fill_(future, float("-inf"))
            attn = torch.softmax(logits, dim=-1, out=attn_buffer[: n_kv * n_q])
            votes[kv : kv + n_kv, g : g + n_q] = torch.bmm(mean[: n_kv * n_q], attn).view(n_kv, n_q, seq_len)
    return votes.view(b, kv_heads, group, seq_len)


@dataclass
class SnapKVPress(Press):
    """SnapKV: keys ranked by the pooled mean attention of the last ``window_size`` context queries; the window
    itself is always kept.

    A budget smaller than the window keeps the window's most recent tokens. This differs on purpose from kvpress,
    whose window tokens all tie at the top score and so keep an arbitrary subset of them; recency is the
    sensible order for tokens that are all "the question's neighbourhood".

    ``clustering="kmeans"`` re-ranks the context outside the window for diversity (``kvbench.presses.clustering``:
    k-means over each head's keys into ``n_clusters`` clusters, the budget shared between clusters in proportion
    to their vote mass). The scores keep the head's vote values, so every selection keeps as many tokens per
    head as with ``"topk"``; ``"topk"`` is SnapKV as published. Subclasses that change the votes override
    ``votes`` and inherit the clustering.
    """

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"
    clustering: str = "topk"
    n_clusters: int = 8
    kmeans_iterations: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise KVBenchError(f"unknown pooling '{self.pooling}'; use one of: {', '.join(POOLINGS)}")
        if self.clustering not in CLUSTERINGS:
            raise KVBenchError(f"unknown clustering '{self.clustering}'; use one of: {', '.join(CLUSTERINGS)}")
        for name, low in (("window_size", 1), ("kernel_size", 0), ("n_clusters", 1), ("kmeans_iterations", 0)):
            require_int(self, name, low)

    @property
    def window(self) -> int | None:
        return self.window_size

    def votes(self, state: LayerState, window: int) -> torch.Tensor:
        """Pooled votes of the context before the window, ``[batch, kv_heads, seq - window]`` (GQA groups averaged)."""
        votes = window_votes(state, window)[..., : state.seq_len - window]
        return pool_same_length(votes, self.kernel_size, self.pooling).mean(dim=2)

    def score(self, state: LayerState) -> torch.Tensor:
        seq_len = state.seq_len
        window = min(self.window_size, seq_len)
        votes = self.votes(state, window)
        if self.clustering == "kmeans":
            votes = kmeans_rescore(votes, state.keys[..., : seq_len - window, :], self.n_clusters, self.kmeans_iterations)
        # The window is always kept; a ramp above any attention mass prefers its most recent tokens
        # when the budget is smaller than the window.
        ramp = 2.0 + torch.arange(window, device=votes.device, dtype=votes.dtype) / window
        return torch.cat([votes, ramp.expand(*votes.shape[:-1], window)], dim=-1)
