"""The engine on tiny random models of every family and attention implementation, for every press."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvbench
from kvbench import model_access
from kvbench.compression.cache import CompressedLayer, PackedLayer
from kvbench.generation import base_model
from kvbench.presses import PRESSES
from tests.tiny_models import FAMILIES, tiny_model

RATIOS = (0.0, 0.25, 0.5, 0.75)
CONTEXT = 96
IMPLEMENTATIONS = ("eager", "sdpa")


@pytest.fixture(scope="module")
def models():
    return {(f, impl): tiny_model(f, impl) for f in FAMILIES for impl in IMPLEMENTATIONS}


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _spy(press):
    """Record the scores and selection the plumbing asks for, per layer."""
    seen = {}
    score, select = press.score, press.select

    def spy_score(state):
        seen.setdefault(state.layer_idx, {})["scores"] = out = score(state)
        return out

    def spy_select(scores, state, n_kept):
        seen[state.layer_idx]["selection"] = out = select(scores, state, n_kept)
        seen[state.layer_idx]["n_kept"] = n_kept
        return out

    press.score, press.select = spy_score, spy_select
    return seen


def _prefill(model, ids, press):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvbench.compress(model, press):
        base_model(model)(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("config", [
    {"model_type": "mistral", "sliding_window": 32},
    {"model_type": "qwen2", "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]},
])
def test_sliding_window_attention_is_refused(config):
    """Its cache layers keep only the last window, so the press would find nothing to compress."""
    from types import SimpleNamespace

    from kvbench.models import check_supported

    with pytest.raises(kvbench.KVBenchError, match="sliding-window attention.*full attention"):
        check_supported(SimpleNamespace(**config))
    check_supported(SimpleNamespace(**{**config, "sliding_window": None, "layer_types": ["full_attention"] * 2}))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(PRESSES))
def test_cache_holds_exactly_the_selected_tokens(models, family, impl, name):
    if impl != "eager" and getattr(PRESSES[name].scorer, "needs_attention_weights", False):
        pytest.skip("the press reads eager attention weights (refused under sdpa, tested in test_new_presses)")
    model = models[(family, impl)]
    ids = _ids(CONTEXT, 1)
    full = _prefill(model, ids, kvbench.build_press("no_press"))
    for ratio in RATIOS:
        press = kvbench.build_press(name, compression_ratio=ratio)
        seen = _spy(press)
        cache = _prefill(model, ids, press)
        n_kept = int(CONTEXT * (1 - ratio)) if name != "no_press" else CONTEXT
        for idx, layer in enumerate(cache.layers):
            assert layer.get_seq_length() == CONTEXT  # logical length is preserved
            if n_kept == CONTEXT:  # nothing scored, nothing removed: the prefill's own tensors, uncopied
                assert not seen and isinstance(layer, CompressedLayer) and layer.removed == 0
                assert torch.equal(layer.keys, full.layers[idx].keys)
                continue
            full_keys = full.layers[idx].keys
            chosen = seen[idx]["selection"]
            assert seen[idx]["n_kept"] == n_kept
            if press.head_adaptive:
                mask = chosen.mask
                heads = mask.shape[1]
                assert int(mask.sum()) == heads * n_kept  # same layer total as uniform
                assert layer.kept_pairs() == heads * n_kept
                # packed: each head stores exactly its selected keys and values, nothing else
                assert isinstance(layer, PackedLayer) and layer.lengths.tolist() == [mask[0].sum(-1).tolist()]
                assert layer.packed_keys.shape[0] == heads * n_kept and layer.keys.shape[-2] == 0
                for h, start in enumerate(layer.offsets()[0].tolist()):
                    stored = layer.packed_keys[start : start + int(layer.lengths[0, h])]
                    torch.testing.assert_close(stored, full_keys[0, h][mask[0, h]])
            else:
                assert layer.keys.shape[-2] == n_kept and layer.values.shape[-2] == n_kept
                expected = seen[idx]["scores"].topk(n_kept, dim=-1).indices.sort(dim=-1).values
                if name.startswith("critical"):
                    expected = chosen.indices  # two-stage: checked against its own selection
                else:
                    assert torch.equal(chosen.indices, expected)  # the kept tokens are the top-scored
                gathered = full_keys.gather(2, expected[..., None].expand(-1, -1, -1, full_keys.shape[-1]))
                torch.testing.assert_close(layer.keys, gathered)


def _answers(model, prompt_ids, question_sets, press, max_new_tokens=6):
    from kvbench.generation import Prompt, answer_questions

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompt = Prompt(context_ids=prompt_ids, question_ids=question_sets)
    return [a.token_ids for a in answer_questions(model, Tok(), prompt, press, max_new_tokens).answers]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_press_matches_generate_and_ratio_zero_matches_no_press(models, family, impl):
    model = models[(family, impl)]
    context, question = _ids(CONTEXT, 2), _ids(7, 3)
    reference = _answers(model, context, [question], kvbench.build_press("no_press"), 8)[0]
    generated = model.generate(torch.cat([context, question], 1), max_new_tokens=8, do_sample=False, eos_token_id=2)
    expected = generated[0, CONTEXT + 7 :].tolist()
    assert reference == expected[: len(reference)] and (len(reference) == 8 or reference[-1] == 2)
    for name in PRESSES:
        assert _answers(model, context, [question], kvbench.build_press(name, compression_ratio=0.0), 8)[0] == reference


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("name", ["snapkv", "adakv_snapkv", "critical_adakv_snapkv"])
def test_second_answer_does_not_depend_on_the_first(models, family, name):
    model = models[(family, "sdpa")]
    context, q1, q2 = _ids(CONTEXT, 4), _ids(5, 5), _ids(6, 6)
    press = kvbench.build_press(name, compression_ratio=0.5)
    together = _answers(model, context, [q1, q2], press)
    alone = _answers(model, context, [q2], press)
    assert together[1] == alone[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["snapkv", "adakv_snapkv", "expected_attention", "critical_adakv_snapkv"])
def test_compressed_cache_equals_full_cache_with_dropped_tokens_masked(models, family, impl, name):
    """Exactness: question logits over the compressed cache equal those of a full cache where each head
    sees only its kept tokens (positions of the question continue from the original length)."""
    model = models[(family, impl)]
    context, question = _ids(CONTEXT, 7), _ids(9, 8)
    press = kvbench.build_press(name, compression_ratio=0.5)
    seen = _spy(press)
    cache = _prefill(model, context, press)
    with torch.no_grad():
        logits = model(input_ids=question, past_key_values=cache).logits
    full = _prefill(model, context, kvbench.build_press("no_press"))
    heads, q_len = model.config.num_attention_heads, question.shape[1]
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(1, heads, q_len, q_len)

    def keep_mask(layer_idx):
        chosen = seen[layer_idx]["selection"]
        if chosen.mask is not None:
            return chosen.mask
        return torch.zeros(1, chosen.indices.shape[1], CONTEXT, dtype=torch.bool).scatter_(-1, chosen.indices, True)

    def per_layer_mask(module, args, kwargs):
        keep = keep_mask(module.layer_idx)
        keep = keep.repeat_interleave(heads // keep.shape[1], dim=1)[:, :, None, :].expand(-1, -1, q_len, -1)
        allowed = torch.cat([keep, causal], dim=-1)
        kwargs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return args, kwargs

    from kvbench.compression.head_mask import attention_modules

    handles = [m.register_forward_pre_hook(per_layer_mask, with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad():
            positions = torch.arange(CONTEXT, CONTEXT + q_len)[None]
            reference = model(input_ids=question, past_key_values=full, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["knorm", "adakv_snapkv"])
def test_positions_continue_from_original_length(models, name):
    model = models[("llama", "eager")]
    context, question = _ids(CONTEXT, 9), _ids(5, 10)
    press = kvbench.build_press(name, compression_ratio=0.75)
    implicit = _prefill(model, context, press)
    explicit = _prefill(model, context, press)
    with torch.no_grad():
        a = model(input_ids=question, past_key_values=implicit).logits
        b = model(input_ids=question, past_key_values=explicit, position_ids=torch.arange(CONTEXT, CONTEXT + 5)[None]).logits
        wrong = model(input_ids=question, past_key_values=_prefill(model, context, press), position_ids=torch.arange(24, 29)[None]).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, wrong, atol=1e-4)


def test_generate_continues_on_compressed_cache(models):
    model = models[("qwen3", "sdpa")]
    context, question = _ids(CONTEXT, 11), _ids(4, 12)
    press = kvbench.build_press("adakv_snapkv", compression_ratio=0.5)
    cache = _prefill(model, context, press)
    mine = _answers(model, context, [question], kvbench.build_press("adakv_snapkv", compression_ratio=0.5), 5)[0]
    out = model.generate(torch.cat([context, question], 1), past_key_values=cache, max_new_tokens=5, do_sample=False, eos_token_id=2)
    assert out[0, CONTEXT + 4 :].tolist()[: len(mine)] == mine


def test_flash_attention_layers_are_routed_through_sdpa_for_head_masks(models, monkeypatch):
    """flash kernels take no per-head mask: head-masked layers must run through sdpa, others untouched."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama", "sdpa")
    context, question = _ids(CONTEXT, 13), _ids(4, 14)
    press = kvbench.build_press("adakv_snapkv", compression_ratio=0.5)
    expected = None
    cache = _prefill(model, context, press)
    with torch.no_grad():
        expected = model(input_ids=question, past_key_values=cache).logits
    calls = []

    def fake_flash(module, q, k, v, mask, **kw):
        calls.append(module.layer_idx)
        raise AssertionError("a head-masked layer reached the flash kernel")

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fake_flash)
    cache = _prefill(model, context, press)
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with torch.no_grad():
            got = model(input_ids=question, past_key_values=cache).logits
    finally:
        model.config._attn_implementation_internal = "sdpa"
    assert calls == []
    torch.testing.assert_close(got, expected)
    assert model.config._attn_implementation == "sdpa"


