"""Rotary variants that are more than a rotation: YaRN's tables carry an attention scaling, dynamic NTK changes its
frequencies with the positions it is asked for. Presses rotate keys and queries back, re-rotate kept keys and look
at future positions; each must undo or leave alone exactly what the model does."""

from __future__ import annotations

import copy

import pytest
import torch

from kvbench import model_access
from kvbench.compression import rerotate, rotary_tables
from kvbench.generation import continuations_nll, prefill
from kvbench.presses import build_press
from tests.test_clustering import capture_states
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def yarn_rotary():
    rotary = model_access.find_rotary_embedding(tiny_model("llama_yarn"))
    assert model_access.rope_scale(rotary) == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())
    return rotary


@pytest.mark.parametrize("rotary_dims", [32, 16])  # whole head, and partial rotary (the rest passes through)
def test_unrotate_inverts_scaled_tables(yarn_rotary, rotary_dims):
    x = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(0))
    cos, sin = yarn_rotary(x, torch.arange(40)[None])
    half = rotary_dims // 2  # a table for fewer dims: the first frequencies, each twice (rotate_half's pairs)
    cos, sin = torch.cat([cos[..., :half]] * 2, -1), torch.cat([sin[..., :half]] * 2, -1)
    scale = model_access.rope_scale(yarn_rotary)
    rotated = model_access.apply_rope(x, cos, sin)
    torch.testing.assert_close(model_access.unrotate(rotated, cos, sin, scale), x, rtol=1e-5, atol=1e-5)
    # rotating back by the tables alone leaves the scaling on twice: what a press would have scored
    unscaled = model_access.unrotate(rotated, cos, sin)
    torch.testing.assert_close(unscaled[..., :rotary_dims], scale**2 * x[..., :rotary_dims], rtol=1e-5, atol=1e-5)


def test_prefill_states_rotate_back_to_the_projections_on_a_yarn_model():
    for state in capture_states("llama_yarn", seq_len=96):
        assert state.rope_scale > 1.1 and state.queries is not None  # captured post-RoPE queries, rotated back
        torch.testing.assert_close(state.pre_rope_keys(), model_access.pre_rope_keys(state.module, state.hidden_states),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state.pre_rope_queries(),
                                   model_access.pre_rope_queries(state.module, state.hidden_states), rtol=1e-4, atol=1e-4)


def test_rerotated_keys_are_the_keys_at_their_new_positions(yarn_rotary):
    """A kept key moved from position p to its rank r must be the key the model would have written at r."""
    seq_len = 50
    pre = torch.randn(1, 2, seq_len, 32, generator=torch.Generator().manual_seed(1))
    like = torch.zeros(1, seq_len, 128)
    cos, sin = yarn_rotary(like, torch.arange(seq_len)[None])
    keys = model_access.apply_rope(pre, cos, sin)
    kept = torch.rand(1, 2, seq_len, generator=torch.Generator().manual_seed(2)) < 0.4
    kept[:, 1] = kept[:, 0]  # one kept count per head, as re-rotation requires
    moved = rerotate(keys, kept, lambda positions: rotary_tables(yarn_rotary, like, positions),
                     model_access.rope_scale(yarn_rotary))
    count = int(kept[0, 0].sum())
    new_cos, new_sin = yarn_rotary(like, torch.arange(count)[None])
    expected = model_access.apply_rope(pre[:, :, kept[0, 0]], new_cos, new_sin)
    torch.testing.assert_close(moved[:, :, kept[0, 0]], expected, rtol=1e-4, atol=1e-4)


def test_future_positions_leave_dynamic_rope_as_the_model_had_it():
    """Expected Attention looks 512 positions past a 48-token context of a model trained on 64: dynamic NTK would
    grow its frequencies for good, and the model's decoding would then rotate with other ones."""
    model = tiny_model("llama_dynamic")
    rotary = model_access.find_rotary_embedding(model)
    before = (rotary.inv_freq.clone(), rotary.max_seq_len_cached, rotary.inv_freq.data_ptr())
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    press = build_press("expected_attention", compression_ratio=0.5)
    assert 48 + press.press.n_future_positions > rotary.original_max_seq_len
    cache, *_ = prefill(model, ids, press)
    torch.testing.assert_close(rotary.inv_freq, before[0], rtol=0, atol=0)
    assert rotary.max_seq_len_cached == before[1] and rotary.inv_freq.data_ptr() == before[2]
    # ... while the press saw the frequencies the model would use at the positions it looked at (grown ones)
    future, like = torch.arange(48, 48 + press.press.n_future_positions)[None], torch.zeros(1, 1, 128)
    fresh = copy.deepcopy(rotary)
    seen, _ = rotary_tables(rotary, like, future)
    torch.testing.assert_close(seen, fresh(like, future)[0])
    assert fresh.max_seq_len_cached > before[1] and rotary.max_seq_len_cached == before[1]


def test_a_window_scores_the_same_whatever_the_process_computed_before_it_on_dynamic_rope():
    """Dynamic NTK keeps the frequencies of the longest position it was asked for: a window scored after a longer one,
    or by the second press of a shared prefill (after the first press teacher-forced past the context), would be
    rotated with grown frequencies. Every prefill starts from the model's state as loaded, and every press from the
    state the prefill left."""
    model = tiny_model("llama_dynamic")  # trained on 64 positions
    generator = torch.Generator().manual_seed(0)
    context, longer = torch.randint(3, 256, (1, 100), generator=generator), torch.randint(3, 256, (1, 150), generator=generator)
    continuation = torch.randint(3, 256, (1, 12), generator=generator)
    press = build_press("knorm", compression_ratio=0.5)
    (first, *_), = continuations_nll(model, [context], [continuation], [press])[0]
    continuations_nll(model, [longer], [continuation], [press])
    (again, *_), = continuations_nll(model, [context], [continuation], [press])[0]
    assert again == pytest.approx(first, rel=1e-7)
    shared = continuations_nll(model, [context], [continuation], [build_press("snapkv", compression_ratio=0.5), press])
    assert shared[1][0][0] == pytest.approx(first, rel=1e-7)


def test_batching_is_refused_where_the_rope_follows_the_batchs_longest_context():
    assert model_access.batch_dependent_rope(tiny_model("llama_dynamic")) == "dynamic"
    assert model_access.batch_dependent_rope(tiny_model("llama_yarn")) is None
    assert model_access.batch_dependent_rope(tiny_model("llama")) is None
