"""Scorers and selections on hand-made inputs, and the press registry against conf/press."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import kvbench
from kvbench.model_access import apply_rope
from kvbench.presses import PRESSES, press_parameters, selection
from kvbench.presses.compactor import leverage
from kvbench.presses.expected_attention import mean_rotation
from kvbench.presses.snapkv import pool_same_length
from tests.tiny_models import output_projection_module

CONF = Path(__file__).resolve().parent.parent / "conf" / "press"


def test_adakv_keeps_the_layer_total_with_a_per_head_floor():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]])
    chosen = selection.adakv(scores, n_kept=3, alpha_safeguard=0.34)  # floor: int(3 * 0.34) = 1 per head
    assert chosen.mask.tolist() == [[[True, True, True, True, True, False], [False, False, False, False, False, True]]]
    no_floor = selection.adakv(scores, n_kept=3, alpha_safeguard=0.0)
    assert no_floor.mask[0, 1].sum() == 0 and no_floor.mask.sum() == 6


def test_a_safeguard_below_one_token_still_keeps_one_per_head():
    """kvpress 0.5.5 rounds a positive safeguard up to one token (int(5 * 0.1) = 0 would let head 1 lose its whole
    context to head 0), for AdaKV and for CriticalKV's head-adaptive variant alike."""
    from kvbench.presses.base import LayerState
    from kvbench.presses.criticalkv import CriticalAdaKVPress

    scores = torch.stack([torch.arange(20.0, 10.0, -1), torch.arange(10.0)]).unsqueeze(0)  # head 0 beats head 1 everywhere
    assert selection.adakv(scores, n_kept=5, alpha_safeguard=0.1).mask.sum(-1).tolist() == [[9, 1]]
    assert selection.adakv(scores, n_kept=5, alpha_safeguard=0.0).mask.sum(-1).tolist() == [[10, 0]]
    assert selection.adakv(scores, n_kept=0, alpha_safeguard=0.1).mask.sum().item() == 0
    assert selection.safeguard_count(5, 0.1) == 1 and selection.safeguard_count(10, 0.25) == 2

    generator = torch.Generator().manual_seed(0)
    module = output_projection_module(2, 1, 4, 8, generator)
    values = torch.randn(1, 2, 10, 4, generator=generator)
    state = LayerState(module=module, layer_idx=0, hidden_states=torch.zeros(1, 10, 8), keys=values.clone(), values=values,
                       cos=None, sin=None, rotary=None)
    press = CriticalAdaKVPress(compression_ratio=0.5, alpha_safeguard=0.1)
    kept = press.select(scores, state, 5).mask
    assert kept.sum(-1).tolist() == [[9, 1]] and bool(kept[0, 1, 9])  # head 1's own best token


def test_uniform_selection_is_sorted_top_k():
    scores = torch.tensor([[[0.5, 0.9, 0.1, 0.8]]])
    assert selection.uniform(scores, 2).indices.tolist() == [[[1, 3]]]


def test_pooling_keeps_length_and_averages_neighbours():
    x = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
    assert pool_same_length(x, 3, "avg")[0].tolist() == pytest.approx([0.0, 5 / 3, 5 / 3, 5 / 3, 0.0, 0.0])
    assert pool_same_length(x, 3, "max").tolist() == [[0.0, 5.0, 5.0, 5.0, 0.0, 0.0]]
    assert pool_same_length(torch.rand(2, 3, 7), 4, "avg").shape == (2, 3, 7)


def test_mean_rotation_equals_the_average_of_rotated_vectors():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for partial in (1.0, 0.5):
        config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial})
        rotary = LlamaRotaryEmbedding(config)
        x = torch.randn(1, 1, 1, 32)
        positions = torch.arange(100, 164)[None]
        cos, sin = rotary(x, positions)
        if partial < 1:  # rotate only the first half of each head
            cos, sin = cos[..., :16], sin[..., :16]
        rotated = apply_rope(x.expand(1, 1, 64, 32), cos, sin)  # every position
        averaged = rotated.mean(dim=2)
        torch.testing.assert_close(x[0, 0] @ mean_rotation(cos[0], sin[0], 32).T, averaged[0], rtol=1e-5, atol=1e-5)


def test_leverage_without_sketch_is_the_hat_matrix_diagonal():
    keys = torch.randn(1, 1, 50, 8, dtype=torch.float64)
    x = (keys - keys.mean(dim=-2, keepdim=True))[0, 0]
    hat = x @ torch.linalg.inv(x.T @ x) @ x.T
    got = leverage(keys.float(), sketch_dimension=48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got[0, 0].double(), hat.diagonal(), rtol=1e-3, atol=1e-3)
    assert got.sum().item() == pytest.approx(8, rel=1e-3)  # trace of a projection = its rank


