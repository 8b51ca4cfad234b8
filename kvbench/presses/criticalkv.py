"""CriticalKV (arXiv:2502.03805): attention alone misjudges tokens whose values barely move the output.

Stage one keeps the top ``first_stage_ratio`` share of the budget by the base score; stage two ranks the
rest by ``(score + epsilon) * ||V_h W_O^h||_1``, the size of each token's contribution after the head's
slice of the output projection (averaged over the query heads sharing a KV head).

The projected norm costs one output projection per token it is computed for, nearly the wrapper's whole cost.
So it is computed only where the selection depends on it: never for stage-one tokens (kept whatever their norm),
and, in heads whose stage-two slots are few (``PRUNE_SLOT_SHARE``), only for tokens whose score could still reach
those slots. There a cheap upper bound of every token's norm (a weighted Cauchy-Schwarz bound, one ``d x d``
quadratic form per token instead of a ``d x group*hidden`` product) ranks the candidates; exact norms are computed
best-bound first, and the tokens whose bound falls below the best exact scores found so far are left out, as they
cannot be selected. The kept tokens are exactly those of the full computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import model_access
from kvbench.presses import selection
from kvbench.presses.adakv import WrapperPress
from kvbench.presses.base import LayerState, require_number

# Rows of the context projected at once: the [rows, group * hidden] product stays in the core's cache while its L1
# norm is taken (a whole-context product is written to and read back from memory, which costs twice the product).
NORM_BLOCK = 512
# Every 8th token estimates the per-column weights of the bound: any positive weights give a valid bound, the
# estimate only makes it tight.
WEIGHT_SAMPLE_STRIDE = 8
# Slack of the bounds over fp32 rounding (of the bound and of the exact norms it is compared with): a token is left
# out only when even its slackened bound stays below the threshold.
BOUND_SLACK = 1e-3
# A head takes the bounds only when its stage-two slots are at most this share of its candidates. The bound is
# ~1.22x the norm, so it leaves out only candidates whose scores sit well below the threshold: with slots a third of
# the candidates (r = 0.5) it still computes ~70 % of the norms, and the bound and the best-first rounds cost more
# than the 30 % they save (stage two over a 4k prefill of the packaged model, 2-core Intel VM: 330 ms pruned, 270 ms
# every norm). At a seventh (r = 0.75) it computes a third of them and wins, 242 against 312 ms. The break-even
# depends on the machine: `benchmarks/critical_prune_share.py` measures it.
PRUNE_SLOT_SHARE = 0.25


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


def _quadratic_form(values: torch.Tensor, gram: torch.Tensor, rounding: int = 1) -> torch.Tensor:
    """``v^T G v`` per row of ``values`` ``[n, L, d]`` (``gram`` ``[n, d, d]``, PSD), moved by a bound of its fp32
    rounding error (relative to ``|v|^2 tr G``, which no cancellation can exceed): raised for ``rounding=1`` (an
    upper bound), lowered for ``-1`` (a lower bound). Plain ``bmm``: broadcast 4-d matmuls take a path several
    times slower on CPU."""
    form = torch.bmm(values, gram).mul_(values).sum(dim=-1)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1, keepdim=True)
    return form.add_(values.square().sum(dim=-1).mul_(trace * (1e-5 * rounding))).clamp_min_(0)


def _per_head(values: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``values`` ``[b, kv_heads, L, d]`` as ``[b * kv_heads, L, d]`` and ``weight`` ``[kv_heads, d, m]`` repeated to
    match, for plain ``bmm``, each rescaled where its magnitudes are extreme (``_scaled``), and the factor
    ``[b * kv_heads, 1]`` that takes a norm of the rescaled ones back. Powers of two scale without rounding, and the
    squares the bounds take then neither overflow nor vanish, whatever the values' magnitude."""
    b, kv_heads, seq_len, d = values.shape
    rows, weight = values.reshape(b * kv_heads, seq_len, d), weight.expand(b, *weight.shape).reshape(b * kv_heads, d, -1)
    rows, row_exponent = _scaled(rows)
    weight, weight_exponent = _scaled(weight)
    return rows, weight, torch.exp2(row_exponent + weight_exponent).view(-1, 1)


