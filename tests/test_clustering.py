"""SnapKV's clustering option: kmeans keeps top-k's counts, spreads the budget over clusters, is deterministic."""

from __future__ import annotations

import pytest
import torch

import kvbench
from kvbench.errors import KVBenchError
from kvbench.presses import selection
from kvbench.presses.base import LayerState, Press
from kvbench.presses.clustering import divisor_priority, kmeans_rescore, spherical_kmeans, strictly_decreasing
from tests.tiny_models import tiny_model

SNAPKV_FAMILY = ("snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv")


def capture_states(family: str = "llama", seq_len: int = 96) -> list[LayerState]:
    """Every layer's prefill state of a tiny model, captured by a press that records instead of scoring."""
    from kvbench.generation import prefill

    states: list[LayerState] = []

    class Recorder(Press):
        def score(self, state):
            states.append(state)
            return torch.zeros(state.keys.shape[:-1])

    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, seq_len), generator=torch.Generator().manual_seed(1))
    prefill(model, ids, Recorder(compression_ratio=0.5))
    return states


def two_blobs(n_big: int = 30, n_small: int = 10, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys in two well separated directions; the big blob holds every high vote."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.tensor([1.0] + [0.0] * (dim - 1)) + 0.05 * torch.randn(n_big, dim, generator=gen),
                      torch.tensor([0.0, 1.0] + [0.0] * (dim - 2)) + 0.05 * torch.randn(n_small, dim, generator=gen)])
    votes = torch.cat([0.5 + 0.01 * torch.arange(n_big, 0, -1.0), 0.35 + 0.01 * torch.arange(n_small, 0, -1.0)])
    return votes[None, None], keys[None, None]


def test_kmeans_separates_blobs_and_gives_the_small_one_its_share():
    votes, keys = two_blobs()
    labels = spherical_kmeans(keys, 2, 3)[0, 0]
    assert len(set(labels[:30].tolist())) == 1 and len(set(labels[30:].tolist())) == 1 and labels[0] != labels[-1]
    scores = kmeans_rescore(votes, keys, 2, 3)
    kept = set(scores[0, 0].topk(10).indices.tolist())
    small_share = votes[0, 0, 30:].sum() / votes.sum()  # 0.17 of the mass -> 2 of 10 seats
    assert len(kept & set(range(30, 40))) == round(10 * float(small_share)) == 2
    assert {30, 31} <= kept  # the small cluster spends its seats on its best-voted tokens
    assert set(votes[0, 0].topk(10).indices.tolist()) == set(range(10))  # top-k ignores the small blob


def test_divisor_priority_prefixes_are_sainte_lague_apportionments():
    votes = torch.tensor([[0.9, 0.8, 0.7, 0.05, 0.3, 0.2]])
    labels = torch.tensor([[0, 0, 0, 0, 1, 1]])
    priority = divisor_priority(votes, labels, 2)
    mass0, mass1 = 2.45, 0.5
    expected = torch.tensor([[mass0, mass0 / 3, mass0 / 5, mass0 / 7, mass1, mass1 / 3]])
    torch.testing.assert_close(priority, expected)


def test_one_cluster_is_plain_topk_order():
    state = capture_states()[0]
    topk = kvbench.build_press("snapkv", window_size=16).score(state)
    single = kvbench.build_press("snapkv", window_size=16, clustering="kmeans", n_clusters=1).score(state)
    assert torch.equal(topk.argsort(dim=-1, stable=True), single.argsort(dim=-1, stable=True))


def test_strictly_decreasing_breaks_ties_by_ulps_only():
    values = torch.tensor([[0.5, 0.5, 0.5, 0.25, 0.0, 0.0]])
    strict = strictly_decreasing(values)
    assert bool((strict[..., 1:] < strict[..., :-1]).all())
    assert bool((strict <= values.clamp_min(1e-40)).all()) and torch.allclose(strict, values, atol=1e-6)


@pytest.mark.parametrize("name", SNAPKV_FAMILY)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_kmeans_keeps_the_same_count_per_head_as_topk(name, ratio):
    """Uniform presses keep n_kept per head; head-adaptive ones give every head the same count as with topk."""
    for state in capture_states("llama"):
        counts = {}
        for clustering in ("topk", "kmeans"):
            press = kvbench.build_press(name, compression_ratio=ratio, window_size=16, clustering=clustering,
                                        n_clusters=4, kmeans_iterations=3)
            n_kept = press.n_kept(state.seq_len)
            chosen = press.select(press.score(state), state, n_kept)
            mask = chosen.mask if chosen.head_adaptive else selection.mask_from_indices(chosen.indices, state.seq_len)
            counts[clustering] = mask.sum(dim=-1)
            assert bool(mask[..., -16:].all()), "the observation window is always kept"
        if name in ("snapkv", "critical_snapkv"):
            assert bool((counts["kmeans"] == n_kept).all())
        assert torch.equal(counts["topk"], counts["kmeans"])


def test_kmeans_chooses_other_tokens_than_topk_on_a_real_layer():
    state = capture_states("gpt_neox", seq_len=128)[1]
    picks = []
    for clustering in ("topk", "kmeans"):
        press = kvbench.build_press("snapkv", compression_ratio=0.75, window_size=16, clustering=clustering)
        picks.append(press.select(press.score(state), state, press.n_kept(state.seq_len)).indices)
    assert not torch.equal(picks[0], picks[1])


def test_kmeans_scores_are_deterministic_and_keep_the_vote_values():
    state = capture_states("qwen3")[1]
    press = kvbench.build_press("snapkv", window_size=16, clustering="kmeans", n_clusters=6, kmeans_iterations=4)
    first, second = press.score(state), press.score(state)
    assert torch.equal(first, second)
    topk = kvbench.build_press("snapkv", window_size=16).score(state)
    torch.testing.assert_close(first.sort(dim=-1).values, topk.sort(dim=-1).values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"clustering": "dbscan"}, "unknown clustering 'dbscan'; use one of: topk, kmeans"),
        ({"n_clusters": 0}, "n_clusters must be an integer >= 1"),
        ({"kmeans_iterations": -1}, "kmeans_iterations must be an integer >= 0"),
        ({"pooling": "median"}, "unknown pooling 'median'; use one of: avg, max"),
    ],
)
@pytest.mark.parametrize("name", SNAPKV_FAMILY)
def test_bad_clustering_parameters_are_one_line_errors(name, params, message):
    with pytest.raises(KVBenchError, match=message) as info:
        kvbench.build_press(name, **params)
    assert "\n" not in str(info.value)
