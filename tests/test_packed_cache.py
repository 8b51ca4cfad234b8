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


def test_both_layouts_count_each_heads_own_kept_tokens():
    """The masked layout pads every head to the layer's longest; the padding is not kept (it would inflate
    ``kv_kept_fraction``). Expected Attention: heads keep different counts at this size (AdaKV-SnapKV does not,
    its 64-token window filling every head alike)."""
    model, ids = tiny_model("llama"), _ids(CONTEXT, 0)
    press = kvbench.build_press("expected_attention", compression_ratio=0.5)
    packed, masked = _cache(model, ids, press), _cache(model, ids, press, "masked")
    lengths = [layer.lengths for layer in packed.layers]
    assert all(len(set(per_head.flatten().tolist())) > 1 for per_head in lengths)
    assert [layer.kept_pairs() for layer in masked.layers] == [int(per_head.sum()) for per_head in lengths]
    assert [layer.kept_pairs() for layer in packed.layers] == [int(per_head.sum()) for per_head in lengths]
    assert all(layer.keys.shape[1] * layer.keys.shape[2] > layer.kept_pairs() for layer in masked.layers)


@pytest.mark.parametrize("name", ["adakv_snapkv", "snapkv"])
def test_a_compressed_cache_keeps_its_share_of_the_bytes_while_it_decodes(name):
    """The append buffer's spare space counts: it was an eighth of a row and at least 64 tokens, which took a
    1k context at r = 0.75 to 0.31 of the uncompressed bytes after one decoded token (0.25 promised)."""
    model, length, ratio = tiny_model("llama"), 1024, 0.75
    ids = _ids(length, 0)
    per_token = kv_bytes(_cache(model, ids, kvbench.build_press("no_press"))) / length
    cache = _cache(model, ids, kvbench.build_press(name, compression_ratio=ratio))
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 201):
        for layer in cache.layers:
            shape = (*layer.keys.shape[:2], 1, layer.keys.shape[-1])
            layer.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        if step in (1, 8, 200):
            assert kv_bytes(cache) <= 1.05 * per_token * ((1 - ratio) * length + step), (name, step)


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


def test_a_batch_shares_its_prefill_and_compression_time_out_among_its_contexts(monkeypatch):
    """Each context records its share of the batch's one prefill: the whole batch's time in every row made the
    prefill column batch-size times too high."""
    from kvbench import generation

    real = generation.prefill_many

    def four_seconds(*args, **kwargs):
        done = real(*args, **kwargs)
        done.prefill_seconds = [4.0] * len(done.prefill_seconds)
        for stats in done.stats:
            stats.seconds = 1.0
        return done

    monkeypatch.setattr(generation, "prefill_many", four_seconds)
    model = tiny_model("llama")
    prompts = [Prompt(_ids(n, n), [_ids(3, n + 1)]) for n in (80, 64)]
    press = kvbench.build_press("snapkv", compression_ratio=0.5)
    runs = answer_prompts(model, Tok(), prompts, [press], [[2], [2]])[0]
    assert [r.prefill_seconds for r in runs] == [2.0, 2.0]
    assert [r.compression.seconds for r in runs] == [0.5, 0.5]
    scored = continuations_nll(model, [p.context_ids for p in prompts], [p.question_ids[0] for p in prompts], [press])[0]
    assert [run.prefill_seconds for _, _, run in scored] == [2.0, 2.0]


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


