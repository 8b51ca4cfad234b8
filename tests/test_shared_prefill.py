"""hydra/launcher=shared_prefill: a sweep's jobs that differ only in press and ratio share one prefill per
sample, and each still leaves the result directory a job-by-job sweep leaves (same predictions, perplexities,
identity), with skip, resume, separate groups, worker processes and per-job failures working as for solo runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
PG19 = ["dataset=pg19", "dataset.eval_length=16", "dataset.max_windows_per_book=2", "dataset.num_books=1"]
WINDOWS = 2  # PG19 above: one book, two windows
RULER = ["dataset=ruler", "dataset.context_length=256", "dataset.num_samples=1", "dataset.tasks=[niah_single_1,qa_1]"]
SHARED = "hydra/launcher=shared_prefill"
BASIC = "hydra/launcher=basic"
TIMING = ("prefill_seconds", "compression_seconds", "question_seconds", "ttft_seconds", "seconds_per_token", "teacher_forced_seconds", "peak_memory_bytes")


class CountPrefills(Callback):
    """Added with +hydra.callbacks.count._target_=tests.test_shared_prefill.CountPrefills
    +hydra.callbacks.count.path=<file>: appends one line per prefill forward pass (the process id and the job
    number running) to <file>. Installs its counter once per process, in the job's process (a worker's too)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_job_start(self, config, **kwargs) -> None:
        from kvbench import generation

        record = {"pid": os.getpid(), "ppid": os.getppid(), "num": int(config.hydra.job.num),
                  "context_length": config.dataset.get("context_length")}
        (Path(config.hydra.runtime.output_dir) / "job.json").write_text(json.dumps(record))
        if getattr(generation.prefill_many, "counted", False):
            return
        original, path = generation.prefill_many, self.path

        def counted(model, contexts, presses, *args, **kw):
            with open(path, "a") as handle:
                handle.write(f"{os.getpid()} {len(presses)}\n")
            return original(model, contexts, presses, *args, **kw)

        counted.counted = True
        generation.prefill_many = counted


def kvbench_sweep(out: Path, *args: str, check: bool = True, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[tuple[int, int]]]:
    """One multirun in a subprocess (one torch thread: the CPU is shared); returns it and its prefills as
    (process id, presses sharing it) pairs."""
    counter = out.parent / f"{out.name}-prefills.txt"
    counter.unlink(missing_ok=True)
    command = [sys.executable, "-m", "kvbench", "-m", *args, f"output_dir={out}",
               "+hydra.callbacks.count._target_=tests.test_shared_prefill.CountPrefills", f"+hydra.callbacks.count.path={counter}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prefills = [tuple(map(int, line.split())) for line in counter.read_text().splitlines()] if counter.exists() else []
    return result, prefills


def runs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(out.iterdir()) if not p.name.startswith(".") and (p / "metrics.json").exists()}


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_results(solo: Path, shared: Path) -> None:
    """Every run directory of the job-by-job sweep exists in the shared one with the same identity and the same
    predictions: text equal, perplexities to 1e-5 relative, everything but timings equal."""
    solo_runs, shared_runs = runs(solo), runs(shared)
    assert sorted(solo_runs) == sorted(shared_runs) and solo_runs
    for name, run in solo_runs.items():
        other = shared_runs[name]
        assert json.loads((run / "identity.json").read_text()) == json.loads((other / "identity.json").read_text()), name
        a, b = pd.read_csv(run / "predictions.csv"), pd.read_csv(other / "predictions.csv")
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for column in a.columns:
            if column in TIMING:
                continue
            if column in ("nll_sum", "perplexity"):
                assert b[column].tolist() == pytest.approx(a[column].tolist(), rel=1e-5), (name, column)
            else:
                assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), (name, column)
        assert metrics(other)["score"] == pytest.approx(metrics(run)["score"], rel=1e-5), name


def sweep_jobs(out: Path) -> list[dict]:
    """The job.json of each Hydra job directory of the one sweep under ``out``."""
    (sweep,) = (out / ".hydra" / "multiruns").iterdir()
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/job.json"), key=lambda p: int(p.parent.name))]


# -- configs and grouping (no model) ------------------------------------------------------------------------

