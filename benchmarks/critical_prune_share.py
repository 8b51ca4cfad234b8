"""CriticalKV's stage two with the norm bounds taken by more or fewer heads: the measurement behind
``criticalkv.PRUNE_SLOT_SHARE``.

Usage: python benchmarks/critical_prune_share.py [--context 4096] [--ratios 0.5 0.75] [--shares 0.5 0.25 0.1667 0]
                                                 [--press critical_snapkv ...] [--repeats 3] [--model smollm2-135m]

A head takes the bounds when its stage-two slots are at most ``share`` of its candidates (0: never). The bounds pay
only where they leave out enough norms, and where that is depends on how fast the machine's products are against
its bookkeeping, so the constant should be measured again on a new kind of machine. One prefill per (press, ratio)
records every layer's stage-two inputs; each share then replays the same inputs (repeats alternate between the
shares, medians reported), so the shares are compared on identical work, free of the prefill's drift. Every share
must keep the same tokens: the script checks it and fails otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

import kvbench
from kvbench.benchmark import model_source
from kvbench.device import synchronize
from kvbench.errors import KVBenchError
from kvbench.generation import prefill
from kvbench.presses import criticalkv, selection


def record_stage_two(model: torch.nn.Module, ids: torch.Tensor, press_name: str, ratio: float) -> list[tuple]:
    """The arguments of every layer's ``stage_two_scores`` call in one prefill with the press."""
    calls, original = [], criticalkv.stage_two_scores

    def recorder(scores, state, stage_one, slots, epsilon):
        state = dataclasses.replace(state, values=state.values.detach().clone())  # the cache is rewritten after
        calls.append((scores.clone(), state, stage_one.clone(), slots.clone(), epsilon))
        return original(scores, state, stage_one, slots, epsilon)

    criticalkv.stage_two_scores = recorder
    try:
        prefill(model, ids, kvbench.build_press(press_name, compression_ratio=ratio))
    finally:
        criticalkv.stage_two_scores = original
    if not calls:
        raise KVBenchError(f"{press_name} made no CriticalKV stage-two call; pass a critical_* press")
    return calls


def replay(calls: list[tuple], share: float) -> tuple[float, list[torch.Tensor]]:
    """Seconds of stage two over all recorded layers with ``PRUNE_SLOT_SHARE = share``, and each layer's kept mask."""
    default, criticalkv.PRUNE_SLOT_SHARE = criticalkv.PRUNE_SLOT_SHARE, share
    try:
        device = calls[0][0].device
        synchronize(device)
        start = time.perf_counter()
        outputs = [criticalkv.stage_two_scores(*call) for call in calls]
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        criticalkv.PRUNE_SLOT_SHARE = default
    kept = [selection.ranks(out) < (stage_one.sum(-1) + slots)[..., None]
            for out, (_, _, stage_one, slots, _) in zip(outputs, calls)]
    return seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25, 1 / 6, 0.0])
    parser.add_argument("--press", nargs="+", default=["critical_snapkv", "critical_adakv_snapkv"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    for name in args.press:
        kvbench.build_press(name)  # an unknown name fails here, before the model loads

    source = model_source.resolve_source(args.model)
    model = model_source.load(source, args.device, "auto", "sdpa")
    vocab_size = source.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab_size - 1, (1, args.context), generator=torch.Generator().manual_seed(0))
    print(f"model={source.name} device={model.device} context={args.context} repeats={args.repeats} (medians); "
          f"default PRUNE_SLOT_SHARE={criticalkv.PRUNE_SLOT_SHARE:g}")
    print(f"{'press':<36}{'ratio':>6}" + "".join(f"{f'share {s:.3g}':>14}" for s in args.shares))
    for name in args.press:
        for ratio in args.ratios:
            calls = record_stage_two(model, ids, name, ratio)
            times: dict[float, list[float]] = {share: [] for share in args.shares}
            reference = None
            for _ in range(args.repeats):
                for share in args.shares:
                    seconds, kept = replay(calls, share)
                    times[share].append(seconds)
                    reference = reference or kept
                    if any(not torch.equal(a, b) for a, b in zip(reference, kept)):
                        raise KVBenchError(f"{name} at r={ratio}: share {share:g} keeps other tokens than share "
                                           f"{args.shares[0]:g}; the bounds are wrong")
            cells = "".join(f"{statistics.median(times[s]) * 1000:>11.0f} ms" for s in args.shares)
            print(f"{name:<36}{ratio:>6g}{cells}", flush=True)
    print("every share kept the same tokens")


if __name__ == "__main__":
    try:
        main()
    except KVBenchError as exc:
        sys.exit(f"error: {exc}")
