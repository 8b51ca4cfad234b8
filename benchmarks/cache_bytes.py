"""Bytes a compressed cache holds, as a share of the uncompressed cache, for every registry press, in the packed
layout (the default: each head stores only its kept tokens) and in the masked one (each head padded to the layer's
longest head), all measured from one prefill of the packaged model.

Usage: python benchmarks/cache_bytes.py [--context 1024] [--ratios 0.5] [--model smollm2-135m] [--device auto]

Every tensor the cache holds counts (``kvbench.compression.cache.kv_bytes``: keys, values, per-head lengths, head
masks, tail validity). Target (issue 10): the packed cache of every head-adaptive press at most 1.05 x (1 - r) of
the uncompressed bytes. Presses that need attention weights (eager attention) are left out.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kvbench
from kvbench.benchmark.model_source import check_prefill_args, resolve_source
from kvbench.compression.cache import kv_bytes
from kvbench.errors import KVBenchError
from kvbench.generation import prefill_many
from kvbench.models import ModelSpec, load_model

TARGET = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    names = [n for n in kvbench.PRESSES if n != "no_press" and not getattr(kvbench.PRESSES[n].scorer, "needs_attention_weights", False)]
    check_prefill_args(resolve_source(args.model), args.context, args.ratios)
    model, tokenizer = load_model(ModelSpec(args.model, device=args.device))
    ids = torch.randint(100, tokenizer.vocab_size - 1, (1, args.context), generator=torch.Generator().manual_seed(0))
    full = kv_bytes(prefill_many(model, [ids], [kvbench.build_press("no_press")]).caches[0])
    print(f"model={args.model} device={model.device} dtype={model.dtype} context={args.context}: uncompressed cache "
          f"{full / 2**20:.2f} MiB (every tensor counted)")
    print(f"{'press':<36}{'r':>6}{'kept':>7}{'packed':>9}{'masked':>9}  verdict (packed <= {TARGET} x (1 - r))")
    missed = []
    for ratio in args.ratios:
        presses = [kvbench.build_press(n, compression_ratio=ratio) for n in names]
        shares = {}
        for layout in ("packed", "masked"):
            done = prefill_many(model, [ids], presses, layout)
            shares[layout] = [kv_bytes(cache) / full for cache in done.caches]
            kept = [stats.kept_pairs / stats.total_pairs for stats in done.stats]
        for name, press, packed, masked, fraction in zip(names, presses, shares["packed"], shares["masked"], kept):
            adaptive = press.head_adaptive
            ok = packed <= TARGET * (1 - ratio)
            verdict = ("ok" if ok else "MISSED") if adaptive else "uniform: dense layout, no per-head counts"
            missed += [] if ok or not adaptive else [f"{name}@{ratio:g}"]
            print(f"{name:<36}{ratio:>6.2f}{fraction:>7.3f}{packed:>9.3f}{masked:>9.3f}  {verdict}")
    print("every head-adaptive press within target" if not missed else f"over target: {', '.join(missed)}")


if __name__ == "__main__":
    try:
        main()
    except KVBenchError as exc:
        sys.exit(f"error: {exc}")