def _flash_varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_varlen_func`` as its kernel behaves, in plain PyTorch: the log-sum-exp comes back
    [heads, total_q] in fp32, and a sequence without keys gets output 0 and log-sum-exp +inf (the kernel's early
    exit)."""
    total_q, heads, _ = q.shape
    out = torch.zeros(total_q, heads, v.shape[-1], dtype=q.dtype)
    lse = torch.full((heads, total_q), float("inf"))
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if ke > ks:
            logits = torch.einsum("qhd,kd->hqk", q[qs:qe].float(), k[ks:ke, 0].float()) * softmax_scale
            lse[:, qs:qe] = logits.logsumexp(-1)
            out[qs:qe] = torch.einsum("hqk,kd->qhd", logits.softmax(-1), v[ks:ke, 0].float()).to(q.dtype)
    return out, lse, None


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("group", [1, 3])
def test_the_flash_path_attends_as_the_cpu_path(q_len, group, monkeypatch):
    """The glue around flash-attn's variable-length kernel (query layout, its [heads, total_q] log-sum-exp, +inf
    for a head that kept nothing), checked on the CPU against a stand-in that behaves as the kernel does: a
    decoding step (one query row) with GQA, and an empty head, attend as the CPU path does, with no NaN."""
    import sys
    import types

    from kvbench.compression import packed_attention
    from kvbench.compression.cache import pack_layer

    generator = torch.Generator().manual_seed(0)
    b, kv, n, d = 2, 3, 20, 8
    kept = torch.rand(b, kv, n, generator=generator) < 0.5
    kept[1, 2] = False  # a head that kept nothing
    layer = pack_layer(torch.randn(b, kv, n, d, generator=generator), torch.randn(b, kv, n, d, generator=generator), kept, n)
    layer.update(torch.randn(b, kv, q_len, d, generator=generator), torch.randn(b, kv, q_len, d, generator=generator))
    module = types.SimpleNamespace(_kvbench_packed_layer=layer)
    query = torch.randn(b, kv * group, q_len, d, generator=generator)
    monkeypatch.setattr(packed_attention, "_use_flash", lambda *args: False)
    expected, _ = packed_attention.packed_attention_forward(module, query, layer.keys, layer.values, None, scaling=d**-0.5)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_flash_varlen_stand_in))
    monkeypatch.setattr(packed_attention, "_use_flash", lambda *args: True)
    got, _ = packed_attention.packed_attention_forward(module, query, layer.keys, layer.values, None, scaling=d**-0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version,usable", [("2.6.3", True), ("2.8.0.post2", True), ("2.5.9.post1", False),
                                             ("1.0.9", False), ("", False), ("unknown", False)])
def test_a_flash_attn_with_the_older_log_sum_exp_layout_is_not_used(version, usable, monkeypatch):
    """flash-attn < 2.6 returns the varlen log-sum-exp as [seqs, heads, max_q]: reshaped as the newer [heads, total_q]
    it merged the two parts with scrambled weights, silently."""
    import sys
    import types

    from kvbench.compression import packed_attention

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__=version,
                                                                         flash_attn_varlen_func=_flash_varlen_stand_in))
    packed_attention.flash_usable.cache_clear()  # asked once per process
    assert packed_attention.flash_usable() is usable
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    packed_attention.flash_usable.cache_clear()
    assert packed_attention.flash_usable() is False
    packed_attention.flash_usable.cache_clear()


def test_an_empty_question_is_answered_from_the_prefill_output_alone_and_in_a_batch():
    """A query-aware prompt without template or answer prefix has nothing left to feed after the context: its first
    token is the prefill's own prediction (what ``generate`` does), alone and batched with a context that has a
    question, and the uncompressed answer is plain greedy decoding of the context."""
    model = tiny_model("llama")
    context = _ids(40, 7)
    empty = Prompt(context, [context[:, :0]])
    with torch.no_grad():
        ids, expected = context, []
        for _ in range(6):
            expected.append(int(model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=-1)
    assert answer_prompts(model, Tok(), [empty], [kvbench.build_press("no_press")], [[6]])[0][0].answers[0].token_ids == expected
    other = Prompt(_ids(25, 8), [_ids(3, 9)])
    for name in ["no_press", "snapkv", "adakv_snapkv"]:
        press = kvbench.build_press(name, compression_ratio=0.5)
        alone = answer_prompts(model, Tok(), [empty], [press], [[6]])[0][0].answers[0].token_ids
        batched = answer_prompts(model, Tok(), [other, empty], [press], [[6], [6]])[0]
        assert batched[1].answers[0].token_ids == alone
        assert batched[0].answers[0].token_ids == answer_prompts(model, Tok(), [other], [press], [[6]])[0][0].answers[0].token_ids


def test_a_prefill_shared_by_several_presses_records_no_peak_memory(monkeypatch):
    """The shared prefill held every press' cache at once: its peak is none of theirs, so none is recorded (a device
    that measures peaks is stood in for by a fixed figure)."""
    from kvbench import generation

    monkeypatch.setattr(generation, "peak_memory_bytes", lambda device: 123)
    model = tiny_model("llama")
    prompt = Prompt(_ids(48, 1), [_ids(3, 2)])
    presses = [kvbench.build_press(name, compression_ratio=0.5) for name in ("knorm", "snapkv")]
    assert answer_prompts(model, Tok(), [prompt], presses[:1], [[2]])[0][0].peak_memory_bytes == 123
    assert [runs[0].peak_memory_bytes for runs in answer_prompts(model, Tok(), [prompt], presses, [[2]])] == [None, None]
    assert continuations_nll(model, [prompt.context_ids], prompt.question_ids, presses[:1])[0][0][2].peak_memory_bytes == 123
    assert [runs[0][2].peak_memory_bytes for runs in continuations_nll(model, [prompt.context_ids], prompt.question_ids, presses)] == [None, None]
