"""Selection: turn ``[batch, kv_heads, seq]`` scores into the tokens each head keeps.

Two shapes of answer, because they cost differently in the cache:
- uniform: every head keeps exactly ``n_kept`` tokens -> ``indices`` ``[batch, kv_heads, n_kept]``;
- head-adaptive: heads keep different counts, same layer total -> boolean ``mask`` ``[batch, kv_heads, seq]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    indices: torch.Tensor | None = None  # uniform: sorted positions kept per head
    mask: torch.Tensor | None = None  # head-adaptive: True = kept

    @property
    def head_adaptive(self) -> bool:
        return self.mask is not None


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best scores along the last dim, sorted by position (keeps the cache in order)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def uniform(scores: torch.Tensor, n_kept: int) -> Selection:
    return Selection(indices=topk_positions(scores, n_kept))


def mask_from_indices(indices: torch.Tensor, seq_len: int) -> torch.Tensor:
    mask = torch.zeros(*indices.shape[:-1], seq_len, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def safeguard_count(n_kept: int, alpha_safeguard: float) -> int:
    """The tokens AdaKV reserves for each head: ``int(n_kept * alpha_safeguard)``, but at least one whenever there is
    a safeguard and a budget (kvpress' rule, so a small ``alpha`` or budget never leaves a head without context)."""
    n_safe = int(n_kept * alpha_safeguard)
    return max(1, n_safe) if alpha_safeguard > 0 and n_kept > 0 else n_safe


def adakv(scores: torch.Tensor, n_kept: int, alpha_safeguard: float) -> Selection:
    """AdaKV (arXiv:2407.11550): one top-k over all (head, token) pairs of the layer, with a per-head floor.

    Each head first gets its own top ``safeguard_count`` tokens (so no head collapses), then
    the layer's remaining budget goes to the best remaining pairs across heads. The layer keeps
    ``kv_heads * n_kept`` pairs in total, as uniform selection would.
    """
    b, h, seq_len = scores.shape
    n_safe = safeguard_count(n_kept, alpha_safeguard)
    boosted = scores.float().clone()
    if n_safe > 0:
        safe = scores.topk(n_safe, dim=-1).indices
        boosted.scatter_(-1, safe, float("inf"))
    flat = boosted.reshape(b, h * seq_len)
    best = flat.topk(h * n_kept, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, best, True)
    return Selection(mask=mask.view(b, h, seq_len))


def forced(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scores with the ``keep`` mask raised above everything else (used by two-stage selections)."""
    return scores.float().masked_fill(keep, float("inf"))


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every token inside its head (0 = best score), so per-head counts can differ without a loop."""
    order = scores.argsort(dim=-1, descending=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