def test_budget_keeps_a_fixed_number_of_tokens(models):
    model = models[("llama", "sdpa")]
    cache = _prefill(model, _ids(CONTEXT, 15), kvbench.build_press("snapkv", budget=40))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [40, 40]


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(kvbench.KVBenchError, match="llama, mistral, qwen2, qwen3, gpt_neox"):
        with kvbench.compress(model, kvbench.build_press("knorm", compression_ratio=0.5)):
            pass


@pytest.mark.parametrize("family", list(FAMILIES))
def test_snapkv_window_votes_equal_the_models_own_attention(models, family):
    """SnapKV recomputes the window queries itself; they must match the model's eager attention weights."""
    from kvbench.presses.base import LayerState
    from kvbench.presses.snapkv import window_votes

    model = models[(family, "eager")]
    caught = {}

    def grab(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = model_access.cache_from_kwargs(kwargs)
        caught[module.layer_idx] = (hidden, kwargs["position_embeddings"], cache.layers[module.layer_idx].keys, output[1])

    from kvbench.compression.head_mask import attention_modules

    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad():
            model(_ids(CONTEXT, 16), past_key_values=DynamicCache(config=model.config), output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    for idx, (hidden, (cos, sin), keys, attention) in caught.items():
        module = attention_modules(model)[idx]
        state = LayerState(module, idx, hidden, keys, keys, cos, sin, rotary=None)
        votes = window_votes(state, 16)
        torch.testing.assert_close(votes.reshape(attention.shape[1], CONTEXT), attention[0, :, -16:].mean(dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_presses_see_the_queries_the_attention_computed(models, family, impl):
    """The plumbing hands presses the prefill's own queries (no second projection); they, and the keys and
    queries rotated back before RoPE, equal what the module's projections give."""
    model = models[(family, impl)]
    press = kvbench.build_press("knorm", compression_ratio=0.5)
    states = {}
    score = press.score

    def keep_state(state):
        states[state.layer_idx] = state
        return score(state)

    press.score = keep_state
    _prefill(model, _ids(CONTEXT, 21), press)
    assert len(states) == model.config.num_hidden_layers
    for state in states.values():
        assert state.queries is not None and state.queries.shape[-2] == CONTEXT
        hidden, cos, sin = state.hidden_states, state.cos, state.sin
        torch.testing.assert_close(state.queries, model_access.queries(state.module, hidden, cos, sin))
        inner = slice(5, CONTEXT - 3)
        torch.testing.assert_close(state.pre_rope_queries(inner), model_access.pre_rope_queries(state.module, hidden[:, inner]))
        torch.testing.assert_close(state.pre_rope_keys(inner), model_access.pre_rope_keys(state.module, hidden[:, inner]))
    # The routing is one call deep: the model's attention implementation is back, and nothing is left captured.
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_kvbench_queries") for m in model.modules())
