"""Hydra launchers of conf/hydra/launcher/: configs compose, and 2-job CPU sweeps through joblib and
submitit's local executor each leave one complete result directory per job, written by a worker process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=pg19", "dataset.context_length=128", "dataset.eval_length=16", "dataset.max_windows_per_book=1", "dataset.num_books=1"]
VARIANT = "context_length=128__eval_length=16__max_windows_per_book=1__num_books=1"
PRESSES = ("knorm", "snapkv")


class RecordWorker(Callback):
    """Added to a sweep with +hydra.callbacks.record._target_=tests.test_launchers.RecordWorker: records which
    process ran each job, and the GPUs it was given, in the job's Hydra directory. Runs in the job's process,
    after the launcher's own callbacks (so after joblib_gpus pinned the worker)."""

    def on_job_start(self, config, **kwargs) -> None:
        record = {"num": int(config.hydra.job.num), "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        (Path(config.hydra.runtime.output_dir) / "worker.json").write_text(json.dumps(record))


def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def sweep(out: Path, *launcher_args: str, timeout: int = 420) -> tuple[int, str]:
    """Run a 2-job multirun in a subprocess; return the launching process id and its output.

    One torch thread per job: the two jobs run side by side on a 2-core machine shared with other work,
    where more OpenMP threads than free cores make each job many times slower.
    """
    command = [sys.executable, "-m", "kvbench", "-m", *launcher_args, f"press={','.join(PRESSES)}", "compression_ratio=0.5", *TINY,
               f"output_dir={out}", "+hydra.callbacks.record._target_=tests.test_launchers.RecordWorker"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"sweep did not finish in {timeout}s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]
    return process.pid, output


def check_results(out: Path) -> None:
    """One complete directory per job, named and filled as a single run would be; nothing half-written left."""
    runs = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert [p.name for p in runs] == [f"pg19__smollm2-135m__{press}__0.50__{VARIANT}" for press in PRESSES]
    for run, press in zip(runs, PRESSES):
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["dataset"], metrics["model"], metrics["press"], metrics["compression_ratio"]) == ("pg19", "smollm2-135m", press, 0.5)
        assert (metrics["variant"], metrics["query_aware"], metrics["num_samples"], metrics["device"]) == (VARIANT, False, 1, "cpu")
        predictions = pd.read_csv(run / "predictions.csv")
        assert len(predictions) == 1
        # The score is the perplexity of the scored tokens, recomputable from the saved row.
        expected = math.exp(predictions["nll_sum"].sum() / predictions["num_tokens"].sum())
        assert metrics["score"] == pytest.approx(expected, rel=1e-9) and metrics["higher_is_better"] is False
        assert metrics["speed"]["kv_kept_fraction"] == pytest.approx(0.5)
        assert "press:" in (run / "config.yaml").read_text() and f"name: {press}" in (run / "config.yaml").read_text()
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trash-*"))
    assert not list(out.glob(".partial/*/rows.jsonl"))  # checkpoints are dropped once a run is complete


def sweep_dir(out: Path) -> Path:
    dirs = list((out / ".hydra" / "multiruns").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def workers(sweep: Path) -> list[dict]:
    records = [json.loads((sweep / str(num) / "worker.json").read_text()) for num in range(len(PRESSES))]
    assert [r["num"] for r in records] == list(range(len(PRESSES)))
    return records


# -- configs ----------------------------------------------------------------------------------------------

def test_slurm_config_composes_with_its_logs_under_the_hidden_sweep_dir():
    cfg = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.name) == ("gpu", 1, 1, "kvbench")
    assert launcher.cpus_per_task > 0 and launcher.mem_gb > 0 and launcher.timeout_min >= 60 and launcher.max_num_timeout > 0
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["launcher"]["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert raw["sweep"]["dir"].startswith("${output_dir}/.hydra/")


def test_slurm_local_config_gives_jobs_a_gpu():
    launcher = hydra_cfg("hydra/launcher=slurm_local").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.gpus_per_node == 1  # submitit's default of 0 would set CUDA_VISIBLE_DEVICES="" for every job


def test_joblib_gpus_config_sizes_the_pool():
    pytest.importorskip("kvbench.gpu_pool", reason="hydra/launcher=joblib_gpus needs kvbench/gpu_pool.py")
    cfg = hydra_cfg("hydra/launcher=joblib_gpus", "hydra.callbacks.gpu_pool.gpus='0,2,5'")
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3
    assert cfg.hydra.callbacks.gpu_pool._target_ == "kvbench.gpu_pool.GpuPool"


# -- sweeps -----------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("launcher, counterpart", [("joblib_gpus", "hydra/launcher=joblib "),
                                                     ("shared_prefill_gpus", "hydra/launcher=shared_prefill ")])
