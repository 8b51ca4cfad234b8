"""Command line of the speed benchmark; see ``kvbench.benchmark`` for what it measures and writes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvbench.benchmark.configs import RANDOM_CONFIGS
from kvbench.benchmark.speed import BenchmarkOptions
from kvbench.errors import KVBenchError

DEFAULTS = BenchmarkOptions()


def _numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KVBenchError(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvbench.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULTS.model,
                   help="conf/model preset, packaged name, local dir, hub id, or random:<spec> (random weights from a config: "
                        f"{', '.join(RANDOM_CONFIGS)}, a preset, a config.json or a hub id)")
    p.add_argument("--context-lengths", default=",".join(map(str, DEFAULTS.context_lengths)),
                   help="comma-separated prompt lengths in tokens (compressed context + the question)")
    p.add_argument("--presses", default=",".join(DEFAULTS.presses), help="comma-separated press names")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULTS.ratios), help="comma-separated ratios in [0, 1)")
    p.add_argument("--decode-tokens", type=int, default=DEFAULTS.decode_tokens, help="tokens decoded per row (EOS ignored)")
    p.add_argument("--repeats", type=int, default=DEFAULTS.repeats, help="runs per row; timings are medians")
    p.add_argument("--device", default=DEFAULTS.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=DEFAULTS.dtype, help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--attn", default=DEFAULTS.attn, help="eager | sdpa | flash_attention_2")
    p.add_argument("--out", default=str(DEFAULTS.out), help="folder for speed.csv and the plots (created)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="memory bandwidth in GB/s: adds the computed memory-bound ms/token floor (e.g. 3350 for an H100 SXM)")
    p.add_argument("--bound-only", action="store_true",
                   help="print the computed memory-bound table (needs --bandwidth-gbps); loads no weights, measures nothing")
    return p


def options_from(args: argparse.Namespace) -> BenchmarkOptions:
    return BenchmarkOptions(
        model=args.model,
        context_lengths=_numbers("--context-lengths", args.context_lengths, int),
        presses=tuple(p.strip() for p in args.presses.split(",") if p.strip()),
        ratios=_numbers("--ratios", args.ratios, float),
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        out=Path(args.out),
        seed=args.seed,
        bandwidth_gbps=args.bandwidth_gbps,
    )


def main(argv: list[str] | None = None) -> int:
    from kvbench.benchmark import CACHE_PLOT, CSV_NAME, DECODE_PLOT, bound_only, format_table, run

    args = parser().parse_args(argv)
    try:
        options = options_from(args)
        if args.bound_only:
            if options.bandwidth_gbps is None:
                raise KVBenchError("--bound-only needs --bandwidth-gbps (for example 3350 for an H100 SXM)")
            table = bound_only(options)
            print(f"computed, not measured: {options.model} at {options.bandwidth_gbps:g} GB/s")
            print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
            return 0
        df = run(options)
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    first = df.iloc[0]
    print(f"{first['model']} on {first['device_name']}, {first['dtype']}, {first['attn']}, {options.decode_tokens} decoded tokens, "
          f"median of {options.repeats}")
    print(format_table(df))
    print(f"wrote {options.out / CSV_NAME}, {options.out / DECODE_PLOT}, {options.out / CACHE_PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
