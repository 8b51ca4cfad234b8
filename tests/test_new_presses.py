"""TOVA, KeyDiff, observed attention, PyramidKV, the critical Expected Attention presses and StreamingLLM's key
re-rotation: each on the property that defines it (hand-made inputs, tiny random models). Agreement with kvpress
itself is tests/test_reference.py's job."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import kvbench
from kvbench.compression.cache import stored_lengths
from kvbench.errors import KVBenchError
from kvbench.generation import base_model
from kvbench.model_access import cache_argument
from kvbench.presses import PRESSES, Press, selection
from kvbench.presses.base import LayerState
from kvbench.presses.criticalkv import CriticalAdaKVPress, CriticalKVPress
from kvbench.presses.expected_attention import ExpectedAttentionPress
from kvbench.presses.keydiff import KeyDiffPress
from kvbench.presses.observed_attention import ObservedAttentionPress
from kvbench.presses.pyramidkv import pyramid_budget
from kvbench.presses.tova import TOVAPress
from tests.tiny_models import FAMILIES, tiny_model

CONTEXT = 80


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@dataclass
class _Recorder(Press):
    """Keeps every layer's state (and removes a token so the plumbing asks for a selection)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.states: dict[int, LayerState] = {}

    def score(self, state: LayerState) -> torch.Tensor:
        self.states[state.layer_idx] = state
        return torch.zeros(state.keys.shape[:-1])


def _prefill(model, ids: torch.Tensor, press: Press) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvbench.compress(model, press):
        base_model(model)(input_ids=ids, **{cache_argument(model): cache})
    return cache


def _states(model, ids: torch.Tensor) -> dict[int, LayerState]:
    recorder = _Recorder(compression_ratio=0.5)
    _prefill(model, ids, recorder)
    return recorder.states


def _without_weights(state: LayerState) -> LayerState:
    return LayerState(**{**state.__dict__, "attention_weights": None})


# --- TOVA -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tova_keeps_the_tokens_the_last_query_attends_to_most(family):
    """With eager weights the kept tokens are the top of the last row of the head-averaged attention (plus the last
    token); under sdpa the recomputed last-query attention ranks the tokens the same way."""
    model = tiny_model(family, "eager")
    states = _states(model, _ids(CONTEXT))
    press = TOVAPress(compression_ratio=0.5)
    n_kept = press.n_kept(CONTEXT)
    for state in states.values():
        last_row = state.attention_weights[0, :, -1, :-1].mean(dim=0)  # [seq - 1]
        expected = torch.cat([last_row.topk(n_kept - 1).indices, torch.tensor([CONTEXT - 1])]).sort().values
        chosen = press.select(press.score(state), state, n_kept).indices
        for head in range(chosen.shape[1]):  # one ranking per layer: every KV head keeps the same tokens
            assert torch.equal(chosen[0, head], expected)
        recomputed = press.score(_without_weights(state))
        torch.testing.assert_close(recomputed[..., :-1], press.score(state)[..., :-1], rtol=1e-4, atol=1e-6)


