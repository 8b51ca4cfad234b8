"""CriticalKV computes the projected value norm only where the selection can depend on it: the bounds it prunes
with must hold, the tokens it keeps must be those of the full computation, and it must really compute fewer norms."""

from __future__ import annotations

import pytest
import torch

from kvbench.presses import criticalkv, selection
from kvbench.presses.base import LayerState
from kvbench.presses.criticalkv import CriticalAdaKVPress, CriticalKVPress
from tests.tiny_models import output_projection_module


def _state(batch: int, kv_heads: int, group: int, seq_len: int, head_dim: int = 16, hidden: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # output columns at very different scales, as in trained models (a bound tight only for isotropic columns fails)
    module = output_projection_module(kv_heads, group, head_dim, hidden, generator, torch.logspace(-1, 1, hidden))
    # values with uneven dims and a shared offset, like real ones, and every other token sparse (two dims only): the
    # bound's tightness then differs from token to token, so a bound that is too low changes which tokens are kept
    values = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator) * torch.linspace(0.2, 3, head_dim)
    values = values + torch.randn(head_dim, generator=generator)
    sparse = torch.zeros_like(values).scatter_(-1, torch.randint(0, head_dim, (batch, kv_heads, seq_len, 2), generator=generator), 1.0)
    values[:, :, 1::2] = (values * sparse * 3)[:, :, 1::2]
    return LayerState(module=module, layer_idx=0, hidden_states=torch.zeros(batch, seq_len, hidden), keys=values.clone(),
                      values=values, cos=None, sin=None, rotary=None)


def _exact_norms(state: LayerState) -> torch.Tensor:
    """||v W_O^q||_1 averaged over the group, every token, in float64 (no pruning, no blocking)."""
    values = state.values.double()
    b, kv_heads, seq_len, d = values.shape
    weight = state.module.o_proj.weight.detach().double()  # [hidden, H * d]
    group = weight.shape[1] // (kv_heads * d)
    per_query = weight.T.reshape(kv_heads, group, d, -1)  # [kv, g, d, hidden]
    return torch.einsum("bhld,hgdo->bhlgo", values, per_query).abs().sum(dim=-1).mean(dim=-1)


def _heavy_tailed_scores(shape, generator: torch.Generator, signed: bool = False, tail: float = 6) -> torch.Tensor:
    """Attention-like votes: a few large, most tiny (pruning has something to prune; ``tail`` 1 = flat votes, where
    the norms decide most of stage two); optionally of both signs."""
    scores = torch.rand(*shape, generator=generator).pow(tail)
    return scores - 0.05 if signed else scores


