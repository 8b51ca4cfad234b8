"""benchmarks/gpu_session.sh is run on a lent GPU only, where a broken script costs the lease: dry-run here on the CPU
with tiny random models, it must write every file it promises, and a failing step must not stop the steps after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvbench.presses import PRESSES
from tests.tiny_models import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Two tiny random-weights configs, standing in for the 8B model and the packaged model's shapes."""
    root = tmp_path_factory.mktemp("configs")
    for name, family in (("big", "llama"), ("small", "qwen3")):
        tiny_model(family).config.save_pretrained(root / name)
    return root


def _session(out: Path, configs: Path, model: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL": model, "SMALL_MODEL": f"random:{configs / 'small'}",
           "CONTEXTS": "96", "OVERHEAD_CONTEXT": "128", "DECODE": "3", "REPEATS": "1"}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)


def _overhead_rows(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {line.split()[0] for line in lines[2:] if line and not line.startswith(("over target", "all presses"))}


def test_dry_run_writes_every_promised_file(tmp_path, configs):
    out = tmp_path / "out"
    done = _session(out, configs, f"random:{configs / 'big'}")
    assert done.returncode == 0, (out / "session.log").read_text()
    assert (out / "session.log").read_text().rstrip().endswith("all steps passed")
    speed = pd.read_csv(out / "speed" / "speed.csv")
    # no_press once, then each press at every ratio (its ratio-0 row reuses no_press' run)
    assert len(speed) == 1 + 3 * 3 and set(speed["press"]) == {"no_press", "snapkv", "adakv_snapkv", "expected_attention"}
    assert (out / "speed" / "decode_ms_per_token.png").stat().st_size > 0 and (out / "speed" / "cache_bytes.png").stat().st_size > 0
    for label in ("big", "small"):
        assert _overhead_rows(out / f"press_overhead_{label}.txt") == set(PRESSES) - {"no_press"}
    # what a device call brings back: at most 8 files, no deeper than two folders under OUT
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_a_failing_step_is_reported_and_the_rest_still_run(tmp_path, configs):
    out = tmp_path / "out"
    done = _session(out, configs, "random:./no/such/model")
    log = (out / "session.log").read_text()
    assert done.returncode == 1
    assert "failed: speed press-overhead-model" in log
    assert _overhead_rows(out / "press_overhead_small.txt") == set(PRESSES) - {"no_press"}