def test_tova_ranking_is_the_head_average_not_one_head():
    """Hand-made weights: head 0 looks at token 0, head 1 (much harder) at token 2; the average prefers token 2."""
    weights = torch.zeros(1, 2, 4, 4)
    weights[0, 0, -1] = torch.tensor([0.6, 0.3, 0.1, 0.0])
    weights[0, 1, -1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    keys = torch.zeros(1, 1, 4, 8)
    state = LayerState(None, 0, torch.zeros(1, 4, 8), keys, keys, keys[0], keys[0], lambda p: (p, p), weights)
    scores = TOVAPress(compression_ratio=0.5).score(state)
    assert scores[0, 0].argsort(descending=True).tolist() == [3, 2, 0, 1]


# --- KeyDiff ----------------------------------------------------------------------------------------------------


def test_keydiff_keeps_the_keys_least_similar_to_the_mean_key():
    """Twelve keys near one direction and four pointing elsewhere: the four outliers are what KeyDiff keeps, whatever
    their norms (cosine similarity, so scaling a key never changes its score)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=generator)
    keys = base + 0.05 * torch.randn(16, 16, generator=generator)
    outliers = torch.tensor([3, 7, 11, 14])
    keys[outliers] = torch.randn(4, 16, generator=generator)
    keys = keys * torch.linspace(0.1, 10, 16)[:, None]  # norms must not matter
    keys = keys[None, None]
    state = LayerState(None, 0, torch.zeros(1, 16, 16), keys, keys, keys[0], keys[0], lambda p: (p, p))
    press = KeyDiffPress(compression_ratio=0.75)
    chosen = press.select(press.score(state), state, press.n_kept(16)).indices
    assert chosen[0, 0].tolist() == outliers.tolist()
    torch.testing.assert_close(press.score(state), KeyDiffPress().score(LayerState(**{**state.__dict__, "keys": 3 * keys})))


# --- observed attention -----------------------------------------------------------------------------------------


def test_observed_attention_is_the_mean_attention_a_key_received():
    """Key j of L is seen by L - j causal queries; the score is its received attention over them, averaged over the
    query heads of its KV head (2 query heads per KV head here)."""
    generator = torch.Generator().manual_seed(0)
    seq_len = 6
    logits = torch.randn(1, 4, seq_len, seq_len, generator=generator)
    logits = logits.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    weights = logits.softmax(dim=-1)
    keys = torch.zeros(1, 2, seq_len, 8)
    state = LayerState(None, 0, torch.zeros(1, seq_len, 8), keys, keys, keys[0], keys[0], lambda p: (p, p), weights)
    scores = ObservedAttentionPress().score(state)
    for kv_head in range(2):
        for j in range(seq_len):
            received = [weights[0, h, i, j] for h in (2 * kv_head, 2 * kv_head + 1) for i in range(j, seq_len)]
            assert math.isclose(float(scores[0, kv_head, j]), float(sum(received)) / (2 * (seq_len - j)), rel_tol=1e-5)


def test_observed_attention_refuses_sdpa_with_one_line_and_works_with_eager():
    press = kvbench.build_press("observed_attention", compression_ratio=0.5)
    assert press.needs_attention_weights  # what the runner reads to refuse before loading the model
    with pytest.raises(KVBenchError, match="set model.attn_implementation=eager") as info:
        _prefill(tiny_model("llama", "sdpa"), _ids(CONTEXT), press)
    assert "\n" not in str(info.value)
    cache = _prefill(tiny_model("llama", "eager"), _ids(CONTEXT), press)
    assert stored_lengths(cache) == [CONTEXT // 2] * 2


def test_only_observed_attention_needs_attention_weights():
    needing = {name for name in PRESSES if getattr(kvbench.build_press(name), "needs_attention_weights", False)}
    assert needing == {"observed_attention"}


# --- PyramidKV --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, ratio, layers", [(4096, 0.5, 32), (2000, 0.25, 24), (8192, 0.75, 30), (16384, 0.875, 32)])
def test_pyramid_budgets_keep_the_uniform_total_and_shrink_with_depth(seq_len, ratio, layers):
    mean = seq_len * (1 - ratio)
    budgets = [pyramid_budget(mean, seq_len, 64, 20, i, layers) for i in range(layers)]
    assert abs(sum(budgets) - layers * mean) <= layers / 2  # the same total, up to rounding each layer
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[0] > budgets[-1]
    assert budgets[0] <= seq_len - 64 and budgets[-1] >= 64  # the caps: no layer keeps all, each keeps its window


def test_pyramid_falls_back_to_the_uniform_budget_when_the_pyramid_does_not_fit():
    """320 tokens at 0.875 keep 40 per layer: the thinnest layer could not hold its 64-token window."""
    assert [pyramid_budget(40.0, 320, 64, 20, i, 2) for i in range(2)] == [40, 40]
    assert [pyramid_budget(87.5, 700, 64, 20, i, 30) for i in (0, 29)] == [88, 88]  # rounded to nearest, as kvpress


def test_pyramidkv_caches_follow_the_pyramid_and_keep_snapkv_choices():
    """A 4-layer model on 320 tokens at ratio 0.5: layers keep 256, 192, 128, 64 (kvpress' line from
    seq_len - window down to the window); inside each layer the kept tokens are SnapKV's top scores. Layers of
    different lengths must still answer a multi-token question, identically in the packed and masked layouts."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    question = _ids(8, seed=3)
    logits = {}
    for layout in ("packed", "masked"):
        press = kvbench.build_press("pyramidkv", compression_ratio=0.5)
        seen = {}
        select = press.select

        def spy(scores, state, n_kept):
            seen[state.layer_idx] = (scores, chosen := select(scores, state, n_kept))
            return chosen

        press.select = spy
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), kvbench.compress(model, press, layout=layout):
            base_model(model)(input_ids=_ids(320), **{cache_argument(model): cache})
        assert [layer.kept_pairs() for layer in cache.layers] == [2 * n for n in (256, 192, 128, 64)]
        for scores, chosen in seen.values():
            n = int(chosen.mask[0, 0].sum())
            assert torch.equal(chosen.mask, selection.mask_from_indices(scores.topk(n, dim=-1).indices, 320))
            assert chosen.mask[..., -64:].all()  # the window is always kept
        with torch.no_grad():
            logits[layout] = model(input_ids=question, **{cache_argument(model): cache}).logits[0, -1]
    torch.testing.assert_close(logits["packed"], logits["masked"], rtol=1e-4, atol=1e-5)


