"""benchmarks/gpu_session.sh is run on a lent GPU only, where a broken script costs the lease: dry-run here on the CPU
with tiny random models, it must write every file it promises, its batch steps must run on what benchmarks/gpu_carry.sh
gathers and compare each batch with batch size 1, and a failing step must not stop the steps after it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from kvbench.datasets.austen import ensure_austen
from kvbench.models import load_tokenizer
from kvbench.presses import PRESSES
from tests.tiny_models import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Two tiny random-weights configs, standing in for the 8B model and the packaged model's shapes."""
    root = tmp_path_factory.mktemp("configs")
    for name, family in (("big", "llama"), ("small", "qwen3")):
        tiny_model(family).config.save_pretrained(root / name)
    # the batch steps' model: tiny, but with the packaged tokenizer's vocabulary
    (root / "batch.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)))
    return root


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    """What benchmarks/gpu_carry.sh puts into .gpu-carry for the batch steps (the wheels are not needed here)."""
    root = tmp_path_factory.mktemp("carry")
    load_tokenizer("smollm2-135m").save_pretrained(root / "tokenizer")
    shutil.copytree(ensure_austen(), root / "austen")
    return root


def _session(out: Path, configs: Path, model: str, carry: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL": model, "SMALL_MODEL": f"random:{configs / 'small'}",
           "CONTEXTS": "96", "OVERHEAD_CONTEXT": "128", "DECODE": "3", "REPEATS": "1", "CARRY": str(carry),
           "BATCH_MODEL": f"random:{configs / 'batch.json'}", "BATCH_CONTEXT": "128", "BATCH_WINDOWS": "3",
           "BATCH_SIZES": "1 2"}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)


def _batch_verdicts(log: str) -> list[str]:
    """The outputs column of every batch_throughput row after the first batch size's (``reference``) one."""
    rows = [re.fullmatch(r"\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+x  (.+)", line) for line in log.splitlines()]
    return [row[1] for row in rows if row and row[1] != "reference"]


def _overhead_rows(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {line.split()[0] for line in lines[2:] if line and not line.startswith(("over target", "all presses"))}


def test_dry_run_writes_every_promised_file(tmp_path, configs, carry):
    out = tmp_path / "out"
    done = _session(out, configs, f"random:{configs / 'big'}", carry)
    log = (out / "session.log").read_text()
    assert done.returncode == 0, log
    assert log.rstrip().endswith("all steps passed")
    # PG-19 and the needle, float32 and the device's dtype: each batch of 2 answered as batch size 1 did
    verdicts = _batch_verdicts(log)
    assert len(verdicts) == 4, log
    assert sorted(v.split(":")[0] for v in verdicts) == ["identical predictions"] * 2 + ["within 1e-5"] * 2
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
    done = _session(out, configs, "random:./no/such/model", tmp_path / "no-carry")
    log = (out / "session.log").read_text()
    assert done.returncode == 1
    assert "failed: speed press-overhead-model" in log
    assert "batch steps skipped: no " in log and "gpu_carry.sh" in log
    assert _overhead_rows(out / "press_overhead_small.txt") == set(PRESSES) - {"no_press"}


def test_a_random_model_folder_refuses_a_tokenizer_larger_than_its_vocabulary(tmp_path, configs, carry):
    script = SCRIPT.parent / "random_model_dir.py"
    done = subprocess.run([sys.executable, str(script), "--config", f"random:{configs / 'small'}", "--tokenizer",
                           str(carry / "tokenizer"), "--out", str(tmp_path / "model")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: the tokenizer in ") and "embeds only 256" in done.stderr
    assert not (tmp_path / "model").exists()


def test_batch_throughput_fails_when_a_batch_answers_otherwise(monkeypatch, tmp_path, capsys):
    """A batch size whose predictions differ from the first one's ends the script with an error (the GPU session
    then logs the step as failed), and a repeated batch size is measured once, not compared with its own run."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import batch_throughput

    answers = {1: ["a", "b"], 2: ["a", "c"]}
    ran = []
    monkeypatch.setattr(batch_throughput, "get_model", lambda cfg, device: (SimpleNamespace(dtype=torch.float32), None))
    monkeypatch.setattr(batch_throughput, "_config", lambda overrides, size, out: SimpleNamespace(size=size, device="cpu"))
    monkeypatch.setattr(batch_throughput, "execute", lambda cfg: ran.append(cfg.size))
    monkeypatch.setattr(batch_throughput, "_outputs",
                        lambda out: pd.DataFrame({"sample_id": [0, 1], "prediction": answers[int(out.name[1:])]}))
    monkeypatch.setattr(sys, "argv", ["batch_throughput.py", "--batch-sizes", "1", "2", "2"])
    with pytest.raises(SystemExit) as exited:
        batch_throughput.main()
    assert "batch_size 2 did not answer as batch_size 1 did" in str(exited.value.code)
    assert ran == [1, 2] and "DIFFER: 1 predictions" in capsys.readouterr().out