def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_launcher_configs_compose():
    launcher = hydra_cfg(SHARED).hydra.launcher
    assert launcher._target_ == "hydra_plugins.kvbench_launchers.shared_prefill.SharedPrefillLauncher"
    assert (launcher.max_jobs_per_prefill, launcher.n_jobs, launcher.worker_processes) == (None, 1, False)
    pytest.importorskip("kvbench.gpu_pool")  # registers ${kvbench.gpu_count:...}
    cfg = hydra_cfg("hydra/launcher=shared_prefill_gpus", "hydra.callbacks.gpu_pool.gpus='0,2,5'")
    assert cfg.hydra.launcher._target_ == launcher._target_
    assert (cfg.hydra.launcher.n_jobs, cfg.hydra.launcher.worker_processes) == (3, True)
    assert cfg.hydra.callbacks.gpu_pool._target_ == "kvbench.gpu_pool.GpuPool"


def test_the_plugin_imports_from_anywhere(tmp_path):
    """Hydra finds launchers only in the installed hydra_plugins namespace package, not in the checkout."""
    result = subprocess.run([sys.executable, "-c", "import hydra_plugins.kvbench_launchers.shared_prefill as m; print(m.__file__)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == ROOT / "hydra_plugins" / "kvbench_launchers" / "shared_prefill.py"


def test_jobs_group_by_everything_but_press_and_ratio():
    from hydra_plugins.kvbench_launchers.shared_prefill import SweepJob, plan

    jobs = []
    for idx, (length, press, ratio) in enumerate([(128, "knorm", 0.5), (96, "knorm", 0.5), (128, "snapkv", 0.25),
                                                   (128, "snapkv", 1.5), (96, "snapkv", 0.5), (128, "knorm", 0.75)]):
        cfg = hydra_cfg(*PG19, f"dataset.context_length={length}", f"press={press}", f"compression_ratio={ratio}")
        jobs.append(SweepJob(idx, cfg))
    chunks = [[job.idx for job in chunk] for chunk in plan(jobs, None)]
    # The invalid ratio (job 3) is a group of its own: its error must not fail the jobs it would share with.
    assert chunks == [[0, 2, 5], [1, 4], [3]]
    assert [[job.idx for job in chunk] for chunk in plan(jobs, 2)] == [[0, 2], [5], [1, 4], [3]]
    # More workers than groups: groups are split until every worker has a chunk, or every chunk is one job.
    assert [[job.idx for job in chunk] for chunk in plan(jobs, None, workers=5)] == [[0, 2], [5], [1], [4], [3]]
    assert len(plan(jobs, None, workers=10)) == 6


def test_jobs_writing_one_directory_stay_in_one_chunk():
    """no_press at three ratios is one result directory: split over chunks, a second worker would wait on the
    first one's lock and then prefill its other jobs alone. Chunks count directories, not jobs."""
    from hydra_plugins.kvbench_launchers.shared_prefill import SweepJob, plan

    jobs = [SweepJob(idx, hydra_cfg(*PG19, "dataset.context_length=128", f"press={press}", f"compression_ratio={ratio}"))
            for idx, (press, ratio) in enumerate((p, r) for p in ("no_press", "snapkv") for r in (0.25, 0.5, 0.75))]
    assert [[job.idx for job in chunk] for chunk in plan(jobs, None, workers=3)] == [[0, 1, 2, 3], [4], [5]]
    assert [[job.idx for job in chunk] for chunk in plan(jobs, 2)] == [[0, 1, 2, 3], [4, 5]]
    assert [[job.idx for job in chunk] for chunk in plan(jobs, None, workers=6)] == [[0, 1, 2], [3], [4], [5]]


# -- sweeps on the packaged model -----------------------------------------------------------------------------

@pytest.mark.integration
def test_pg19_baseline_figures_are_those_of_a_job_by_job_sweep(tmp_path):
    """With no_press in the sweep, each compressed run's no_press_perplexity, delta and ratio are the solo sweep's."""
    sweep = [*PG19, "dataset.context_length=128", "press=no_press,knorm,snapkv", "compression_ratio=0.5"]
    kvbench_sweep(tmp_path / "solo", BASIC, *sweep)
    kvbench_sweep(tmp_path / "shared", SHARED, *sweep)
    assert_same_results(tmp_path / "solo", tmp_path / "shared")
    compressed = [name for name in runs(tmp_path / "solo") if "__no_press__" not in name]
    assert len(compressed) == 2
    baseline = metrics(next(run for name, run in runs(tmp_path / "solo").items() if "__no_press__" in name))["score"]
    for name in compressed:
        solo, shared = metrics(runs(tmp_path / "solo")[name]), metrics(runs(tmp_path / "shared")[name])
        assert solo["no_press_perplexity"] == pytest.approx(baseline, rel=1e-12)
        for key in ("no_press_perplexity", "delta", "ratio"):
            assert shared[key] == pytest.approx(solo[key], rel=1e-5), (name, key)


@pytest.mark.integration
def test_pg19_sweep_matches_job_by_job_with_one_prefill_then_skips_and_resumes(tmp_path):
    sweep = [*PG19, "dataset.context_length=128", "press=knorm,snapkv", "compression_ratio=0.25,0.5"]
    _, prefills = kvbench_sweep(tmp_path / "solo", BASIC, *sweep)
    assert len(prefills) == 4 * WINDOWS and {n for _, n in prefills} == {1}  # job by job: a prefill per job and window

    result, prefills = kvbench_sweep(tmp_path / "shared", SHARED, *sweep)
    assert "Launching 4 jobs in 1 shared-prefill group" in result.stderr + result.stdout
    assert [n for _, n in prefills] == [4] * WINDOWS  # one prefill per window, serving all four jobs
    assert_same_results(tmp_path / "solo", tmp_path / "shared")
    assert {metrics(run)["jobs_sharing_prefill"] for run in runs(tmp_path / "shared").values()} == {4}
    assert [job["num"] for job in sweep_jobs(tmp_path / "shared")] == [0, 1, 2, 3]  # each job keeps its Hydra job dir

    # A second run recomputes nothing and leaves every directory as it was.
    before = {name: (run / "metrics.json").read_bytes() for name, run in runs(tmp_path / "shared").items()}
    result, prefills = kvbench_sweep(tmp_path / "shared", SHARED, *sweep)
    assert prefills == [] and result.stdout.count("already complete") == 4
    assert {name: (run / "metrics.json").read_bytes() for name, run in runs(tmp_path / "shared").items()} == before

    # An interrupted group: one job finished before (here by a solo run), the other three still to do.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    done = next(iter(runs(tmp_path / "solo")))
    shutil.copytree(tmp_path / "solo" / done, resumed / done)
    result, prefills = kvbench_sweep(resumed, SHARED, *sweep)
    assert [n for _, n in prefills] == [3] * WINDOWS and result.stdout.count("already complete") == 1
    assert (resumed / done / "metrics.json").read_bytes() == (tmp_path / "solo" / done / "metrics.json").read_bytes()
    assert_same_results(tmp_path / "solo", resumed)


@pytest.mark.integration
def test_ruler_sweep_predicts_what_job_by_job_predicts(tmp_path):
    sweep = [*RULER, "press=knorm,snapkv", "compression_ratio=0.5,0.75"]
    _, solo_prefills = kvbench_sweep(tmp_path / "solo", BASIC, *sweep)
    _, prefills = kvbench_sweep(tmp_path / "shared", SHARED, *sweep)
    contexts = len(solo_prefills) // 4
    assert contexts >= 2 and [n for _, n in prefills] == [4] * contexts
    assert_same_results(tmp_path / "solo", tmp_path / "shared")


@pytest.mark.integration
def test_groups_spread_over_worker_processes(tmp_path):
    """Two data settings are two groups; with n_jobs=2 each group runs, whole, in its own worker process."""
    out = tmp_path / "shared"
    result, prefills = kvbench_sweep(out, SHARED, "hydra.launcher.n_jobs=2", *PG19, "dataset.context_length=128,96",
                                     "press=knorm,snapkv", "compression_ratio=0.5")
    assert "in 2 shared-prefill groups (2 worker processes)" in result.stderr + result.stdout
    assert len(runs(out)) == 4
    jobs = sweep_jobs(out)
    pid_of_group = [{job["pid"] for job in jobs if job["context_length"] == length} for length in (128, 96)]
    assert all(len(pids) == 1 for pids in pid_of_group), jobs
    (first,), (second,) = pid_of_group
    (launcher,) = {job["ppid"] for job in jobs}  # loky workers are children of the launching process
    assert first != second and launcher not in (first, second)
    assert sorted(prefills) == sorted([(first, 2)] * WINDOWS + [(second, 2)] * WINDOWS)


class KillWorker(Callback):
    """+hydra.callbacks.kill._target_=tests.test_shared_prefill.KillWorker +hydra.callbacks.kill.context_length=<n>:
    the process running a job of that context length dies at the job's start, as the system's OOM killer ends it."""

    def __init__(self, context_length: int) -> None:
        self.context_length = int(context_length)

    def on_job_start(self, config, **kwargs) -> None:
        if config.dataset.get("context_length") == self.context_length:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.integration
def test_a_dying_worker_stops_the_sweep_with_one_line(tmp_path):
    """loky ends every worker when one dies and cannot say which group it ran: the sweep stops, and says in one
    line what happened and that rerunning resumes (loky's own report is a page of traceback)."""
    result, _ = kvbench_sweep(tmp_path / "shared", SHARED, "hydra.launcher.n_jobs=2", *PG19, "dataset.context_length=128,96",
                              "press=knorm", "compression_ratio=0.5", "+hydra.callbacks.kill._target_=tests.test_shared_prefill.KillWorker",
                              "+hydra.callbacks.kill.context_length=96", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: a worker process died (exit SIGKILL(-9))") and "rerun the same command" in line


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap a re-parented worker)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("launcher", [(SHARED, "hydra.launcher.n_jobs=2"),
                                      ("hydra/launcher=joblib_gpus", "hydra.callbacks.gpu_pool.gpus='0,1'")])
def test_workers_stop_when_the_sweep_is_killed(tmp_path, launcher):
    """kill -9 of the launching process: its loky workers, re-parented, went on computing and writing results
    (and, on GPUs, kept their GPU's lock). They stop within seconds now, and the checkpoint stops growing."""
    pytest.importorskip("kvbench.gpu_pool")
    out = tmp_path / "shared"
    counter = tmp_path / "prefills.txt"
    pool = [f"hydra.callbacks.gpu_pool.lock_dir={tmp_path / 'locks'}"] if launcher[0].endswith("_gpus") else []
    command = [sys.executable, "-m", "kvbench", "-m", *launcher, *pool, "dataset=pg19", "dataset.eval_length=16",
               "dataset.max_windows_per_book=40", "dataset.num_books=1", "dataset.context_length=128,96", "press=knorm",
               "compression_ratio=0.5", f"output_dir={out}", "+hydra.callbacks.count._target_=tests.test_shared_prefill.CountPrefills",
               f"+hydra.callbacks.count.path={counter}"]
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        if (out / ".hydra").exists() and len(sweep_jobs(out)) == 2 and counter.exists() and len(counter.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert launcher.poll() is None and len(sweep_jobs(out)) == 2, "the workers never started"
    workers = [job["pid"] for job in sweep_jobs(out)]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)
    rows = sorted(out.glob(".partial/*/rows.jsonl"))
    before = [path.read_text() for path in rows]
    time.sleep(3)
    assert [path.read_text() for path in rows] == before and len(runs(out)) == 0


@pytest.mark.integration
def test_a_bad_job_fails_alone_and_the_others_finish(tmp_path):
    out = tmp_path / "shared"
    result, _ = kvbench_sweep(out, SHARED, *PG19, "dataset.context_length=128", "press=knorm", "compression_ratio=0.5,1.5",
                              check=False)
    assert result.returncode != 0
    assert "error: compression_ratio must be a number in [0, 1), got 1.5" in result.stderr
    assert list(runs(out)) == ["pg19__smollm2-135m__knorm__0.50__context_length=128__eval_length=16__max_windows_per_book=2__num_books=1"]


@pytest.mark.integration
def test_a_budget_beside_a_ratio_sweep_is_refused_as_job_by_job(tmp_path):
    """The launcher ran its jobs without the entry point's check: one budget run was stored, computed twice,
    under the names of two ratios it did not use."""
    out = tmp_path / "shared"
    result, prefills = kvbench_sweep(out, SHARED, *PG19, "dataset.context_length=128", "press=snapkv", "budget=16",
                                     "compression_ratio=0.25,0.5", check=False)
    assert result.returncode != 0
    for ratio in ("0.25", "0.5"):
        assert result.stderr.count(f"error: budget=16 keeps 16 tokens per head whatever compression_ratio says; "
                                   f"drop compression_ratio={ratio} (or budget)") == 1
    assert runs(out) == {} and prefills == []


@pytest.mark.integration
def test_a_stale_directory_fails_its_own_job_and_the_rest_of_its_group_is_computed(tmp_path):
    out = tmp_path / "shared"
    knorm = "pg19__smollm2-135m__knorm__0.50__context_length=128__eval_length=16__max_windows_per_book=2__num_books=1"
    kvbench_sweep(out, SHARED, *PG19, "dataset.context_length=128", "press=knorm", "compression_ratio=0.5")
    identity_file = out / knorm / "identity.json"
    identity = json.loads(identity_file.read_text())
    identity_file.write_text(json.dumps({**identity, "kvbench_commit": "0" * 40}))  # a result of an older commit

    result, prefills = kvbench_sweep(out, SHARED, *PG19, "dataset.context_length=128", "press=knorm,snapkv",
                                     "compression_ratio=0.5", check=False)
    assert result.returncode != 0
    assert "holds a result of another setup (kvbench_commit" in result.stderr
    assert sorted(runs(out)) == [knorm, knorm.replace("__knorm__", "__snapkv__")]
    assert prefills == [(prefills[0][0], 1)] * WINDOWS  # snapkv alone was computed


@pytest.mark.integration
def test_a_sweep_over_output_dirs_writes_every_directory_with_the_normalised_config(tmp_path):
    """Jobs that differ only in output_dir share a prefill but not a directory; no_press at two ratios is one run
    per directory, whose config.yaml records ratio 0 as its identity does, whichever job computed it."""
    a, b = tmp_path / "a", tmp_path / "b"
    command = [sys.executable, "-m", "kvbench", "-m", SHARED, *PG19, "dataset.context_length=128", "press=no_press",
               "compression_ratio=0.25,0.5", f"output_dir={a},{b}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    name = "pg19__smollm2-135m__no_press__0.00__context_length=128__eval_length=16__max_windows_per_book=2__num_books=1"
    for out in (a, b):
        assert list(runs(out)) == [name]
        config = OmegaConf.load(out / name / "config.yaml")
        assert config.compression_ratio == 0.0
        assert json.loads((out / name / "identity.json").read_text())["config"]["compression_ratio"] == 0.0


@pytest.mark.integration
def test_runs_finishing_before_their_baseline_are_compared_with_it(tmp_path):
    """A compressed perplexity run that finishes before its no_press run (listed before it in a job-by-job sweep, or
    in another worker's chunk of a group split over workers) gets its comparison once the baseline finishes."""
    sweep = [*PG19, "dataset.context_length=128", "compression_ratio=0.5"]
    kvbench_sweep(tmp_path / "first", BASIC, *sweep, "press=no_press,knorm,snapkv")
    result, _ = kvbench_sweep(tmp_path / "last", BASIC, *sweep, "press=knorm,snapkv,no_press")
    assert result.stdout.count("compared with this no_press run, which finished after it") == 2
    kvbench_sweep(tmp_path / "split", SHARED, "hydra.launcher.n_jobs=2", *sweep, "press=no_press,knorm,snapkv")
    expected = {name: metrics(run) for name, run in runs(tmp_path / "first").items() if "__no_press__" not in name}
    assert len(expected) == 2
    for out in ("last", "split"):
        for name, solo in expected.items():
            got = metrics(runs(tmp_path / out)[name])
            for key in ("no_press_perplexity", "delta", "ratio"):
                assert got[key] == pytest.approx(solo[key], rel=1e-5), (out, name, key)


@pytest.mark.integration
def test_two_configurations_naming_one_directory_do_not_share_its_result(tmp_path):
    """Ratios that differ past the six decimals of a directory name: the second configuration is refused, as a job-by-job
    sweep refuses it, instead of reporting the first one's result as its own."""
    out = tmp_path / "shared"
    result, _ = kvbench_sweep(out, SHARED, *PG19, "dataset.context_length=128", "press=knorm",
                              "compression_ratio=0.1234561,0.1234564", check=False)
    assert result.returncode != 0
    assert "is also the directory of another configuration of this sweep (config.compression_ratio: 0.1234561 -> " \
           "0.1234564)" in result.stderr
    (run,) = runs(out).values()
    assert json.loads((run / "identity.json").read_text())["config"]["compression_ratio"] == 0.1234561


def test_the_speedup_scripts_comparison_sees_missing_rows(tmp_path, monkeypatch):
    """benchmarks/shared_prefill_speedup.py judged a shared sweep that wrote fewer windows equal to job-by-job: the
    missing rows' NaN differences dropped out of the maximum."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    speedup = importlib.import_module("shared_prefill_speedup")
    name = "pg19__smollm2-135m__knorm__0.50"
    for side, perplexities in (("solo", [10.0, 11.0]), ("shared", [10.0])):
        run = tmp_path / side / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text("{}")
        (run / "identity.json").write_text("{}")
        pd.DataFrame({"sample_id": [f"emma/{i}" for i in range(len(perplexities))], "perplexity": perplexities}).to_csv(
            run / "predictions.csv", index=False)
    assert speedup.differences(tmp_path / "solo", tmp_path / "shared") == [f"{name}: other samples (2 rows against 1)"]
    assert speedup.differences(tmp_path / "solo", tmp_path / "solo") == []
