"""The packed head-adaptive cache and batched evaluation: real memory savings, same answers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvbench
from kvbench import compression
from kvbench.compression.cache import kv_bytes
from kvbench.generation import Prompt, _step, answer_prompts, base_model, continuations_nll, prefill
from tests.tiny_models import tiny_model

CONTEXT = 96
# Every registry press whose selections go through the head-adaptive paths (new presses join by themselves)
HEAD_ADAPTIVE = [name for name in kvbench.PRESSES if kvbench.build_press(name).head_adaptive]


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, ids, press, layout="packed"):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvbench.compress(model, press, layout=layout):
        base_model(model)(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("name", HEAD_ADAPTIVE)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_packed_cache_holds_at_most_its_share_of_the_bytes(name, ratio):
    assert {"adakv_snapkv", "expected_attention", "critical_adakv_snapkv", "adakv_compactor",
            "critical_adakv_expected_attention", "pyramidkv"} <= set(HEAD_ADAPTIVE)
    model = tiny_model("llama")
    ids = _ids(CONTEXT, 0)
    full = kv_bytes(_cache(model, ids, kvbench.build_press("no_press")))
    packed = kv_bytes(_cache(model, ids, kvbench.build_press(name, compression_ratio=ratio)))
    masked = kv_bytes(_cache(model, ids, kvbench.build_press(name, compression_ratio=ratio), "masked"))
    assert packed <= 1.05 * (1 - ratio) * full
    assert packed <= masked


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_and_masked_layouts_decode_the_same_tokens(family, impl):
    model = tiny_model(family, impl)
    prompt = Prompt(_ids(CONTEXT, 1), [_ids(6, 2), _ids(4, 3)])
    for name in HEAD_ADAPTIVE:
        press = kvbench.build_press(name, compression_ratio=0.5)
        packed = answer_prompts(model, Tok(), [prompt], [press], [[8, 8]], "packed")[0][0]
        masked = answer_prompts(model, Tok(), [prompt], [press], [[8, 8]], "masked")[0][0]
        assert [a.token_ids for a in packed.answers] == [a.token_ids for a in masked.answers]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_batch_answers_as_each_context_alone(family):
    model = tiny_model(family)
    prompts = [Prompt(_ids(n, n), [_ids(m, n + 1)]) for n, m in [(80, 5), (96, 7), (64, 3)]]
    for name in ["no_press", "snapkv", "adakv_snapkv", "streaming_llm"]:
        press = kvbench.build_press(name, compression_ratio=0.5)
        batched = answer_prompts(model, Tok(), prompts, [press], [[8]] * 3)[0]
        alone = [answer_prompts(model, Tok(), [p], [press], [[8]])[0][0] for p in prompts]
        assert [b.answers[0].token_ids for b in batched] == [a.answers[0].token_ids for a in alone]
        together = continuations_nll(model, [p.context_ids for p in prompts], [p.question_ids[0] for p in prompts], [press])[0]
        single = [continuations_nll(model, [p.context_ids], [p.question_ids[0]], [press])[0][0] for p in prompts]
        for (nll_b, *_), (nll_a, *_) in zip(together, single):
            assert abs(nll_b - nll_a) <= 1e-5 * abs(nll_a)


def test_a_batch_reports_each_contexts_own_kept_share_and_bytes():
    """Kept pairs and bytes before compression are each context's own (the padding counted for none), as alone."""
    model = tiny_model("llama")
    prompts = [Prompt(_ids(n, n), [_ids(4, n + 1)]) for n in (48, 96)]
    for press in [kvbench.build_press("snapkv", budget=24), kvbench.build_press("adakv_snapkv", compression_ratio=0.5)]:
        batched = answer_prompts(model, Tok(), prompts, [press], [[2]] * 2)[0]
        alone = [answer_prompts(model, Tok(), [p], [press], [[2]])[0][0] for p in prompts]
        for b, a in zip(batched, alone):
            assert (b.compression.kept_pairs, b.compression.total_pairs) == (a.compression.kept_pairs, a.compression.total_pairs)
            assert b.compression.kv_bytes_before == a.compression.kv_bytes_before
            assert b.kv_bytes_after == pytest.approx(a.kv_bytes_after, rel=0.05)


def test_one_prefill_serves_several_presses_as_separate_prefills_would():
    model = tiny_model("llama")
    prompt = Prompt(_ids(CONTEXT, 4), [_ids(5, 5)])
    presses = [kvbench.build_press(n, compression_ratio=r) for n, r in [("snapkv", 0.5), ("knorm", 0.75), ("adakv_snapkv", 0.25), ("no_press", 0.0)]]
    shared = answer_prompts(model, Tok(), [prompt], presses, [[8]])
    for press, runs in zip(presses, shared):
        alone = answer_prompts(model, Tok(), [prompt], [press], [[8]])[0][0]
        assert runs[0].answers[0].token_ids == alone.answers[0].token_ids
        assert runs[0].kv_bytes_after == alone.kv_bytes_after


