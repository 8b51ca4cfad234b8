"""The packed head-adaptive cache and batched evaluation: real memory savings, same answers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvbench
from kvbench.compression.cache import kv_bytes
from kvbench.generation import Prompt, answer_prompts, base_model, continuations_nll
from tests.tiny_models import tiny_model

CONTEXT = 96
HEAD_ADAPTIVE = ["adakv_snapkv", "expected_attention", "critical_adakv_snapkv", "adakv_compactor"]


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
    for name in ["adakv_snapkv", "critical_adakv_snapkv"]:
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


def test_one_prefill_serves_several_presses_as_separate_prefills_would():
    model = tiny_model("llama")
    prompt = Prompt(_ids(CONTEXT, 4), [_ids(5, 5)])
    presses = [kvbench.build_press(n, compression_ratio=r) for n, r in [("snapkv", 0.5), ("knorm", 0.75), ("adakv_snapkv", 0.25), ("no_press", 0.0)]]
    shared = answer_prompts(model, Tok(), [prompt], presses, [[8]])
    for press, runs in zip(presses, shared):
        alone = answer_prompts(model, Tok(), [prompt], [press], [[8]])[0][0]
        assert runs[0].answers[0].token_ids == alone.answers[0].token_ids
        assert runs[0].kv_bytes_after == alone.kv_bytes_after
