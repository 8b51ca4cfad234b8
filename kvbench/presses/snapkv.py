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

    Returns ``[batch, kv_heads, group, seq]`` so GQA groups can be reduced by the caller. Batched matmuls
    throughout (the mean over queries too): this runs once per layer inside prefill and must stay cheap.
    """
    keys = state.keys
    seq_len = state.seq_len
    q = state.context_queries(slice(seq_len - window, seq_len))
    b, n_heads, _, d = q.shape
    kv_heads = keys.shape[1]
    group = n_heads // kv_heads
    q = q.reshape(b, kv_heads, group * window, d).float() / math.sqrt(d)
    logits = (q @ keys.float().transpose(-1, -2)).view(b, kv_heads, group, window, seq_len)
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., seq_len - window :].masked_fill_(future, float("-inf"))
    attn = logits.softmax(dim=-1).view(-1, window, seq_len)
    mean = torch.full((attn.shape[0], 1, window), 1.0 / window, device=attn.device)
    return torch.bmm(mean, attn).view(b, kv_heads, group, seq_len)


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
