"""Diversity-aware re-scoring for SnapKV: cluster the keys, share the budget between clusters by vote mass.

Plain top-k of the pooled votes spends a head's whole budget on the region the observation window looks at
most, often many near-duplicate keys. With ``clustering="kmeans"`` each head's context keys (the window
excluded: it is always kept) are grouped by spherical k-means into ``n_clusters`` clusters; every cluster's
*mass* is the sum of its tokens' votes, and the budget is shared between clusters in proportion to their
mass by the Sainte-Laguë divisor rule, each cluster spending its seats on its best-voted tokens.

Why this shape:

- Budget-free. The divisor rule gives a *ranking*: the j-th best token (j = 0, 1, ...) of cluster c has
  priority ``mass_c / (2 j + 1)``; any prefix of length k of that ranking is the Sainte-Laguë apportionment
  of k seats. So the one ranking is right for every budget, for per-head top-k and for AdaKV's per-head
  safeguard alike, and scoring stays a pure function of the layer state.
- Same counts as top-k. The returned scores are the head's own vote values, sorted, handed out in the
  clustered order (rank-based re-scoring). Uniform top-k then keeps exactly the clustered choice, and a
  head-adaptive selection (AdaKV's global top-k over a layer's heads) sees each head's values unchanged as a
  multiset, so it gives every head the same number of tokens as it would with top-k scores; clustering only
  changes *which* tokens a head keeps. Tied votes (max-pooling plateaus) are separated by a few ulps so the
  clustered order is strict.
- In the wrappers. AdaKV (``adakv_snapkv``): the per-head safeguard takes each head's first clustered tokens,
  the global top-k then fills heads exactly as far as it would with top-k scores, again in clustered order.
  CriticalKV (``critical_snapkv``, ``critical_adakv_snapkv``): stage one keeps the head's first clustered
  tokens; stage two ranks the rest by ``(score + epsilon) * ||V W_O||``, where ``score`` is the vote value the
  clustered order hands the token (its rank's value), so the value norm re-weights a diversity-ordered list.
- Cheap. k-means costs ``kmeans_iterations`` matmuls of ``[seq, head_dim] x [head_dim, n_clusters]`` per KV
  head, a small fraction of the layer's attention (``seq x seq``), plus a handful of sorts over ``seq``.
- Deterministic without a seed: centroids start at evenly spaced context positions (neighbouring tokens have
  similar keys, so this spreads them over the context), and every sum is a one-hot matmul, not an atomic
  scatter, so GPU runs repeat bit for bit.

Cosine similarity (spherical k-means) because a post-RoPE key's direction decides which queries attend to it;
its norm mostly scales every query's logit alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLUSTERINGS = ("topk", "kmeans")


def spherical_kmeans(keys: torch.Tensor, n_clusters: int, iterations: int) -> torch.Tensor:
    """Cluster label of every key, ``[..., seq]`` in ``[0, n_clusters)``, by cosine k-means.

    ``keys``: ``[..., seq, dim]``. Centroids start at evenly spaced positions; an empty cluster keeps its
    previous centroid. ``iterations`` is the number of centroid updates (0 = nearest initial centroid).
    """
    x = F.normalize(keys.float(), dim=-1)
    seq_len = x.shape[-2]
    n_clusters = max(1, min(n_clusters, seq_len))
    start = torch.linspace(0, seq_len - 1, n_clusters, device=x.device).round().long()
    centroids = x[..., start, :]
    labels = (x @ centroids.transpose(-1, -2)).argmax(dim=-1)
    for _ in range(iterations):
        one_hot = F.one_hot(labels, n_clusters).to(x.dtype)  # [..., seq, C]
        sums = one_hot.transpose(-1, -2) @ x  # [..., C, dim]
        empty = one_hot.sum(dim=-2)[..., None] == 0
        centroids = torch.where(empty, centroids, F.normalize(sums, dim=-1))
        labels = (x @ centroids.transpose(-1, -2)).argmax(dim=-1)
    return labels


def divisor_priority(votes: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Sainte-Laguë priority of every token: ``mass(cluster) / (2 * rank inside its cluster + 1)``.

    ``votes``, ``labels``: ``[..., seq]``. Ranks inside a cluster follow the votes (ties by position).
    """
    seq_len = votes.shape[-1]
    one_hot = F.one_hot(labels, n_clusters).to(torch.float32)  # [..., seq, C]
    mass = (votes.float()[..., None, :] @ one_hot).squeeze(-2)  # [..., C]
    by_vote = votes.argsort(dim=-1, descending=True, stable=True)
    grouped = by_vote.gather(-1, labels.gather(-1, by_vote).argsort(dim=-1, stable=True))  # cluster, then vote
    counts = one_hot.sum(dim=-2).long()
    starts = counts.cumsum(dim=-1) - counts
    position = torch.arange(seq_len, device=votes.device).expand_as(grouped)
    rank_in_grouped = position - starts.gather(-1, labels.gather(-1, grouped))
    rank = torch.empty_like(grouped).scatter_(-1, grouped, rank_in_grouped)
    return mass.gather(-1, labels) / (2 * rank + 1).float()


def strictly_decreasing(values: torch.Tensor) -> torch.Tensor:
    """Non-increasing non-negative float32 ``values`` lowered by the fewest ulps that make them strictly
    decreasing along the last dim (a tie run of m values loses up to m - 1 ulps).

    Works on the bit patterns, which order non-negative floats like integers: ``j_p = min(i_p, j_{p-1} - 1)``
    is ``cummin(i + p) - p``. Patterns are first raised to at least ``seq`` so none goes negative (a zero vote
    becomes a denormal around 1e-42).
    """
    seq_len = values.shape[-1]
    bits = values.float().clamp_min(0.0).contiguous().view(torch.int32).clamp_min(seq_len)
    steps = torch.arange(seq_len, device=values.device, dtype=torch.int32)
    strict = (bits + steps).cummin(dim=-1).values - steps
    return strict.view(torch.float32)


def kmeans_rescore(votes: torch.Tensor, keys: torch.Tensor, n_clusters: int, iterations: int) -> torch.Tensor:
    """Scores ``[..., seq]`` whose descending order is the clustered ranking and whose values are ``votes``'
    own values (sorted, made strict): see the module docstring."""
    if votes.shape[-1] == 0:
        return votes
    labels = spherical_kmeans(keys, n_clusters, iterations)
    n_clusters = max(1, min(n_clusters, votes.shape[-1]))
    priority = divisor_priority(votes, labels, n_clusters)
    by_vote = votes.argsort(dim=-1, descending=True, stable=True)
    order = by_vote.gather(-1, priority.gather(-1, by_vote).argsort(dim=-1, descending=True, stable=True))
    values = strictly_decreasing(votes.float().gather(-1, by_vote))
    return torch.empty_like(values).scatter_(-1, order, values)
