"""Scoring + selection time of every registry press as a share of a plain (no_press) prefill, on the packaged model.

Usage: python benchmarks/press_overhead.py [--context 4096] [--repeats 5] [--ratio 0.5] [--device auto]
                                           [--model smollm2-135m] [--dtype auto] [--attn sdpa] [--press NAME ...]

``--model`` takes what the speed benchmark takes, ``random:<spec>`` included: ``random:smollm2-135m`` times the
packaged model's shapes where its weights are not installed (a device machine). Scores of random weights are not
those of the trained model, so presses whose work depends on them (CriticalKV's pruned norms) time differently.

Targets (issue 10): at most 5% of the prefill for every press, at most 10% for presses scored by Expected
Attention or Compactor (they project the whole context's queries: expected_attention, compactor, adakv_compactor,
and the CriticalKV wrappers around Expected Attention, which add CriticalKV's cost to that projection).

The share of one repeat is the press' scoring + selection seconds (``CompressionStats.seconds``: score, select and
the cache rewrite of every layer) over the rest of the same prefill (the model's own forward pass), both measured
in one run: on a shared or virtual machine the same prefill swings by tens of percent from one run to the next, so
a share taken against a separate no_press run would measure the machine's drift as much as the press. The table
reports medians over the repeats. Presses that need attention weights are measured only under ``--attn eager``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch

import kvbench
from kvbench.benchmark import model_source
from kvbench.benchmark.speed import device_name
from kvbench.errors import KVBenchError
from kvbench.generation import prefill
from kvbench.presses import PRESSES
from kvbench.presses.base import Press
from kvbench.presses.compactor import CompactorPress
from kvbench.presses.expected_attention import ExpectedAttentionPress

TARGET = 0.05
# Scorers that project every context query (a q_proj over the context, ~4% of a prefill on its own)
PROJECTING_SCORERS: dict[type, float] = {ExpectedAttentionPress: 0.10, CompactorPress: 0.10}


@dataclass
class Measurement:
    prefill: float  # median seconds of the model's forward pass alone (the prefill without its compression)
    scoring: float  # median scoring + selection seconds
    share: float  # median of the per-repeat shares scoring / forward pass


def target(name: str) -> float:
    """The issue's share target for a registry press: 10% for the query-projecting scorers, 5% for the rest."""
    return PROJECTING_SCORERS.get(PRESSES[name].scorer, TARGET)


def needs_attention_weights(name: str) -> bool:
    return bool(getattr(PRESSES[name].scorer, "needs_attention_weights", False))


def measure(model: torch.nn.Module, ids: torch.Tensor, press: Press, repeats: int) -> Measurement:
    """``repeats`` prefills with the press; medians of the forward pass, of the scoring and of their per-run ratio."""
    forwards, scorings, shares = [], [], []
    for _ in range(repeats):
        _, seconds, stats, _ = prefill(model, ids, press)
        forwards.append(seconds - stats.seconds)
        scorings.append(stats.seconds)
        shares.append(stats.seconds / forwards[-1])
    median = statistics.median
    return Measurement(median(forwards), median(scorings), median(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--press", nargs="*", default=None, help="registry names to measure (default: all)")
    args = parser.parse_args()
    names = [n for n in (args.press or PRESSES) if n != "no_press"]
    for name in names:
        kvbench.build_press(name)  # an unknown name fails here (listing the valid ones), before the model loads

    source = model_source.resolve_source(args.model)
    model_source.check_prefill_args(source, args.context, [args.ratio], args.repeats)
    model = model_source.load(source, args.device, args.dtype, args.attn)
    vocab_size = source.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab_size - 1, (1, args.context), generator=torch.Generator().manual_seed(0))
    # Warm-up at the full length: the first prefill of a length pays for growing the allocator's pools (page faults
    # on fresh memory), which would otherwise land on whichever press is measured first.
    prefill(model, ids, kvbench.build_press("no_press"))
    print(f"model={source.name} device={model.device} ({device_name(model.device)}) dtype={model.dtype} attn={args.attn} context={args.context} "
          f"ratio={args.ratio} torch_threads={torch.get_num_threads()} repeats={args.repeats} (medians)")
    print(f"{'press':<36}{'forward ms':>12}{'score+select ms':>17}{'share':>9}  verdict")
    missed = []
    for name in names:
        if needs_attention_weights(name) and args.attn != "eager":
            print(f"{name:<36}{'':>38}  skipped: needs attention weights, run with --attn eager")
            continue
        m = measure(model, ids, kvbench.build_press(name, compression_ratio=args.ratio), args.repeats)
        limit = target(name)
        ok = m.share <= limit
        missed += [] if ok else [name]
        verdict = f"{'ok' if ok else 'MISSED'} (target {limit:.0%})"
        print(f"{name:<36}{m.prefill * 1000:>12.1f}{m.scoring * 1000:>17.1f}{m.share:>9.2%}  {verdict}", flush=True)
    print("all presses within target" if not missed else f"over target: {', '.join(missed)}")


if __name__ == "__main__":
    try:
        main()
    except KVBenchError as exc:
        sys.exit(f"error: {exc}")