def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[n, r, c]`` times ``2^-e`` and ``e`` ``[n, 1, 1]`` (float), with ``max |x| = m 2^e``, ``m`` in [0.5, 1),
    per leading index; ``x`` itself and ``e = 0`` when every magnitude is already moderate (within 2^+-16: the
    usual case, which then costs no copy)."""
    largest = torch.maximum(x.amax(dim=(-2, -1), keepdim=True), -x.amin(dim=(-2, -1), keepdim=True))
    exponent = torch.frexp(largest).exponent.float().clamp_(-125, 125)  # 2^-e stays a normal fp32 number
    if not bool((exponent.abs() > 16).any()):
        return x, torch.zeros_like(exponent)
    return x * torch.exp2(-exponent), exponent


def norm_upper_bound(values: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """An upper bound of ``||v W||_1 / group`` for every row of ``values`` ``[b, kv_heads, L, d]`` (``weight``
    ``[kv_heads, d, m]``), at the cost of one ``d x d`` quadratic form per row.

    For any positive column weights ``c``, ``||x||_1 <= sqrt(sum c) * sqrt(sum x_j^2 / c_j)`` (Cauchy-Schwarz), and
    ``sum x_j^2 / c_j = v^T (W diag(1/c) W^T) v``. With ``c_j`` the RMS of column ``j`` over the head's tokens the
    bound is tight up to the shape of the coordinates' distribution (1.21-1.25x on the packaged model's values);
    where the sampled tokens are all zero, the weights are equal (plain Cauchy-Schwarz).
    """
    rows, weight, back = _per_head(values, weight)
    sample = rows[:, ::WEIGHT_SAMPLE_STRIDE]
    second_moment = torch.bmm(sample.transpose(-1, -2), sample).div_(sample.shape[-2])
    column_ms = torch.bmm(second_moment, weight).mul_(weight).sum(dim=-2)  # mean square of each projected column
    rms = column_ms.clamp_min_(0).sqrt_()
    largest = rms.amax(dim=-1, keepdim=True)
    rms = torch.where(largest > 0, rms.clamp_min(largest * 1e-6), torch.ones_like(rms))  # strictly positive weights
    weighted_gram = torch.bmm(weight / rms[:, None, :], weight.transpose(-1, -2))
    upper = _quadratic_form(rows, weighted_gram).mul_(rms.sum(dim=-1, keepdim=True)).sqrt_().mul_(back)
    return upper.view(values.shape[:-1]).mul_((1 + BOUND_SLACK) / group)


def norm_lower_bound(values: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """A lower bound of ``||v W||_1 / group`` (shapes as ``norm_upper_bound``): ``||x||_1 >= ||x||_2 =
    sqrt(v^T W W^T v)``, less its rounding (a value nearly orthogonal to ``W``'s columns has a form of rounding
    noise, far above its norm). Only negative scores need it: their best case is the smallest norm."""
    rows, weight, back = _per_head(values, weight)
    gram = torch.bmm(weight, weight.transpose(-1, -2))
    low = _quadratic_form(rows, gram, rounding=-1).sqrt_().mul_(back)
    return low.view(values.shape[:-1]).mul_((1 - BOUND_SLACK) / group)


def _pruned_head(values: torch.Tensor, weight: torch.Tensor, group: int, block: torch.Tensor, factor: torch.Tensor,
                 best_case: torch.Tensor, slots: int) -> torch.Tensor:
    """One head's stage-two scores ``factor * norm`` over its candidate rows (``values`` ``[n, d]``): exact where the
    row could take one of the ``slots``, ``-inf`` where its ``best_case`` (an upper bound of its score) stays below
    the ``slots``-th best exact score. Rows are computed best bound first, a block at a time, the threshold raised
    after each block, so few rows are computed that turn out not to be needed."""
    out = torch.full_like(factor, float("-inf"))
    order = best_case.argsort(descending=True)
    ranked_bounds = best_case[order]
    best = factor.new_empty(0)
    done, reachable = 0, values.shape[0]
    while done < reachable:
        take = slots if done == 0 else min(block.shape[0], reachable - done)
        rows = order[done : done + take]
        exact = factor[rows] * _row_norms(values[rows], weight, group, block)
        out[rows] = exact
        best = torch.cat([best, exact]).topk(slots).values
        done += take
        # rows whose bound reaches the slots-th best exact score so far (the bounds are sorted)
        reachable = int((ranked_bounds >= best[-1]).sum())
    return out


def stage_two_scores(scores: torch.Tensor, state: LayerState, stage_one: torch.Tensor, slots: torch.Tensor,
                     epsilon: float) -> torch.Tensor:
    """``(score + epsilon) * ||v W_O||_1`` where the selection can depend on it, for ``slots`` ``[b, kv_heads]``
    stage-two picks per head: stage-one tokens hold ``+inf``, tokens that cannot be picked ``-inf``.

    A head whose slots are over ``PRUNE_SLOT_SHARE`` of its candidates computes every candidate's norm: the bounds
    would leave out too few rows to pay for themselves."""
    values = state.values.detach().float()
    b, kv_heads, _, _ = values.shape
    weight = grouped_output_weight(state)
    group, weight = weight.shape[2], weight.flatten(2)
    factor = scores.float() + epsilon
    candidates = ~stage_one
    n_candidates = candidates.sum(dim=-1)
    slots = torch.minimum(slots.to(candidates.device), n_candidates)
    prune = slots <= n_candidates * PRUNE_SLOT_SHARE
    best_case = None  # an upper bound of every candidate's score, where pruning pays
    if bool(prune.any()):
        best_case = factor * norm_upper_bound(values, weight, group)
        if not bool((factor > 0).all()):
            best_case = torch.where(factor > 0, best_case, factor * norm_lower_bound(values, weight, group))
        # a NaN or infinite best case (an infinite score times a zero bound, a norm past fp32) orders nothing
        prune &= (torch.isfinite(best_case) | stage_one).all(dim=-1)
    block = values.new_empty(min(NORM_BLOCK, values.shape[-2]), weight.shape[-1])
    out = torch.full_like(factor, float("-inf"))
    for i in range(b):
        for h in range(kv_heads):
            k = int(slots[i, h])
            if k == 0:
                continue
            rows = candidates[i, h].nonzero().squeeze(-1)
            if prune[i, h]:
                out[i, h, rows] = _pruned_head(values[i, h, rows], weight[h], group, block, factor[i, h, rows],
                                               best_case[i, h, rows], k)
            else:
                out[i, h, rows] = factor[i, h, rows] * _row_norms(values[i, h, rows], weight[h], group, block)
    return selection.forced(out, stage_one)


@dataclass
class CriticalKVPress(WrapperPress):
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "first_stage_ratio", 0.0, 1.0)  # the share of the budget stage one fills
        require_number(self, "epsilon", 0.0)

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        n_first = int(n_kept * self.first_stage_ratio)
        stage_one = selection.mask_from_indices(scores.topk(n_first, dim=-1).indices, scores.shape[-1])
        slots = torch.full(scores.shape[:2], n_kept - n_first)
        return selection.uniform(stage_two_scores(scores, state, stage_one, slots, self.epsilon), n_kept)


@dataclass
class CriticalAdaKVPress(CriticalKVPress):
    """CriticalKV inside AdaKV budgets: AdaKV's safeguarded selection on the base scores fixes how many tokens
    each head keeps; the two CriticalKV stages then choose which, inside each head. Running AdaKV again on the
    rescaled scores would let the projection norm move budget between heads, which the method does not do."""

    alpha_safeguard: float = 0.2

    head_adaptive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "alpha_safeguard", 0.0, 1.0)

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        budgets = selection.adakv(scores, n_kept, self.alpha_safeguard).mask.sum(dim=-1)
        # AdaKV's safeguard tokens are the head's best base scores, so they stay in stage one even when
        # the head's first-stage share is smaller.
        first = (budgets * self.first_stage_ratio).long().clamp_min(selection.safeguard_count(n_kept, self.alpha_safeguard))
        # Each head keeps its `first` best tokens by the base score, then fills its budget with the best of the
        # rest by the rescaled score (stage_two_scores forces stage one in); the budgets never move between heads.
        stage_one = selection.ranks(scores) < first[..., None]
        rescaled = stage_two_scores(scores, state, stage_one, (budgets - first).clamp_min(0), self.epsilon)
        return selection.Selection(mask=selection.ranks(rescaled) < budgets[..., None])
