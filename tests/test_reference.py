"""Every press kvbench shares with kvpress 0.5.5 against that reference's own outputs.

``streaming_llm_rerotated`` is kvbench's streaming_llm with key_rerotation=true against kvpress'
KeyRerotationPress(StreamingLLMPress): same kept pairs as the plain press, but the logits check that the kept keys
were moved to contiguous positions and that the question continues at the compressed length. observed_attention
runs with eager attention on both sides (it scores the attention weights).

The fixtures (kept positions per layer and head, logits of a question after compression) were produced by
kvpress itself in a throw-away environment by tests/reference/make_fixtures.py, on a tiny random GQA Llama
and on the packaged SmolLM2, at ratios 0.25, 0.5 and 0.875. Deterministic presses must keep exactly the same
(layer, head, token) pairs and give the same logits, up to exact ties: where a head's scores tie (layer 0 of
SmolLM2 gives a repeated token the same key norm at every position), which tied token a top-k keeps is decided
by float rounding, which differs between CPUs, so a selection that differs from kvpress' only by exchanging tied
tokens counts as the same one (``compare.tie_swapped``) and the logits are then compared over kvpress' tokens; Compactor draws a random sketch, so its kept pairs must
differ from each reference seed by no more than the reference's seeds differ from one another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import compare

LOGITS_RTOL = 1e-4  # same kept pairs: only float rounding (different transformers releases) remains
WINDOW = 64  # SnapKV's window_size in the fixtures


def _cases(name: str) -> list[str]:
    return compare.reference_keys(name) if (compare.FIXTURES / f"{name}.npz").exists() else []


def _below_window(name: str, key: str) -> bool:
    """SnapKV-based presses whose budget is smaller than the window: a documented, deliberate difference."""
    press_name, ratio = key.split("/")
    n_kept = int(int(compare.fixture(name)["context_length"]) * (1 - float(ratio)))
    return ("snapkv" in press_name or press_name == "pyramidkv") and n_kept < WINDOW


def check(name: str, key: str, **params) -> None:
    press_name, ratio = key.split("/")
    if press_name in compare.RANDOM_SKETCH:
        ours = compare.kvbench_outcome(name, press_name, float(ratio), **params)
        spread = compare.seed_spread(name, key)
        difference, _ = compare.mean_seed_difference(name, key, ours)
        assert difference <= spread + 1e-3, (
            f"{key}: kvbench differs from kvpress' seeds by {difference:.2%} on average, "
            f"more than kvpress' own seed-to-seed spread ({spread:.2%})"
        )
        return
    ref = compare.reference(name, key)
    below_window = _below_window(name, key)
    ours = compare.kvbench_outcome(name, press_name, float(ratio), None if below_window else ref.kept, **params)
    if below_window:
        # kvbench keeps the window's most recent tokens where kvpress keeps an arbitrary subset of tied ones.
        assert ours.kept.sum() == ref.kept.sum()
        if press_name == "snapkv":
            n_kept = int(ours.kept.sum(-1).max())
            assert ours.kept[..., -n_kept:].all()
        return
    layer, head, token = np.nonzero(ref.kept != ours.kept)
    assert len(token) == 0, f"{key}: {len(token)} kept pairs differ, first at layer {layer[0]} head {head[0]} token {token[0]}"
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=LOGITS_RTOL * float(ref.logits.abs().max()))


@pytest.mark.parametrize("key", _cases("tiny_llama_gqa"))
def test_tiny_gqa_model_matches_kvpress(key):
    check("tiny_llama_gqa", key)


@pytest.mark.integration
@pytest.mark.parametrize("key", _cases("smollm2"))
def test_packaged_smollm2_matches_kvpress(key):
    check("smollm2", key)


SHARED = ("knorm", "streaming_llm", "snapkv", "adakv_snapkv", "expected_attention", "compactor", "adakv_compactor",
          "critical_snapkv", "critical_adakv_snapkv", "critical_expected_attention", "critical_adakv_expected_attention",
          "pyramidkv", "tova", "keydiff", "observed_attention", "streaming_llm_rerotated")


def test_fixtures_cover_every_shared_press_and_ratio():
    expected = {f"{p}/{r}" for p in SHARED for r in (0.25, 0.5, 0.875)}
    for name in ("tiny_llama_gqa", "smollm2"):
        assert set(_cases(name)) == expected, name


def test_only_an_exchange_of_tied_tokens_counts_as_the_same_selection():
    scores = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    ours = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    tied = torch.tensor([[1, 0, 0, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)  # head 0: token 4 for token 1, both 2.0
    assert compare.tie_swapped(scores, ours, tied)
    assert compare.tie_swapped(scores, ours, ours)
    assert not compare.tie_swapped(scores, ours, torch.tensor([[1, 0, 0, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool))  # 1.0 for 2.0
    assert not compare.tie_swapped(scores, ours, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool))  # a third token
    assert not compare.tie_swapped(scores, ours, torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.bool))  # 3.0 for 4.0


def test_the_comparison_catches_a_wrong_press():
    """The check fails when kvbench's press deviates: AdaKV with uniform budgets (a safeguard of 1), Expected Attention
    with its sinks inside the softmax (the behaviour this suite was written to catch), PyramidKV without its pyramid,
    StreamingLLM's kept keys left at their original positions."""
    with pytest.raises(AssertionError, match="kept pairs differ"):
        check("tiny_llama_gqa", "adakv_snapkv/0.5", alpha_safeguard=1.0)
    with pytest.raises(AssertionError, match="kept pairs differ"):
        check("tiny_llama_gqa", "expected_attention/0.5", n_sink=0)
    with pytest.raises(AssertionError, match="kept pairs differ"):
        check("tiny_llama_gqa", "pyramidkv/0.5", beta=1)  # a flat pyramid: SnapKV's uniform budgets
    with pytest.raises(AssertionError, match="not close"):
        check("tiny_llama_gqa", "streaming_llm_rerotated/0.5", key_rerotation=False)  # same pairs, old positions