def test_gpu_launchers_without_a_gpu_stop_with_one_line(tmp_path, launcher, counterpart):
    """The pool is sized by a config resolver, whose exception Hydra would print as two pages of traceback."""
    pytest.importorskip("kvbench.gpu_pool", reason="the GPU launchers need kvbench/gpu_pool.py")
    result = subprocess.run([sys.executable, "-m", "kvbench", "-m", f"hydra/launcher={launcher}", *TINY,
                             f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: hydra/launcher={launcher} found no GPU") and counterpart in result.stderr
    assert not any((tmp_path / "out").rglob("*.json"))


def test_joblib_sweep_runs_each_job_in_a_worker_process(tmp_path):
    out = tmp_path / "results"
    main_pid, output = sweep(out, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "Joblib.Parallel(n_jobs=2" in output
    check_results(out)
    records = workers(sweep_dir(out))
    assert all(r["pid"] != main_pid for r in records), records  # not run in the launching process


@pytest.mark.integration
def test_joblib_gpus_sweep_pins_each_worker_to_its_own_gpu(tmp_path):
    pytest.importorskip("kvbench.gpu_pool", reason="hydra/launcher=joblib_gpus needs kvbench/gpu_pool.py")
    out = tmp_path / "results"
    # Two stand-in GPU ids: on CPU, CUDA_VISIBLE_DEVICES is set but unused (device=auto stays on cpu).
    main_pid, output = sweep(out, "hydra/launcher=joblib_gpus", "hydra.callbacks.gpu_pool.gpus='0,1'",
                             f"hydra.callbacks.gpu_pool.lock_dir={tmp_path / 'locks'}")
    assert "Joblib.Parallel(n_jobs=2" in output
    check_results(out)
    records = workers(sweep_dir(out))
    assert all(r["pid"] != main_pid and r["cuda_visible_devices"] in ("0", "1") for r in records), records
    # A worker keeps its GPU for every job it runs; two workers never share one.
    gpu_of = {}
    for r in records:
        assert gpu_of.setdefault(r["pid"], r["cuda_visible_devices"]) == r["cuda_visible_devices"], records
    assert len(set(gpu_of.values())) == len(gpu_of), records


@pytest.mark.integration
def test_submitit_local_sweep_logs_under_the_sweep_dir(tmp_path):
    out = tmp_path / "results"
    main_pid, _ = sweep(out, "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=10")
    check_results(out)
    multirun = sweep_dir(out)
    records = workers(multirun)
    assert all(r["pid"] != main_pid for r in records), records
    assert all(r["cuda_visible_devices"] == "0" for r in records), records  # gpus_per_node: 1 of slurm_local
    # submitit's folder per job: <output_dir>/.hydra/multiruns/<time>/.submitit/<job id>/<job id>_0_log.out
    logs = sorted((multirun / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == len(PRESSES), sorted(p.relative_to(out) for p in (multirun / ".submitit").rglob("*"))
    text = "".join(log.read_text() for log in logs)
    for press in PRESSES:
        assert f"[kvbench] pg19__smollm2-135m__{press}__0.50__{VARIANT}: score" in text