def test_sketched_leverage_is_seeded():
    keys = torch.randn(1, 2, 64, 64)
    a = leverage(keys, 48, torch.Generator().manual_seed(3))
    b = leverage(keys, 48, torch.Generator().manual_seed(3))
    c = leverage(keys, 48, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_build_press_routes_parameters_and_rejects_unknown_ones():
    press = kvbench.build_press("adakv_compactor", compression_ratio=0.5, alpha_safeguard=0.3, chunk_size=64)
    assert press.alpha_safeguard == 0.3 and press.press.chunk_size == 64 and press.press.compression_ratio == 0.5
    assert kvbench.build_press("expected_attention").press.epsilon == 1e-2
    assert kvbench.build_press("snapkv", budget=128).n_kept(1000) == 128
    assert kvbench.build_press("snapkv", compression_ratio=0.75).n_kept(1000) == 250
    with pytest.raises(kvbench.KVBenchError, match="valid names: adakv_compactor"):
        kvbench.build_press("nope")
    with pytest.raises(kvbench.KVBenchError, match="has no parameter kernel"):
        kvbench.build_press("snapkv", kernel=3)
    with pytest.raises(kvbench.KVBenchError, match=r"compression_ratio must be a number in \[0, 1\)"):
        kvbench.build_press("knorm", compression_ratio=1.0)


@pytest.mark.parametrize("name", list(PRESSES))
def test_every_press_has_a_config_file_listing_its_parameters(name):
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    expected = {k: v for k, v in press_parameters(name).items() if k not in ("compression_ratio", "budget")}
    assert config == {"name": name, **expected}


def _loop_value_norm(values: torch.Tensor, weight: torch.Tensor, group: int) -> list:
    """||v W_O^h||_1 per (batch, kv head, token), mean over the query heads of the group: plain loops."""
    b, kv_heads, seq_len, d = values.shape
    out = [[[0.0] * seq_len for _ in range(kv_heads)] for _ in range(b)]
    for i in range(b):
        for h in range(kv_heads):
            for t in range(seq_len):
                total = 0.0
                for g in range(group):
                    q_head = h * group + g
                    w = weight[:, q_head * d : (q_head + 1) * d].double()
                    total += float((w @ values[i, h, t].double()).abs().sum())
                out[i][h][t] = total / group
    return out


def _loop_adakv_budgets(scores: list, n_kept: int, alpha: float) -> list[int]:
    """AdaKV per-head counts for one batch row: each head's top int(n_kept * alpha) (at least one), then the best of
    the rest."""
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 and n_kept > 0 else 0
    kv_heads = len(scores)
    safe = set()
    for h, row in enumerate(scores):
        for t in sorted(range(len(row)), key=lambda t: -row[t])[:n_safe]:
            safe.add((h, t))
    rest = sorted(((h, t) for h in range(kv_heads) for t in range(len(scores[h])) if (h, t) not in safe),
                  key=lambda ht: -scores[ht[0]][ht[1]])
    chosen = safe | set(rest[: kv_heads * n_kept - len(safe)])
    return [sum(1 for (hh, _) in chosen if hh == h) for h in range(kv_heads)]


def _loop_critical(scores: list, norms: list, budgets: list[int], firsts: list[int], eps: float) -> list[list[bool]]:
    """Per head: stage one = the ``first`` best by score; stage two fills the budget by (score + eps) * norm."""
    masks = []
    for row, norm, budget, first in zip(scores, norms, budgets, firsts):
        by_score = sorted(range(len(row)), key=lambda t: -row[t])
        kept = set(by_score[:first])
        rest = sorted((t for t in range(len(row)) if t not in kept), key=lambda t: -((row[t] + eps) * norm[t]))
        kept |= set(rest[: budget - len(kept)])
        masks.append([t in kept for t in range(len(row))])
    return masks


@pytest.mark.parametrize(
    "batch,kv_heads,group,seq_len,ratio,first_stage_ratio",
    [(1, 2, 1, 12, 0.5, 0.5), (2, 3, 2, 20, 0.75, 0.5), (1, 4, 3, 33, 0.25, 0.3), (2, 2, 4, 16, 0.6, 0.9),
     (2, 4, 1, 12, 0.75, 0.5)],  # the last: int(3 * 0.2) = 0, a safeguard of one token
)
def test_critical_adakv_selection_matches_a_straightforward_loop(batch, kv_heads, group, seq_len, ratio, first_stage_ratio):
    from kvbench.presses.base import LayerState
    from kvbench.presses.criticalkv import CriticalAdaKVPress, CriticalKVPress

    generator = torch.Generator().manual_seed(seq_len * 7 + kv_heads)
    head_dim, hidden = 4, 8
    module = output_projection_module(kv_heads, group, head_dim, hidden, generator)
    values = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    state = LayerState(module=module, layer_idx=0, hidden_states=torch.zeros(batch, seq_len, hidden), keys=values.clone(),
                       values=values, cos=None, sin=None, rotary=None)
    scores = torch.rand(batch, kv_heads, seq_len, generator=generator)
    norms = _loop_value_norm(values, module.o_proj.weight.detach(), group)
    eps = 1e-4

    press = CriticalAdaKVPress(compression_ratio=ratio, first_stage_ratio=first_stage_ratio, epsilon=eps, alpha_safeguard=0.2)
    n_kept = press.n_kept(seq_len)
    mask = press.select(scores, state, n_kept).mask
    n_safe = max(1, int(n_kept * 0.2))
    for i in range(batch):
        rows = scores[i].tolist()
        budgets = _loop_adakv_budgets(rows, n_kept, 0.2)
        firsts = [max(n_safe, int(budget * first_stage_ratio)) for budget in budgets]
        expected = _loop_critical(rows, norms[i], budgets, firsts, eps)
        assert mask[i].tolist() == expected
        assert sum(budgets) == kv_heads * n_kept

    uniform = CriticalKVPress(compression_ratio=ratio, first_stage_ratio=first_stage_ratio, epsilon=eps)
    indices = uniform.select(scores, state, n_kept).indices
    for i in range(batch):
        expected = _loop_critical(scores[i].tolist(), norms[i], [n_kept] * kv_heads,
                                  [int(n_kept * first_stage_ratio)] * kv_heads, eps)
        assert [[t for t, keep in enumerate(row) if keep] for row in expected] == indices[i].tolist()


@pytest.mark.parametrize("chunk_heads", [1, 2, 3, 4, 7, 100])
@pytest.mark.parametrize("window", [1, 5])
def test_window_votes_are_the_same_in_any_chunking(monkeypatch, chunk_heads, window):
    """SnapKV's votes go through the query heads in chunks (one query head, part of a KV head's group, several KV
    heads, a batch's last partial chunk): every chunking gives the mean attention of the window queries, computed
    here in one piece in float64."""
    from kvbench.presses import snapkv
    from kvbench.presses.base import LayerState

    batch, kv_heads, group, seq_len, d = 2, 2, 3, 37, 8
    monkeypatch.setattr(snapkv, "LOGITS_CHUNK_BYTES", 4 * window * seq_len * chunk_heads)
    generator = torch.Generator().manual_seed(chunk_heads)
    queries = torch.randn(batch, kv_heads * group, seq_len, d, generator=generator)
    keys = torch.randn(batch, kv_heads, seq_len, d, generator=generator)
    state = LayerState(module=None, layer_idx=0, hidden_states=None, keys=keys, values=keys, cos=None, sin=None,
                       rotary=None, queries=queries)
    logits = queries[:, :, -window:].double() @ keys.double().repeat_interleave(group, dim=1).transpose(-1, -2) / d**0.5
    future = torch.ones(window, seq_len, dtype=torch.bool).triu(seq_len - window + 1)
    expected = logits.masked_fill(future, float("-inf")).softmax(dim=-1).mean(dim=-2)
    votes = snapkv.window_votes(state, window)
    assert votes.shape == (batch, kv_heads, group, seq_len)
    torch.testing.assert_close(votes.reshape(expected.shape).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rotary_dims", [16, 8])
def test_apply_rope_is_the_models_rotation_to_the_bit(rotary_dims):
    """kvbench rotates in place to save memory; the result must be transformers' ``q * cos + rotate_half(q) * sin``
    bit for bit (full rotary: Llama's own function; partial: that formula on the rotary dims, the rest unchanged),
    for the strided queries the attention hands over too."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    generator = torch.Generator().manual_seed(rotary_dims)
    x = torch.randn(2, 7, 3, 16, generator=generator).transpose(1, 2)  # [b, h, n, d] as a view of [b, n, h, d]
    cos, sin = torch.randn(2, 2, 7, rotary_dims, generator=generator).unbind(0)
    ours = apply_rope(x, cos, sin)
    if rotary_dims == x.shape[-1]:
        expected = apply_rotary_pos_emb(x, x, cos, sin)[0]
    else:
        rot = x[..., :rotary_dims]
        expected = torch.cat((rot * cos[:, None] + rotate_half(rot) * sin[:, None], x[..., rotary_dims:]), dim=-1)
    assert torch.equal(ours, expected)


def test_the_random_press_draws_other_scores_in_every_layer_and_the_same_ones_again():
    """The floor every method must beat: one seed for all layers would drop the same positions in each of them."""
    from dataclasses import replace

    from kvbench.presses.base import LayerState

    keys = torch.zeros(1, 2, 50, 4)
    state = LayerState(module=None, layer_idx=0, hidden_states=None, keys=keys, values=keys, cos=None, sin=None, rotary=None)
    press = kvbench.build_press("random", compression_ratio=0.5)
    first, second = press.score(state), press.score(replace(state, layer_idx=1))
    assert first.shape == (1, 2, 50) and not torch.equal(first, second)
    assert torch.equal(first, press.score(state))
    assert not torch.equal(first, kvbench.build_press("random", compression_ratio=0.5, seed=1).score(state))
