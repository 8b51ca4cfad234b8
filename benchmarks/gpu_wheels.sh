#!/usr/bin/env bash
# Wheels that benchmarks/gpu_session.sh needs on a device machine: its image has torch, transformers, pandas,
# matplotlib and pytest but not omegaconf (imported by kvbench.runner, hence by the GPU tests), and it reaches no
# package index. Run here, where pip has one; the wheels land in .whl/ (git-ignored), which the device call carries.
# Both are pure Python: antlr4-python3-runtime 4.9.3 (omegaconf 2.3's pin) is published only as a source archive, so
# it is built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl omegaconf==2.3.0
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