def test_pyramidkv_rejects_a_flat_beta():
    with pytest.raises(KVBenchError, match="beta must be a number >= 1"):
        kvbench.build_press("pyramidkv", beta=0.5)


# --- CriticalKV around Expected Attention -----------------------------------------------------------------------


@pytest.mark.parametrize("name, wrapper", [("critical_expected_attention", CriticalKVPress),
                                           ("critical_adakv_expected_attention", CriticalAdaKVPress)])
def test_critical_expected_attention_drops_the_value_norm_and_keeps_the_sinks(name, wrapper):
    press = kvbench.build_press(name, compression_ratio=0.75)
    assert isinstance(press, wrapper) and isinstance(press.press, ExpectedAttentionPress)
    assert press.press.use_vnorm is False and press.epsilon == 1e-4 and press.first_stage_ratio == 0.5
    seen = {}
    select = press.select

    def spy(scores, state, n_kept):
        seen[state.layer_idx] = chosen = select(scores, state, n_kept)
        return chosen

    press.select = spy
    model = tiny_model("llama", "sdpa")
    cache = _prefill(model, _ids(CONTEXT), press)
    for chosen in seen.values():
        mask = chosen.mask if chosen.head_adaptive else torch.zeros(1, 2, CONTEXT, dtype=torch.bool).scatter_(-1, chosen.indices, True)
        assert mask[..., :4].all()  # Expected Attention's sinks survive both stages
        assert int(mask.sum()) == 2 * (CONTEXT // 4)
    assert sum(layer.kept_pairs() for layer in cache.layers) == 2 * 2 * (CONTEXT // 4)


# --- StreamingLLM with key re-rotation --------------------------------------------------------------------------


def _one_layer(family: str):
    torch.manual_seed(0)
    if family == "gpt_neox":  # partial rotary: only a quarter of each head is rotated
        config = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, partial_rotary_factor=0.25, max_position_embeddings=1024)
        return GPTNeoXForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_rerotated_streaming_cache_is_the_cache_of_the_kept_tokens_alone(family):
    """In a one-layer model a key depends only on its token and position, so re-rotated StreamingLLM must leave
    exactly the cache a model builds from the kept tokens at positions 0..n_kept-1, and a question must then give the
    same logits as on that short prompt (it continues at n_kept, not at the original length)."""
    model = _one_layer(family)
    ids, question = _ids(CONTEXT), _ids(6, seed=2)
    press = kvbench.build_press("streaming_llm", compression_ratio=0.5, key_rerotation=True)
    assert press.rerotates_keys
    n_kept = press.n_kept(CONTEXT)
    kept_ids = torch.cat([ids[:, :4], ids[:, CONTEXT - (n_kept - 4) :]], dim=1)
    cache = _prefill(model, ids, press)
    direct = DynamicCache(config=model.config)
    with torch.no_grad():
        base_model(model)(input_ids=kept_ids, **{cache_argument(model): direct})
    torch.testing.assert_close(cache.layers[0].keys, direct.layers[0].keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.layers[0].values, direct.layers[0].values)
    with torch.no_grad():
        logits = model(input_ids=question, **{cache_argument(model): cache}).logits[0, -1]
        expected = model(input_ids=torch.cat([kept_ids, question], dim=1)).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    plain = _prefill(model, ids, kvbench.build_press("streaming_llm", compression_ratio=0.5))
    rerotated = cache.layers[0].keys[..., :n_kept, :]  # the question's tokens follow
    assert not torch.allclose(plain.layers[0].keys[..., 4:, :], rerotated[..., 4:, :])  # it did re-rotate
    torch.testing.assert_close(plain.layers[0].keys[..., :4, :], rerotated[..., :4, :])  # sinks stay put


def test_streaming_llm_does_not_rerotate_by_default():
    assert not kvbench.build_press("streaming_llm").rerotates_keys
