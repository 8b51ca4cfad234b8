"""CriticalKV (arXiv:2502.03805): attention alone misjudges tokens whose values barely move the output.

Stage one keeps the top ``first_stage_ratio`` share of the budget by the base score; stage two ranks the
rest by ``(score + epsilon) * ||V_h W_O^h||_1``, the size of each token's contribution after the head's
slice of the output projection (averaged over the query heads sharing a KV head).

The projected norm costs about one output projection over the context, the wrapper's whole cost, so it is
computed only where stage two reads it: stage-one tokens are kept whatever their norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import model_access
from kvbench.presses import selection
from kvbench.presses.adakv import WrapperPress
from kvbench.presses.base import LayerState

# Rows of the context projected at once: the [rows, group * hidden] product stays in the core's cache while its L1
# norm is taken (a whole-context product is written to and read back from memory, which costs twice the product).
NORM_BLOCK = 512


def grouped_output_weight(state: LayerState) -> torch.Tensor:
    """The output projection per KV head, ``[kv_heads, head_dim, group, hidden]`` (fp32, contiguous).

    ``weight[h, :, g]`` is query head ``h * group + g``'s slice ``W_O^q`` transposed, so ``v @ weight[h].flatten(1)``
    projects a value through every query head of its group in one product.
    """
    _, kv_heads, _, d = state.values.shape
    weight = model_access.output_projection(state.module).detach().float()  # [hidden, H * d], columns grouped by head
    hidden, group = weight.shape[0], weight.shape[1] // (kv_heads * d)
    return weight.view(hidden, kv_heads, group, d).permute(1, 3, 2, 0).contiguous()


def _row_norms(values: torch.Tensor, weight: torch.Tensor, group: int, block: torch.Tensor) -> torch.Tensor:
    """``||v W_O^q||_1`` averaged over the ``group`` query heads of ``weight`` ``[d, group * hidden]``, per row of
    ``values`` ``[n, d]``. Each product is written into ``block``, one buffer reused for the whole layer: a fresh
    block per product costs as much as the product on CPU (large allocations are returned to the OS and
    page-faulted back in every time)."""
    out = values.new_empty(values.shape[0])
    for start in range(0, values.shape[0], block.shape[0]):
        rows = values[start : start + block.shape[0]]
        projected = torch.mm(rows, weight, out=block[: rows.shape[0]])
        out[start : start + rows.shape[0]] = projected.abs_().sum(dim=-1)
    return out.div_(group)


def projected_value_norm(state: LayerState, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``||v W_O^h||_1`` per (kv head, token), mean over the GQA group: [b, kv_heads, L] (fp32).

    Positions where ``skip`` ([b, kv_heads, L] bool) is True are not computed and hold 0: the caller must not
    read them (stage-one tokens, which the selection forces in).
    """
    values = state.values.detach().float()
    b, kv_heads, seq_len, _ = values.shape
    weight = grouped_output_weight(state)
    group, weight = weight.shape[2], weight.flatten(2)
    block = values.new_empty(min(NORM_BLOCK, seq_len), weight.shape[-1])
    norms = values.new_zeros(b, kv_heads, seq_len)
    for i in range(b):
        for h in range(kv_heads):
            if skip is None:
                norms[i, h] = _row_norms(values[i, h], weight[h], group, block)
            else:
                rows = (~skip[i, h]).nonzero().squeeze(-1)
                norms[i, h, rows] = _row_norms(values[i, h, rows], weight[h], group, block)
    return norms


@dataclass
class CriticalKVPress(WrapperPress):
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def rescaled(self, scores: torch.Tensor, state: LayerState, stage_one: torch.Tensor) -> torch.Tensor:
        """Stage-two scores, with the ``stage_one`` tokens raised above everything (their norm is not computed)."""
        norms = projected_value_norm(state, skip=stage_one)
        return selection.forced((scores.float() + self.epsilon) * norms, stage_one)

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        first = scores.topk(int(n_kept * self.first_stage_ratio), dim=-1).indices
        stage_one = selection.mask_from_indices(first, scores.shape[-1])
        return selection.uniform(self.rescaled(scores, state, stage_one), n_kept)


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
        # selection.two_stage, with the stage-one mask computed first so the norms can skip it
        stage_one = selection.ranks(scores) < first[..., None]
        return selection.Selection(mask=selection.ranks(self.rescaled(scores, state, stage_one)) < budgets[..., None])
