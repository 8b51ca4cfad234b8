"""Scorers and selections on hand-made inputs, and the press registry against conf/press."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import kvbench
from kvbench.compression.model_access import apply_rope
from kvbench.presses import PRESSES, press_parameters, selection
from kvbench.presses.compactor import leverage
from kvbench.presses.expected_attention import mean_rotation
from kvbench.presses.snapkv import pool_same_length

CONF = Path(__file__).resolve().parent.parent / "conf" / "press"


def test_adakv_keeps_the_layer_total_with_a_per_head_floor():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]])
    chosen = selection.adakv(scores, n_kept=3, alpha_safeguard=0.34)  # floor: int(3 * 0.34) = 1 per head
    assert chosen.mask.tolist() == [[[True, True, True, True, True, False], [False, False, False, False, False, True]]]
    no_floor = selection.adakv(scores, n_kept=3, alpha_safeguard=0.0)
    assert no_floor.mask[0, 1].sum() == 0 and no_floor.mask.sum() == 6


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
    with pytest.raises(kvbench.KVBenchError, match=r"compression_ratio must be in \[0, 1\)"):
        kvbench.build_press("knorm", compression_ratio=1.0)


@pytest.mark.parametrize("name", list(PRESSES))
def test_every_press_has_a_config_file_listing_its_parameters(name):
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    expected = {k: v for k, v in press_parameters(name).items() if k not in ("compression_ratio", "budget")}
    assert config == {"name": name, **expected}