# Uniform and head-adaptive selections, with and without the captured queries and the projected value norms
BATCH_PRESSES = ["snapkv", "knorm", "adakv_snapkv", "expected_attention", "critical_adakv_snapkv"]
TIE = 1e-4  # a batched greedy token may differ from batch size 1's only where its top two logits are this close


def _recording_selections(monkeypatch) -> dict:
    """Kept masks of every selection made, by (layer, context length): contexts of a test differ in length."""
    kept = {}
    select = compression._select

    def recording(press, state):
        chosen = select(press, state)
        kept[(state.layer_idx, state.seq_len)] = compression._kept_mask(chosen, state.seq_len).clone()
        return chosen

    monkeypatch.setattr(compression, "_select", recording)
    return kept


def _assert_same_or_tied(model, prompt, press, batched: list[int], alone: list[int]) -> None:
    """Batched tokens equal batch size 1's, or part where batch size 1 itself had a near tie (top two logits
    within ``TIE``) at the first differing step, the only reason a padded batch may decode differently."""
    if batched == alone:
        return
    step = next(i for i, (a, b) in enumerate(zip(alone, batched)) if a != b)
    cache, *_ = prefill(model, prompt.context_ids, press)
    ids = torch.cat([prompt.question_ids[0], torch.tensor([alone[:step]], dtype=torch.long)], dim=-1)
    with torch.no_grad():
        top = _step(model, cache, ids, None, None, None)[0, -1].float().topk(2).values
    assert top[0] - top[1] <= TIE, f"{press}: batched token differs at step {step} with a logit gap of {top[0] - top[1]:.3g}"


def _batch_matches_alone(model, tokenizer, prompts, monkeypatch, max_new_tokens: int) -> None:
    kept = _recording_selections(monkeypatch)
    for name in BATCH_PRESSES:
        press = kvbench.build_press(name, compression_ratio=0.5)
        kept.clear()
        batched = answer_prompts(model, tokenizer, prompts, [press], [[max_new_tokens]] * len(prompts))[0]
        kept_batched = dict(kept)
        kept.clear()
        alone = [answer_prompts(model, tokenizer, [p], [press], [[max_new_tokens]])[0][0] for p in prompts]
        assert kept_batched.keys() == kept.keys() and len(kept) == len(prompts) * model.config.num_hidden_layers
        for where, mask in kept.items():
            assert torch.equal(kept_batched[where], mask), f"{name}: kept positions differ at (layer, length) {where}"
        for prompt, b, a in zip(prompts, batched, alone):
            _assert_same_or_tied(model, prompt, press, b.answers[0].token_ids, a.answers[0].token_ids)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_batch_keeps_the_positions_and_tokens_of_each_context_alone(family, impl, monkeypatch):
    prompts = [Prompt(_ids(n, n), [_ids(m, n + 1)]) for n, m in [(80, 5), (96, 7), (64, 3)]]
    _batch_matches_alone(tiny_model(family, impl), Tok(), prompts, monkeypatch, 8)


@pytest.mark.integration
def test_a_batch_on_smollm2_keeps_the_positions_and_tokens_of_each_context_alone(monkeypatch):
    from kvbench.generation import build_prompt
    from kvbench.models import ModelSpec, load_model

    model, tokenizer = load_model(ModelSpec("smollm2-135m", device="cpu"))
    facts = ["The archive keeps its maps in room {}.", "Ferries leave the harbour every {} minutes.",
             "The choir has sung in the cathedral since {}."]
    prompts = [build_prompt(tokenizer, " ".join(f.format(7 * k + i) for k in range(12 + 5 * i) for f in facts),
                            ["What do the maps, ferries and choir have in common?"], "Answer:") for i in range(3)]
    assert len({p.context_ids.shape[-1] for p in prompts}) == 3
    _batch_matches_alone(model, tokenizer, prompts, monkeypatch, 12)


def test_the_cpu_and_cuda_paths_over_a_packed_block_agree():
    """The per-(sequence, head) views (CPU) and the gathered padded view (CUDA without flash-attn) attend the same
    keys: outputs and log-sum-exps agree, a head that kept nothing included (output 0, lse -inf)."""
    from kvbench.compression import packed_attention
    from kvbench.compression.cache import pack_layer

    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 20, 8, generator=generator), torch.randn(2, 3, 20, 8, generator=generator)
    kept = torch.rand(2, 3, 20, generator=generator) < 0.6
    kept[1, 2] = False
    layer = pack_layer(keys, values, kept, 20)
    query = torch.randn(2, 6, 4, 8, generator=generator)
    out_a, lse_a = packed_attention._packed_part_segments(layer, query, 0.35)
    out_b, lse_b = packed_attention._packed_part_torch(layer, query, 0.35)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(lse_a, lse_b)
    assert torch.isinf(lse_a[1, 2]).all() and (out_a[1, 2] == 0).all()
