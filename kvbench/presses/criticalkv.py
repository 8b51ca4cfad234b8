"""CriticalKV (arXiv:2502.03805): attention alone misjudges tokens whose values barely move the output.

Stage one keeps the top ``first_stage_ratio`` share of the budget by the base score; stage two ranks the
rest by ``(score + epsilon) * ||V_h W_O^h||_1``, the size of each token's contribution after the head's
slice of the output projection (averaged over the query heads sharing a KV head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import model_access
from kvbench.presses import selection
from kvbench.presses.adakv import WrapperPress
from kvbench.presses.base import LayerState


def projected_value_norm(state: LayerState, block: int = 1024) -> torch.Tensor:
    """``||v W_O^h||_1`` per (kv head, token), mean over the GQA group: [b, kv_heads, L]."""
    values = state.values.float()
    b, kv_heads, seq_len, d = values.shape
    weight = model_access.output_projection(state.module).float()  # [hidden, H * d]
    n_heads = weight.shape[1] // d
    per_head = weight.view(weight.shape[0], kv_heads, n_heads // kv_heads, d).permute(1, 2, 3, 0)  # [kv, g, d, hidden]
    out = []
    for start in range(0, seq_len, block):  # blocks bound memory at long contexts
        projected = values[:, :, None, start : start + block] @ per_head  # [b, kv, g, block, hidden]
        out.append(torch.linalg.vector_norm(projected, ord=1, dim=-1).mean(dim=2))
    return torch.cat(out, dim=-1)


@dataclass
class CriticalKVPress(WrapperPress):
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def rescaled(self, scores: torch.Tensor, state: LayerState) -> torch.Tensor:
        return (scores.float() + self.epsilon) * projected_value_norm(state)

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        first = selection.topk_positions(scores, int(n_kept * self.first_stage_ratio))
        stage_one = selection.mask_from_indices(first, scores.shape[-1])
        return selection.uniform(selection.forced(self.rescaled(scores, state), stage_one), n_kept)


@dataclass
class CriticalAdaKVPress(CriticalKVPress):
    """CriticalKV inside AdaKV budgets: AdaKV's safeguarded selection on the base scores fixes how many tokens
    each head keeps; the two CriticalKV stages then choose which, inside each head. Running AdaKV again on the
    rescaled scores would let the projection norm move budget between heads, which the method does not do."""

    alpha_safeguard: float = 0.2

    head_adaptive: ClassVar[bool] = True

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        budgets = selection.adakv(scores, n_kept, self.alpha_safeguard).mask.sum(dim=-1)
        # AdaKV's safeguard tokens are the head's best base scores, so they stay in stage one even when
        # the head's first-stage share is smaller.
        first = (budgets * self.first_stage_ratio).long().clamp_min(int(n_kept * self.alpha_safeguard))
        return selection.two_stage(scores, self.rescaled(scores, state), first, budgets)
