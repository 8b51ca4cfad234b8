"""kvbench against the kvpress 0.5.5 fixtures: kept (layer, head, token) pairs and post-compression logits.

Used by tests/test_reference.py; run it directly to print the table (press, ratio -> kept pairs that differ,
relative logits difference):

    .venv/bin/python -m tests.reference.compare [tiny_llama_gqa|smollm2]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

import kvbench
from kvbench.compression.cache import stored_lengths
from kvbench.model_access import cache_argument
from kvbench.generation import base_model
from kvbench.presses import selection
from transformers import DynamicCache

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RANDOM_SKETCH = ("compactor", "adakv_compactor")
# Fixture entries that are a registry press with other parameters (name -> registry name, parameters)
VARIANTS = {"streaming_llm_rerotated": ("streaming_llm", {"key_rerotation": True})}
# Presses that score the attention weights the layer computed: run (on both sides) with eager attention
EAGER = ("observed_attention",)


# Scores this close (relative to the layer's largest |score|) are a tie: which of them a top-k keeps is decided by
# float rounding, which differs between CPUs (AVX2 / AVX-512 kernels round RoPE differently). Layer 0 of a real model
# is full of exact ties: the same token at two positions has the same key norm.
TIE_RTOL = 1e-5


@dataclass
class Outcome:
    kept: np.ndarray  # [layers, kv_heads, L] bool
    logits: torch.Tensor  # at the fixture's logit ids
    tie_swaps: int = 0  # kept pairs exchanged for reference pairs of the same score (see ``tie_swapped``)


def tie_swapped(scores: torch.Tensor, ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """True when two ``[kv_heads, L]`` kept masks differ only by exchanging tied tokens: in every head, the tokens only
    one side keeps have, sorted, the same scores (within ``TIE_RTOL``) on both sides. Such selections are the same
    selection up to rounding; anything else (other counts, other scores) is a real difference."""
    tolerance = TIE_RTOL * float(scores.abs().max())
    for head in range(scores.shape[0]):
        only_ours = scores[head][ours[head] & ~reference[head]].sort().values
        only_reference = scores[head][reference[head] & ~ours[head]].sort().values
        if only_ours.shape != only_reference.shape:
            return False
        if only_ours.numel() and float((only_ours - only_reference).abs().max()) > tolerance:
            return False
    return True


@lru_cache(maxsize=2)
def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return dict(data)


@lru_cache(maxsize=4)
def model_for(name: str, attn_implementation: str = "sdpa"):
    if name == "smollm2":
        from kvbench.models import ModelSpec, load_model

        spec = ModelSpec("smollm2-135m", dtype="float32", attn_implementation=attn_implementation, device="cpu")
        model, _ = load_model(spec)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32,
                                                attn_implementation=attn_implementation).eval()


def reference(name: str, key: str) -> Outcome:
    data = fixture(name)
    length = int(data["context_length"])
    kept = np.unpackbits(data[f"kept/{key}"], axis=-1, count=length).astype(bool)
    return Outcome(kept, torch.from_numpy(data[f"logits/{key}"]))


def reference_keys(name: str) -> list[str]:
    """``press/ratio`` for every fixture entry (one per press and ratio; sketch seeds folded)."""
    keys = {k.removeprefix("kept/").rsplit("/seed", 1)[0] for k in fixture(name) if k.startswith("kept/")}
    return sorted(keys)


def reference_seeds(name: str, key: str) -> list[str]:
    return sorted(k.removeprefix("kept/") for k in fixture(name) if k.startswith(f"kept/{key}/seed"))


@torch.no_grad()
def kvbench_outcome(name: str, press_name: str, ratio: float, reference_kept: np.ndarray | None = None,
                    **params) -> Outcome:
    """kvbench's kept pairs (captured from the press' own selection) and question logits over its cache.

    With ``reference_kept``, a layer whose selection differs from the reference's only by tied tokens
    (``tie_swapped``) keeps the reference's tokens instead, so the logits compare the same cache; the exchanged
    pairs are counted in ``tie_swaps``. A layer that differs otherwise keeps its own selection (and fails the check).
    """
    data = fixture(name)
    model = model_for(name, "eager" if press_name in EAGER else "sdpa")
    registry_name, variant = VARIANTS.get(press_name, (press_name, {}))
    press = kvbench.build_press(registry_name, compression_ratio=ratio, **{**variant, **params})
    masks: dict[int, torch.Tensor] = {}
    swaps = 0
    select = press.select

    def spy(scores, state, n_kept):
        nonlocal swaps
        chosen = select(scores, state, n_kept)
        mask = chosen.mask if chosen.head_adaptive else selection.mask_from_indices(chosen.indices, scores.shape[-1])
        if reference_kept is not None:
            wanted = torch.from_numpy(reference_kept[state.layer_idx])
            if not torch.equal(mask[0], wanted) and tie_swapped(scores[0].float(), mask[0], wanted):
                swaps += int((mask[0] & ~wanted).sum())
                mask = wanted[None]
                chosen = (selection.Selection(mask=mask) if chosen.head_adaptive else
                          selection.Selection(indices=selection.topk_positions(mask.float(), chosen.indices.shape[-1])))
        masks[state.layer_idx] = mask[0]
        return chosen

    press.select = spy
    context = torch.from_numpy(data["context_ids"]).long()[None]
    question = torch.from_numpy(data["question_ids"]).long()[None]
    cache = DynamicCache(config=model.config)
    with kvbench.compress(model, press):
        base_model(model)(input_ids=context, **{cache_argument(model): cache})
    assert min(stored_lengths(cache)) < context.shape[1], "the press compressed nothing"
    logits = model(input_ids=question, **{cache_argument(model): cache}).logits[0, -1].float()
    kept = np.stack([masks[i].numpy() for i in sorted(masks)])
    return Outcome(kept, logits[torch.from_numpy(data["logit_ids"]).long()], swaps)


def kept_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Share of ``a``'s kept (layer, head, token) pairs that ``b`` does not keep."""
    return float((a & ~b).sum() / max(a.sum(), 1))


