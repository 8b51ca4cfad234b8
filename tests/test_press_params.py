"""Press parameters out of range are refused when the press is built, in one line naming the parameter.

Left unchecked they fail far from the cause (``window_size=0`` crashes mid-prefill, ``chunk_size=0`` divides
by zero) or silently change the method (``n_future_positions=0`` gives NaN scores, ``alpha_safeguard=1.5``
or a negative ``n_sink`` keep arbitrary tokens).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kvbench.errors import KVBenchError
from kvbench.presses import PRESSES, build_press
from kvbench.presses.base import LayerState
from tests.test_clustering import capture_states

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    ("snapkv", "window_size", 0, "window_size must be an integer >= 1, got 0"),
    ("snapkv", "window_size", -4, "window_size must be an integer >= 1, got -4"),
    ("snapkv", "window_size", 8.5, "window_size must be an integer >= 1, got 8.5"),
    ("snapkv", "window_size", True, "window_size must be an integer >= 1, got True"),
    ("snapkv", "kernel_size", -1, "kernel_size must be an integer >= 0, got -1"),
    ("pyramidkv", "window_size", 0, "window_size must be an integer >= 1"),
    ("pyramidkv", "beta", "wide", "beta must be a number >= 1, got 'wide'"),
    ("adakv_snapkv", "alpha_safeguard", 1.5, "alpha_safeguard must be a number in [0, 1], got 1.5"),
    ("adakv_snapkv", "alpha_safeguard", -0.1, "alpha_safeguard must be a number in [0, 1]"),
    ("adakv_snapkv", "window_size", 0, "window_size must be an integer >= 1"),
    ("expected_attention", "n_future_positions", 0, "n_future_positions must be an integer >= 1, got 0"),
    ("expected_attention", "n_sink", -1, "n_sink must be an integer >= 0, got -1"),
    ("expected_attention", "use_covariance", "yes", "use_covariance must be true or false, got 'yes'"),
    ("expected_attention", "epsilon", -1e-3, "epsilon must be a number >= 0"),
    ("compactor", "chunk_size", 0, "chunk_size must be an integer >= 1, got 0"),
    ("compactor", "sketch_dimension", 0, "sketch_dimension must be an integer >= 1, got 0"),
    ("compactor", "sink_size_start", -1, "sink_size_start must be an integer >= 0"),
    ("compactor", "sink_size_end", -2, "sink_size_end must be an integer >= 0"),
    ("compactor", "blending", -0.5, "blending must be a number >= 0"),
    ("adakv_compactor", "chunk_size", 0, "chunk_size must be an integer >= 1"),
    ("critical_snapkv", "first_stage_ratio", 1.5, "first_stage_ratio must be a number in [0, 1], got 1.5"),
    ("critical_snapkv", "epsilon", -1.0, "epsilon must be a number >= 0"),
    ("critical_adakv_snapkv", "first_stage_ratio", -0.5, "first_stage_ratio must be a number in [0, 1]"),
    ("critical_adakv_snapkv", "alpha_safeguard", 2.0, "alpha_safeguard must be a number in [0, 1]"),
    ("critical_expected_attention", "n_future_positions", 0, "n_future_positions must be an integer >= 1"),
    ("streaming_llm", "n_sink", -1, "n_sink must be an integer >= 0, got -1"),
    ("streaming_llm", "key_rerotation", 1, "key_rerotation must be true or false, got 1"),
    ("random", "seed", "abc", "seed must be an integer in [0, 4294967295], got 'abc'"),
    # a seed past torch's 64 bits passed and failed in the first prefill, after the model had loaded
    ("random", "seed", 2**64, "seed must be an integer in [0, 4294967295], got 18446744073709551616"),
    ("compactor", "seed", 2**40, "seed must be an integer in [0, 4294967295]"),
    # an infinite epsilon or blending made every score infinite: every token tied, the kept ones arbitrary
    ("expected_attention", "epsilon", float("inf"), "epsilon must be a number >= 0, got inf"),
    ("compactor", "blending", float("inf"), "blending must be a number >= 0, got inf"),
    ("critical_snapkv", "epsilon", float("inf"), "epsilon must be a number >= 0, got inf"),
    ("knorm", "budget", True, "budget must be an integer >= 1, got True"),
    ("knorm", "budget", 0, "budget must be an integer >= 1, got 0"),
    ("snapkv", "budget", 12.5, "budget must be an integer >= 1, got 12.5"),
    ("knorm", "compression_ratio", True, "compression_ratio must be a number in [0, 1), got True"),
    ("knorm", "compression_ratio", 1.0, "compression_ratio must be a number in [0, 1), got 1.0"),
]


@pytest.mark.parametrize("name,param,value,message", BAD, ids=[f"{n}-{p}-{v!r}" for n, p, v, _ in BAD])
def test_an_out_of_range_parameter_is_refused_naming_it(name, param, value, message):
    prefix = "" if param == "compression_ratio" else "press parameter "
    with pytest.raises(KVBenchError, match=re.escape(prefix + message)) as caught:
        build_press(name, **{param: value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_every_press_builds_with_its_config_file_and_scores_a_layer(name):
    """The shipped defaults sit inside the ranges, and the edges of the ranges still give finite scores."""
    params = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "press" / f"{name}.yaml")).items()
              if k != "name"}
    press = build_press(name, compression_ratio=0.5, **params)
    assert press.compression_ratio == 0.5


EDGES = [
    ("snapkv", {"window_size": 1, "kernel_size": 0}),
    ("expected_attention", {"n_future_positions": 1, "n_sink": 0}),
    ("compactor", {"chunk_size": 1, "sketch_dimension": 1, "sink_size_start": 0, "sink_size_end": 0, "blending": 0.0}),
    ("adakv_snapkv", {"alpha_safeguard": 0.0}),
    ("adakv_snapkv", {"alpha_safeguard": 1.0}),
    ("critical_snapkv", {"first_stage_ratio": 0.0}),
    ("critical_snapkv", {"first_stage_ratio": 1.0}),
    ("streaming_llm", {"n_sink": 0}),
]


@pytest.fixture(scope="module")
def llama_state() -> LayerState:
    return capture_states("llama", seq_len=24)[0]


@pytest.mark.parametrize("name,params", EDGES, ids=[f"{n}-{p}" for n, p in EDGES])
def test_the_edges_of_each_range_give_finite_scores_and_a_full_selection(name, params, llama_state):
    press = build_press(name, compression_ratio=0.5, **params)
    kv_heads = llama_state.keys.shape[1]
    scores = press.score(llama_state)
    assert scores.shape == (1, kv_heads, 24)
    assert not torch.isnan(scores).any()
    chosen = press.select(scores, llama_state, press.n_kept(24))
    kept = chosen.mask.sum(dim=-1) if chosen.mask is not None else torch.full(scores.shape[:2], chosen.indices.shape[-1])
    assert int(kept.sum()) == 12 * kv_heads