@pytest.mark.parametrize("batch,kv_heads,group,seq_len", [(1, 3, 3, 400), (2, 2, 4, 257)])
def test_the_norm_bounds_hold_for_every_token(batch, kv_heads, group, seq_len):
    state = _state(batch, kv_heads, group, seq_len)
    weight = criticalkv.grouped_output_weight(state).flatten(2)
    lower = criticalkv.norm_lower_bound(state.values.float(), weight, group)
    upper = criticalkv.norm_upper_bound(state.values.float(), weight, group)
    exact = _exact_norms(state).float()
    assert bool((upper >= exact).all()) and bool((lower <= exact).all())
    # tight enough to prune: the upper bound is within a small factor of the norm, not the sqrt(m) of plain norms
    assert float((upper / exact).mean()) < 1.5


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("tail", [1, 6])
@pytest.mark.parametrize("block", [criticalkv.NORM_BLOCK, 16])
@pytest.mark.parametrize("press_cls", [CriticalKVPress, CriticalAdaKVPress])
@pytest.mark.parametrize("prune_share", [criticalkv.PRUNE_SLOT_SHARE, 1.0])
def test_pruned_selection_keeps_exactly_the_tokens_of_the_full_computation(ratio, signed, tail, block, press_cls,
                                                                           prune_share, monkeypatch):
    monkeypatch.setattr(criticalkv, "NORM_BLOCK", block)  # small blocks: many rounds of raising the threshold
    monkeypatch.setattr(criticalkv, "PRUNE_SLOT_SHARE", prune_share)  # 1.0: every head prunes, whatever its slots
    batch, kv_heads, group, seq_len = 2, 3, 3, 600
    state = _state(batch, kv_heads, group, seq_len, seed=int(ratio * 100) + signed)
    generator = torch.Generator().manual_seed(7)
    scores = _heavy_tailed_scores((batch, kv_heads, seq_len), generator, signed, tail)
    press = press_cls(compression_ratio=ratio)
    n_kept = press.n_kept(seq_len)

    chosen = press.select(scores, state, n_kept)
    # the same two stages with every norm computed (float64): top n_first by score, then by (score + eps) * norm
    factor = (scores.double() + press.epsilon) * _exact_norms(state)
    if press_cls is CriticalKVPress:
        first = torch.full((batch, kv_heads), int(n_kept * press.first_stage_ratio))
        budgets = torch.full((batch, kv_heads), n_kept)
    else:
        budgets = selection.adakv(scores, n_kept, press.alpha_safeguard).mask.sum(dim=-1)
        first = (budgets * press.first_stage_ratio).long().clamp_min(int(n_kept * press.alpha_safeguard))
    kept = chosen.mask if chosen.head_adaptive else torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen.indices, True)
    for i in range(batch):
        for h in range(kv_heads):
            stage_one = set(scores[i, h].argsort(descending=True)[: int(first[i, h])].tolist())
            rest = [t for t in factor[i, h].argsort(descending=True).tolist() if t not in stage_one]
            expected = stage_one | set(rest[: int(budgets[i, h]) - len(stage_one)])
            assert set(kept[i, h].nonzero().squeeze(-1).tolist()) == expected


def test_high_compression_computes_few_norms(monkeypatch):
    """At r = 0.875 most candidates cannot reach the few stage-two slots: their norms are never computed."""
    computed = []
    row_norms = criticalkv._row_norms
    monkeypatch.setattr(criticalkv, "_row_norms", lambda values, *rest: computed.append(values.shape[0]) or row_norms(values, *rest))
    batch, kv_heads, group, seq_len = 1, 3, 3, 2048
    state = _state(batch, kv_heads, group, seq_len)
    scores = _heavy_tailed_scores((batch, kv_heads, seq_len), torch.Generator().manual_seed(3))
    press = CriticalKVPress(compression_ratio=0.875)
    n_kept = press.n_kept(seq_len)
    press.select(scores, state, n_kept)
    candidates = kv_heads * (seq_len - int(n_kept * press.first_stage_ratio))
    slots = kv_heads * (n_kept - int(n_kept * press.first_stage_ratio))
    assert slots <= sum(computed) < 0.5 * candidates


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_low_compression_computes_every_candidate_without_bounds(ratio, monkeypatch):
    """Slots over a quarter of the candidates: bounds would prune too little to pay for themselves, so none are
    taken."""
    monkeypatch.setattr(criticalkv, "norm_upper_bound", lambda *a, **k: pytest.fail("bounds computed at low compression"))
    state = _state(1, 2, 2, 300)
    scores = _heavy_tailed_scores((1, 2, 300), torch.Generator().manual_seed(5))
    press = CriticalKVPress(compression_ratio=ratio)
    assert press.select(scores, state, press.n_kept(300)).indices.shape == (1, 2, press.n_kept(300))


def test_the_upper_bound_sits_on_the_norm_when_values_have_one_dimension():
    """With one value dimension every projected value is a multiple of the same row, so Cauchy-Schwarz holds with
    equality: the bound must sit on the norm, up to its rounding slack. Generic values never make it that tight, so
    a bound scaled below the norm by a few percent would still pass the test above; here it fails."""
    state = _state(1, 2, 3, 200, head_dim=1)
    weight = criticalkv.grouped_output_weight(state).flatten(2)
    ratio = criticalkv.norm_upper_bound(state.values.float(), weight, 3) / _exact_norms(state).float()
    assert float(ratio.min()) >= 1 and float(ratio.max()) < 1 + 2 * criticalkv.BOUND_SLACK


