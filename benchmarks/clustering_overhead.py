"""SnapKV with ``clustering=kmeans`` vs ``topk``: scoring + selection time as a share of a no_press prefill.

Usage: python benchmarks/clustering_overhead.py [--context 4096] [--repeats 3] [--device auto] [--model smollm2-135m]
Target (issue 11): the kmeans press' scoring + selection under 25% of a 4096-token prefill. Each share is the
press' scoring + selection over the rest of the same prefill (the model's forward pass), so the machine's drift
between runs cancels (see benchmarks/press_overhead.py); both presses interleaved, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import kvbench
from kvbench.generation import prefill
from kvbench.models import ModelSpec, load_model

TARGET = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-clusters", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = load_model(ModelSpec(args.model, device=args.device))
    ids = torch.randint(100, tokenizer.vocab_size - 1, (1, args.context), generator=torch.Generator().manual_seed(0))
    presses = {
        "snapkv topk": kvbench.build_press("snapkv", compression_ratio=args.ratio),
        "snapkv kmeans": kvbench.build_press("snapkv", compression_ratio=args.ratio, clustering="kmeans",
                                             n_clusters=args.n_clusters, kmeans_iterations=args.iterations),
    }
    prefill(model, ids, presses["snapkv kmeans"])  # warm-up at the full length
    forwards: dict[str, list[float]] = {name: [] for name in presses}
    scoring: dict[str, list[float]] = {name: [] for name in presses}
    shares: dict[str, list[float]] = {name: [] for name in presses}
    for _ in range(args.repeats):
        for name, press in presses.items():
            _, seconds, stats, _ = prefill(model, ids, press)
            forwards[name].append(seconds - stats.seconds)
            scoring[name].append(stats.seconds)
            shares[name].append(stats.seconds / (seconds - stats.seconds))
    median = statistics.median
    print(f"model={args.model} device={model.device} dtype={model.dtype} context={args.context} ratio={args.ratio} "
          f"n_clusters={args.n_clusters} kmeans_iterations={args.iterations} (medians of {args.repeats})")
    print(f"{'press':<16}{'forward ms':>12}{'score+select ms':>17}{'share of prefill':>18}")
    for name in presses:
        print(f"{name:<16}{median(forwards[name]) * 1000:>12.1f}{median(scoring[name]) * 1000:>17.2f}{median(shares[name]):>17.2%}")
    extra = median(shares["snapkv kmeans"]) - median(shares["snapkv topk"])
    verdict = "ok" if median(shares["snapkv kmeans"]) < TARGET else "MISSED"
    print(f"kmeans over topk: +{extra:.2%} of prefill; kmeans total {verdict} (target < {TARGET:.0%})")

if __name__ == "__main__":
    main()