def logits_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest logit difference relative to the largest reference logit magnitude."""
    return float((got - expected).abs().max() / expected.abs().max())


def seed_spread(name: str, key: str) -> float:
    """The reference's own seed-to-seed spread: the largest kept-pair difference between two of its seeds."""
    seeds = [reference(name, k).kept for k in reference_seeds(name, key)]
    return max(kept_difference(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1 :])


def mean_seed_difference(name: str, key: str, ours: Outcome) -> tuple[float, float]:
    """kvbench's mean kept-pair and logits differences to each of the reference's sketch seeds."""
    refs = [reference(name, k) for k in reference_seeds(name, key)]
    kept = float(np.mean([kept_difference(r.kept, ours.kept) for r in refs]))
    return kept, float(np.mean([logits_difference(ours.logits, r.logits) for r in refs]))


def table(name: str) -> list[tuple[str, float, float, float | None, int]]:
    """(press/ratio, kept pairs that differ, relative logits difference, reference seed spread or None, tie swaps)."""
    rows = []
    for key in reference_keys(name):
        press_name, ratio = key.split("/")
        if press_name in RANDOM_SKETCH:
            ours = kvbench_outcome(name, press_name, float(ratio))
            rows.append((key, *mean_seed_difference(name, key, ours), seed_spread(name, key), 0))
        else:
            ref = reference(name, key)
            ours = kvbench_outcome(name, press_name, float(ratio), ref.kept)
            rows.append((key, kept_difference(ref.kept, ours.kept), logits_difference(ours.logits, ref.logits), None,
                         ours.tie_swaps))
    return rows


if __name__ == "__main__":
    for fixture_name in sys.argv[1:] or ["tiny_llama_gqa", "smollm2"]:
        print(f"\n{fixture_name}\n| press/ratio | kept pairs differing | logits rel. diff | reference seed spread | tied pairs "
              f"exchanged |\n|---|---|---|---|---|")
        for key, kept, logits, spread, swaps in table(fixture_name):
            print(f"| {key} | {kept:.2%} | {logits:.2e} | {'' if spread is None else f'{spread:.2%}'} | {swaps} |")
