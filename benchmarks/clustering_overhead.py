"""SnapKV with ``clustering=kmeans`` vs ``topk``: scoring + selection time as a share of a no_press prefill.

Usage: python benchmarks/clustering_overhead.py [--context 4096] [--repeats 3] [--device auto] [--model smollm2-135m]
Target (issue 11): the kmeans press' scoring + selection under 25% of a 4096-token prefill. Both presses are
timed in the same process, interleaved, medians of ``--repeats``, so a busy shared CPU shifts both alike.
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
        "no_press": kvbench.build_press("no_press"),
        "snapkv topk": kvbench.build_press("snapkv", compression_ratio=args.ratio),
        "snapkv kmeans": kvbench.build_press("snapkv", compression_ratio=args.ratio, clustering="kmeans",
                                             n_clusters=args.n_clusters, kmeans_iterations=args.iterations),
    }
    prefill(model, ids[:, :256], presses["snapkv kmeans"])  # warm-up
    totals: dict[str, list[float]] = {name: [] for name in presses}
    scoring: dict[str, list[float]] = {name: [] for name in presses}
    for _ in range(args.repeats):
        for name, press in presses.items():
            _, seconds, stats, _ = prefill(model, ids, press)
            totals[name].append(seconds)
            scoring[name].append(stats.seconds)
    base = statistics.median(totals["no_press"])
    print(f"model={args.model} device={model.device} dtype={model.dtype} context={args.context} ratio={args.ratio} "
          f"n_clusters={args.n_clusters} kmeans_iterations={args.iterations}")
    print(f"no_press prefill: {base * 1000:.1f} ms (median of {args.repeats})")
    print(f"{'press':<16}{'prefill ms':>12}{'score+select ms':>17}{'share of prefill':>18}")
    for name in ("snapkv topk", "snapkv kmeans"):
        share = statistics.median(scoring[name]) / base
        print(f"{name:<16}{statistics.median(totals[name]) * 1000:>12.1f}{statistics.median(scoring[name]) * 1000:>17.2f}"
              f"{share:>17.2%}")
    extra = (statistics.median(scoring["snapkv kmeans"]) - statistics.median(scoring["snapkv topk"])) / base
    verdict = "ok" if statistics.median(scoring["snapkv kmeans"]) / base < TARGET else "MISSED"
    print(f"kmeans over topk: +{extra:.2%} of prefill; kmeans total {verdict} (target < {TARGET:.0%})")


if __name__ == "__main__":
    main()
