"""Write a model directory with random weights and a real tokenizer, so the whole harness (``python -m kvbench``,
``benchmarks/batch_throughput.py``) runs where the trained weights cannot travel: a device machine reaches no hub
and the packaged GGUF is larger than what a device call carries, but the tokenizer files are small.

Usage: python benchmarks/random_model_dir.py --tokenizer DIR --out DIR [--config random:smollm2-135m] [--seed 0]

``--config`` takes what the speed benchmark's ``--model random:<spec>`` takes; ``--tokenizer`` is a folder with the
tokenizer files of a model whose vocabulary the config matches (for the packaged model: its converted copy under
``~/.cache/kvbench/models/smollm2-135m``). The weights are built on the CPU in float32 and saved as safetensors, so a
run that loads the directory picks its own dtype and device as for any local model. Scores of random weights are
not a trained model's: the directory is for timing the pipeline and for checking that two ways of running it agree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from kvbench import atomic
from kvbench.benchmark import model_source
from kvbench.errors import KVBenchError


def write(config: str, tokenizer: Path, out: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    source = model_source.resolve_source(config if config.startswith(model_source.RANDOM_PREFIX)
                                         else model_source.RANDOM_PREFIX + config)
    if not tokenizer.is_dir():
        raise KVBenchError(f"--tokenizer {tokenizer} is not a folder; give the folder holding tokenizer.json")
    try:  # not kvbench.models.load_tokenizer: that reads model folders (config.json), this one holds a tokenizer alone
        loaded_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as exc:
        raise KVBenchError(f"no tokenizer could be read from {tokenizer} ({exc.__class__.__name__}); give the folder "
                           f"benchmarks/gpu_carry.sh writes to .gpu-carry/tokenizer") from exc
    vocab = len(loaded_tokenizer)
    if vocab > source.config.vocab_size:
        raise KVBenchError(f"the tokenizer in {tokenizer} has {vocab} tokens but {config} embeds only "
                           f"{source.config.vocab_size}; give the tokenizer of that model family")
    model = model_source.load(source, device="cpu", dtype="float32", attn="sdpa", seed=seed)
    staging = atomic.staging_dir(out)  # a whole folder or none: a run must never load half-written weights
    try:
        model.save_pretrained(staging)
        loaded_tokenizer.save_pretrained(staging)
        with atomic.lock_for(out):
            atomic.replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="random:smollm2-135m")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        path = write(args.config, args.tokenizer, args.out, args.seed)
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"random-weight {args.config} with the tokenizer of {args.tokenizer} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
