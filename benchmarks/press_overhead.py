"""Scoring + selection time of every press as a share of prefill time, on the packaged model.

Usage: python benchmarks/press_overhead.py [--context 4096] [--repeats 3] [--device auto] [--model smollm2-135m]
Target (issue 2): under 5% for every press except compactor and expected_attention (which score with
extra projections of the whole context).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import kvbench
from kvbench.generation import prefill
from kvbench.models import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelSpec(args.model, attn_implementation=args.attn, device=args.device))
    ids = torch.randint(100, tokenizer.vocab_size - 1, (1, args.context), generator=torch.Generator().manual_seed(0))
    prefill(model, ids[:, :256], kvbench.build_press("no_press"))  # warm-up

    def prefill_seconds(press) -> tuple[float, float]:
        totals, scoring = [], []
        for _ in range(args.repeats):
            _, seconds, stats, _ = prefill(model, ids, press)
            totals.append(seconds)
            scoring.append(stats.seconds)
        return statistics.median(totals), statistics.median(scoring)

    base, _ = prefill_seconds(kvbench.build_press("no_press"))
    print(f"model={args.model} device={model.device} dtype={model.dtype} attn={args.attn} context={args.context} ratio={args.ratio}")
    print(f"no_press prefill: {base * 1000:.1f} ms (median of {args.repeats})")
    print(f"{'press':<24}{'prefill ms':>12}{'score+select ms':>17}{'share of prefill':>18}  target")
    for name in kvbench.PRESSES:
        if name == "no_press":
            continue
        total, scoring = prefill_seconds(kvbench.build_press(name, compression_ratio=args.ratio))
        share = scoring / base
        exempt = name in ("compactor", "adakv_compactor", "expected_attention")
        verdict = "exempt" if exempt else ("ok (<5%)" if share < 0.05 else "MISSED (>=5%)")
        print(f"{name:<24}{total * 1000:>12.1f}{scoring * 1000:>17.2f}{share:>17.2%}  {verdict}")


if __name__ == "__main__":
    main()
