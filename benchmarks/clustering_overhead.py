"""SnapKV with ``clustering=kmeans`` vs ``topk``: scoring + selection time as a share of a no_press prefill.

Usage: python benchmarks/clustering_overhead.py [--context 4096] [--repeats 3] [--device auto] [--model smollm2-135m]
Target (issue 11): the kmeans press' scoring + selection under 25% of a 4096-token prefill. Each share is the
press' scoring + selection over the rest of the same prefill (the model's forward pass), so the machine's drift
between runs cancels (``press_overhead.measure``); medians of ``--repeats``.
"""

from __future__ import annotations

import argparse

import torch

import kvbench
from kvbench.generation import prefill
from kvbench.models import ModelSpec, load_model
from press_overhead import measure

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
    measured = {name: measure(model, ids, press, args.repeats) for name, press in presses.items()}
    print(f"model={args.model} device={model.device} dtype={model.dtype} context={args.context} ratio={args.ratio} "
          f"n_clusters={args.n_clusters} kmeans_iterations={args.iterations} (medians of {args.repeats})")
    print(f"{'press':<16}{'forward ms':>12}{'score+select ms':>17}{'share of prefill':>18}")
    for name, m in measured.items():
        print(f"{name:<16}{m.prefill * 1000:>12.1f}{m.scoring * 1000:>17.2f}{m.share:>17.2%}")
    kmeans, topk = measured["snapkv kmeans"].share, measured["snapkv topk"].share
    verdict = "ok" if kmeans < TARGET else "MISSED"
    print(f"kmeans over topk: +{kmeans - topk:.2%} of prefill; kmeans total {verdict} (target < {TARGET:.0%})")


if __name__ == "__main__":
    main()