def _same_as_every_norm(press, scores, state, monkeypatch) -> bool:
    """The press keeps, with every head pruning, the tokens it keeps with every norm computed."""
    n_kept, seq_len = press.n_kept(scores.shape[-1]), scores.shape[-1]

    def kept() -> torch.Tensor:
        chosen = press.select(scores, state, n_kept)
        return chosen.mask if chosen.mask is not None else selection.mask_from_indices(chosen.indices, seq_len)

    monkeypatch.setattr(criticalkv, "PRUNE_SLOT_SHARE", 0.0)
    plain = kept()
    monkeypatch.setattr(criticalkv, "PRUNE_SLOT_SHARE", 1.0)
    return bool(torch.equal(kept(), plain))


@pytest.mark.parametrize("seq_len,ratio", [(8, 0.75), (64, 0.9)])
@pytest.mark.parametrize("press_cls", [CriticalKVPress, CriticalAdaKVPress])
def test_zero_values_on_the_tokens_that_weight_the_bound_keep_it_valid(seq_len, ratio, press_cls, monkeypatch):
    """The bound's column weights come from every 8th token; when those values are all zero (one token of a short
    context), equal weights stand in, where a near-zero floor made every bound NaN and pruning dropped the best
    tokens."""
    state = _state(1, 2, 2, seq_len)
    state.values[:, :, :: criticalkv.WEIGHT_SAMPLE_STRIDE] = 0
    weight = criticalkv.grouped_output_weight(state).flatten(2)
    upper = criticalkv.norm_upper_bound(state.values, weight, 2)
    assert bool(torch.isfinite(upper).all()) and bool((upper >= _exact_norms(state).float()).all())
    scores = _heavy_tailed_scores((1, 2, seq_len), torch.Generator().manual_seed(1), tail=1)
    assert _same_as_every_norm(press_cls(compression_ratio=ratio), scores, state, monkeypatch)


@pytest.mark.parametrize("value_scale,weight_scale", [(1e19, 1.0), (1e15, 1e3), (1e-25, 1e-3)])
def test_the_bounds_hold_at_magnitudes_whose_squares_leave_fp32(value_scale, weight_scale, monkeypatch):
    """The bounds square values and weights; scaled by powers of two first, they neither overflow (NaN bounds, no
    pruning order) nor vanish (bounds below the norm)."""
    state = _state(1, 2, 2, 200)
    state.values.mul_(value_scale)
    state.module.o_proj.weight.data.mul_(weight_scale)
    weight = criticalkv.grouped_output_weight(state).flatten(2)
    exact = _exact_norms(state).float()
    upper = criticalkv.norm_upper_bound(state.values, weight, 2)
    lower = criticalkv.norm_lower_bound(state.values, weight, 2)
    assert bool(torch.isfinite(exact).all() & (exact > 0).all())
    assert bool((upper >= exact).all()) and bool((lower <= exact).all()) and float((upper / exact).max()) < 2
    scores = _heavy_tailed_scores((1, 2, 200), torch.Generator().manual_seed(2))
    assert _same_as_every_norm(CriticalKVPress(compression_ratio=0.9), scores, state, monkeypatch)


def test_the_lower_bound_allows_for_rounding_when_values_nearly_vanish_under_the_projection():
    """A value almost orthogonal to W_O's columns has an L2 form made of rounding noise, far above its tiny true
    norm: the lower bound (the best case of a negative score) subtracts that rounding instead of trusting it."""
    generator = torch.Generator().manual_seed(0)
    module = output_projection_module(1, 1, 64, 4, generator)
    weight_t = module.o_proj.weight.detach().T  # [64, 4]: the row space of W_O^T has 4 dimensions of 64
    null = torch.randn(200, 64, generator=generator)
    null -= null @ weight_t @ torch.linalg.pinv(weight_t)
    values = (null + 1e-5 * torch.randn(200, 4, generator=generator) @ weight_t.T)[None, None]
    state = LayerState(module=module, layer_idx=0, hidden_states=torch.zeros(1, 200, 4), keys=values.clone(),
                       values=values, cos=None, sin=None, rotary=None)
    lower = criticalkv.norm_lower_bound(values, criticalkv.grouped_output_weight(state).flatten(2), 1)
    assert bool((lower <= _exact_norms(state).float()).all())
