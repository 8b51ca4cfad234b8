"""The engine on the packaged SmolLM2-135M-Instruct (offline), at a short context."""

from __future__ import annotations

import pytest
import torch

import kvbench
from kvbench.generation import answer_questions, build_prompt, continuation_nll, prefill
from kvbench.models import ModelSpec, load_model
from kvbench.presses import PRESSES

pytestmark = pytest.mark.integration

CONTEXT = (
    "The museum opened in 1897 and holds a large collection of clocks. "
    "Its director, Anna Berg, keeps the special key in a blue box behind the third clock. "
    "Visitors often ask about the key, but only staff may see it. "
) * 4


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelSpec("smollm2-135m", device="cpu"))


def _answer(smol, press, questions, max_new_tokens=12):
    model, tokenizer = smol
    prompt = build_prompt(tokenizer, CONTEXT, questions, "Answer:")
    return [a.text for a in answer_questions(model, tokenizer, prompt, press, max_new_tokens).answers]


def test_chat_prompt_splits_after_the_context(smol):
    _, tokenizer = smol
    prompt = build_prompt(tokenizer, CONTEXT, ["Where is the key?"], "Answer:")
    context_text = tokenizer.decode(prompt.context_ids[0])
    question_text = tokenizer.decode(prompt.question_ids[0][0])
    assert context_text.startswith("<|im_start|>system") and context_text.rstrip().endswith("only staff may see it.")
    assert "Where is the key?<|im_end|>" in question_text and question_text.endswith("assistant\nAnswer:")


def test_no_press_equals_model_generate_token_for_token(smol):
    model, tokenizer = smol
    prompt = build_prompt(tokenizer, CONTEXT, ["Who is the director?"], "Answer:")
    run = answer_questions(model, tokenizer, prompt, kvbench.build_press("no_press"), 16)
    ids = torch.cat([prompt.context_ids, prompt.question_ids[0]], dim=1)
    out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    assert run.answers[0].token_ids == out[: len(run.answers[0].token_ids)]
    assert "Anna" in run.answers[0].text


@pytest.mark.parametrize("name", [n for n in PRESSES if n not in ("no_press", "observed_attention")])
def test_every_press_on_smollm2(smol, name):
    model, tokenizer = smol
    reference = _answer(smol, kvbench.build_press("no_press"), ["Who is the director?"])
    assert _answer(smol, kvbench.build_press(name, compression_ratio=0.0), ["Who is the director?"]) == reference
    ids = build_prompt(tokenizer, CONTEXT, ["q"], "").context_ids
    n = ids.shape[1]
    for ratio in (0.25, 0.5, 0.75):
        press = kvbench.build_press(name, compression_ratio=ratio)
        cache, _, stats, _ = prefill(model, ids, press)
        kept = int(n * (1 - ratio))
        assert stats.layers == model.config.num_hidden_layers
        pairs_per_token = stats.layers * model.config.num_key_value_heads
        if name == "pyramidkv":  # per-layer budgets are rounded down one by one (kvpress' formula): ±1 token per layer
            assert abs(stats.kept_pairs - pairs_per_token * kept) <= pairs_per_token
        else:
            assert stats.kept_pairs == pairs_per_token * kept
        if not press.head_adaptive:
            assert {layer.keys.shape[-2] for layer in cache.layers} == {kept}
        assert cache.get_seq_length() == n


def test_questions_do_not_see_each_other(smol):
    press = kvbench.build_press("snapkv", compression_ratio=0.5)
    both = _answer(smol, press, ["Who is the director?", "Where is the key kept?"])
    alone = _answer(smol, press, ["Where is the key kept?"])
    assert both[1] == alone[0]


def test_no_press_perplexity_equals_plain_forward_loss(smol):
    model, tokenizer = smol
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"][:, :160]
    nll, n, _ = continuation_nll(model, ids[:, :128], ids[:, 128:], kvbench.build_press("no_press"))
    with torch.no_grad():
        logits = model(ids).logits[0, 127:-1].float()
    plain = torch.nn.functional.cross_entropy(logits, ids[0, 128:], reduction="sum")
    assert n == 32
    assert abs(nll - float(plain)) / float(plain) < 1e-4
    compressed, _, _ = continuation_nll(model, ids[:, :128], ids[:, 128:], kvbench.build_press("knorm", compression_ratio=0.75))
    assert compressed != pytest.approx(nll, rel=1e-4)


def test_samsum_decodes_as_longbench_pred_py(smol):
    """pred.py's samsum call, on the packaged model and its real newline token: same tokens, same text."""
    from kvbench.generation import answer_prompts

    model, tokenizer = smol
    dialogue = "Dialogue: Anna: Are we still meeting at the museum?\nTom: Yes, at five, by the third clock.\nSummary:"
    prompt = build_prompt(tokenizer, "Summarize the dialogue into a few short sentences.\n\n" + CONTEXT, ["\n\n" + dialogue],
                          "", use_chat_template=False)
    ids = torch.cat([prompt.context_ids, prompt.question_ids[0]], dim=1)
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    out = model.generate(ids, max_new_tokens=128, num_beams=1, do_sample=False, min_length=ids.shape[1] + 1,
                         eos_token_id=[tokenizer.eos_token_id, newline])[0, ids.shape[1]:]
    run = answer_prompts(model, tokenizer, [prompt], [kvbench.build_press("no_press")], [[128]], stop_texts=[["\n"]])[0][0]
    assert run.answers[0].token_ids == out.tolist()
    assert run.answers[0].text == tokenizer.decode(out, skip_special_tokens=True)
