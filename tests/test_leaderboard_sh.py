"""leaderboard.sh: the commands it issues (dry run), the jobs its sweep presets expand to, and one real
quick sweep (every press, one ratio) ending in the leaderboard files."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from kvbench.presses import PRESSES
from hydra_plugins.kvbench_launchers.shared_prefill import task_config
from kvbench.results import run_name, run_variant
from kvbench.runner import result_directory

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "leaderboard.sh"
RATIOS = (0.25, 0.5, 0.75, 0.875)
# Presses that score the attention weights run in the eager pass; every other press in the presses pass
NEEDS_EAGER = sorted(n for n, e in PRESSES.items() if getattr(e.scorer, "needs_attention_weights", False))
COMPRESSING = sorted(set(PRESSES) - {"no_press", *NEEDS_EAGER})
EAGER_VARIANT = "model.attn_implementation=eager"
QUICK_PG19 = ["dataset.context_length=128", "dataset.max_windows_per_book=1", "dataset.num_books=1"]
QUICK_VARIANT = "context_length=128__max_windows_per_book=1__num_books=1"
CLEAN_ENV = ("MODEL", "DATASET", "LAUNCHER", "OUTPUT_DIR", "RATIOS", "QUICK", "DRY_RUN", "PYTHON")


def script(*args: str, env: dict | None = None, script_path: Path = SCRIPT, timeout: int = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    return subprocess.run(["bash", str(script_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})


def dry_run(*args: str, **kw) -> list[list[str]]:
    result = script("--dry-run", *args, **kw)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def sweep_jobs(command: list[str]) -> list[list[str]]:
    """The per-job task overrides Hydra's basic sweeper makes of one printed kvbench command.

    Mirrors BasicSweeper.sweep: the preset's hydra.sweeper.params, then the command line's task overrides
    (hydra/ overrides are not task overrides and never reach a job's overrides).
    """
    assert command[1:4] == ["-m", "kvbench", "-m"], command
    overrides = command[4:]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = parser.parse_overrides(params + list(cfg.hydra.overrides.task))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def run_names(jobs: list[list[str]]) -> set[str]:
    """The result directory each job writes, named by kvbench's own code from the job's composed config."""
    names = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for job in jobs:
            cfg = compose("config", overrides=job, return_hydra_config=True)
            task = task_config(cfg)
            variant = run_variant(task, list(cfg.hydra.overrides.task), cfg.hydra.runtime.choices)
            names.add(result_directory(task, variant).name)
    return names


def test_help_lists_the_options():
    result = script("--help")
    assert result.returncode == 0
    for option in ("--model", "--dataset", "--launcher", "--output-dir", "--ratios", "--quick", "--dry-run", "MODEL", "OUTPUT_DIR"):
        assert option in result.stdout


@pytest.mark.parametrize("args,message", [(["--bogus"], "unknown option '--bogus'"), (["--model"], "--model needs a value"),
                                          (["--ratios", "half"], "--ratios takes comma-separated numbers"),
                                          # past the check, 1.5 failed every job of every pass one by one
                                          (["--ratios", "0.5,1.5"], "--ratios takes comma-separated numbers in [0, 1)"),
                                          (["--quick", "--dataset", "mystery"], "no tiny settings for dataset 'mystery'")])
def test_bad_arguments_fail_with_one_message(args, message):
    result = script("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_standard_sweep_is_three_multiruns_then_the_leaderboard(tmp_path):
    out = tmp_path / "res"
    commands = dry_run("--model", "pythia-160m", "--dataset", "needle", "--launcher", "joblib_gpus", "--output-dir", str(out),
                       "--", "max_context_length=4096", "hydra.launcher.n_jobs=4")
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python"
    assert [c[0] for c in commands] == [python] * 6
    assert [c[4] for c in commands[:5]] == ["hydra/sweeper=baseline", "hydra/sweeper=presses", "hydra/sweeper=query_aware",
                                            "hydra/sweeper=baseline", "hydra/sweeper=eager"]
    assert EAGER_VARIANT in commands[3]
    for command in commands[:5]:
        # joblib_gpus' one worker per GPU, with the jobs of a group sharing their prefill
        for arg in ("model=pythia-160m", "dataset=needle", f"output_dir={out}", "hydra/launcher=shared_prefill_gpus",
                    "max_context_length=4096", "hydra.launcher.n_jobs=4"):
            assert arg in command, command
        assert not any(a.startswith("compression_ratio=") for a in command)  # the presets' four ratios apply
    assert commands[5] == [python, "-m", "kvbench.leaderboard", str(out)]


@pytest.mark.parametrize("args,launcher", [((), "shared_prefill"), (("--launcher", "joblib_gpus"), "shared_prefill_gpus"),
                                           (("--launcher", "basic"), "basic"), (("--launcher=slurm",), "slurm"),
                                           (("--launcher", "shared_prefill_gpus"), "shared_prefill_gpus")])
def test_passes_share_their_prefill_unless_another_launcher_is_asked_for(args, launcher):
    commands = dry_run(*args)
    for command in commands[:-1]:
        assert [a for a in command if a.startswith("hydra/launcher=")] == [f"hydra/launcher={launcher}"], command
    assert not any(a.startswith("hydra/launcher=") for a in commands[-1])  # the leaderboard is no sweep


def test_help_says_what_each_launcher_does():
    text = " ".join(script("--help").stdout.split())
    assert "default: shared_prefill" in text and "shared_prefill_gpus" in text and "no shared prefill" in text


def test_presets_expand_to_the_registry_with_plain_run_names():
    baseline, presses, query_aware, eager_baseline, eager, _ = dry_run("--dataset", "needle")
    assert run_names(sweep_jobs(baseline)) == {"needle__smollm2-135m__no_press__0.00"}
    expected = {run_name("needle", "smollm2-135m", p, r) for p, r in itertools.product(COMPRESSING, RATIOS)}
    jobs = sweep_jobs(presses)
    assert len(jobs) == len(expected) == len(COMPRESSING) * 4
    assert run_names(jobs) == expected  # no "__sweep=..." or other variant from choosing a preset
    expected = {run_name("needle", "smollm2-135m", p, r, "query_aware") for p, r in itertools.product(["snapkv", "adakv_snapkv"], RATIOS)}
    assert run_names(sweep_jobs(query_aware)) == expected
    # The presses that need attention weights, with eager attention, next to an eager baseline of the same variant
    assert NEEDS_EAGER == ["observed_attention"]
    assert run_names(sweep_jobs(eager_baseline)) == {run_name("needle", "smollm2-135m", "no_press", 0.0, EAGER_VARIANT)}
    expected = {run_name("needle", "smollm2-135m", p, r, EAGER_VARIANT) for p, r in itertools.product(NEEDS_EAGER, RATIOS)}
    assert run_names(sweep_jobs(eager)) == expected


def test_a_perplexity_dataset_gets_no_query_aware_pass():
    result = script("--dry-run", "--dataset", "pg19")
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0 and len(commands) == 5
    assert [c[4] for c in commands[:4]] == ["hydra/sweeper=baseline", "hydra/sweeper=presses", "hydra/sweeper=baseline",
                                            "hydra/sweeper=eager"]
    assert commands[4][2] == "kvbench.leaderboard"
    assert "query_aware: skipped, pg19 is a perplexity dataset" in result.stderr


def test_quick_keeps_every_press_and_ratio_and_marks_its_runs():
    commands = dry_run("--quick")
    assert len(commands) == 5  # PG-19 (the quick default) is a perplexity dataset: no query-aware pass
    assert all("dataset=pg19" in c and all(a in c for a in QUICK_PG19) for c in commands[:4])
    names = run_names(sweep_jobs(commands[1]))
    assert names == {run_name("pg19", "smollm2-135m", p, r, QUICK_VARIANT) for p, r in itertools.product(COMPRESSING, RATIOS)}
    ruler = dry_run("--quick", "--dataset", "ruler", "--ratios", "0.5")
    assert "dataset.num_samples=1" in ruler[1] and "compression_ratio=0.5" in ruler[1]


def test_options_win_over_environment_and_environment_over_defaults():
    env = {"MODEL": "pythia-160m", "DATASET": "needle", "OUTPUT_DIR": "elsewhere", "LAUNCHER": "slurm", "RATIOS": "0.5"}
    first = dry_run(env=env)[1]
    assert {"model=pythia-160m", "dataset=needle", "output_dir=elsewhere", "hydra/launcher=slurm", "compression_ratio=0.5"} <= set(first)
    first = dry_run("--model=smollm2-135m", "--output-dir", "mine", env=env)[1]
    assert {"model=smollm2-135m", "output_dir=mine", "dataset=needle"} <= set(first)


def test_python_is_the_venv_one_next_to_the_script_else_python(tmp_path):
    copy = tmp_path / "leaderboard.sh"
    shutil.copy(SCRIPT, copy)
    assert {c[0] for c in dry_run(script_path=copy)} == {"python"}
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)
    assert {c[0] for c in dry_run(script_path=copy)} == {str(venv_python)}
    assert {c[0] for c in dry_run(script_path=copy, env={"PYTHON": "/opt/py"})} == {"/opt/py"}


@pytest.mark.integration
def test_quick_sweep_builds_the_leaderboard_with_every_press(tmp_path):
    """The real script end to end, reduced to the middle and the most aggressive ratio (34 jobs, one prefill per
    sample and pass; the full --quick sweep is 66 jobs) to keep the suite short. PG-19 gets no query-aware pass."""
    out = tmp_path / "results"
    result = script("--quick", "--ratios", "0.5,0.875", "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    board = out / "leaderboard"
    table = pd.read_csv(board / "leaderboard.csv")
    ran = sorted((r.press, float(r.compression_ratio)) for r in table.itertuples())
    ratios = (0.5, 0.875)
    # no_press twice: the sdpa baseline and the eager pass' own
    expected = sorted([("no_press", 0.0)] * 2 + [(p, r) for p in COMPRESSING + NEEDS_EAGER for r in ratios])
    assert ran == expected
    assert set(table["dataset"]) == {"pg19"} and set(table["model"]) == {"smollm2-135m"}
    # Every run directory holds the quick variant, and the presses were compared with the baseline.
    assert all(name.startswith("pg19__smollm2-135m__") and "__context_length=128__" in name for name in table["run_name"])
    plain_presses = (table["press"] != "no_press") & ~table["query_aware"].astype(bool)
    assert table.loc[plain_presses, "perplexity_delta"].notna().all()
    markdown = (board / "leaderboard.md").read_text()
    html = (board / "index.html").read_text()
    for press in PRESSES:
        assert press in markdown and press in html
    assert "query-aware" not in markdown
    assert list(board.glob("*.png"))


def job_config(job: list[str]):
    """The config one job of a sweep runs with."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=job)


def test_full_ruler_is_leaderboard_grade_and_quick_stays_small():
    from kvbench.datasets import ruler
    from kvbench.leaderboard.table import SMOKE_SAMPLES

    commands = dry_run("--dataset", "ruler")
    for command in commands[:3]:
        assert "dataset.context_length=4096" in command and "dataset.num_samples=100" in command
        for job in sweep_jobs(command):
            cfg = job_config(job).dataset
            assert cfg.context_length == 4096 and cfg.num_samples >= 100 > SMOKE_SAMPLES  # per task
    assert len(ruler.select_tasks(job_config(sweep_jobs(commands[0])[0]).dataset.tasks)) == len(ruler.TASKS)
    # The data settings name the runs, so a leaderboard run is never mistaken for `make run`'s smoke run.
    assert run_names(sweep_jobs(commands[0])) == {"ruler__smollm2-135m__no_press__0.00__context_length=4096__num_samples=100"}
    quick = dry_run("--quick", "--dataset", "ruler")
    assert not any(a in c for c in quick for a in ("dataset.context_length=4096", "dataset.num_samples=100"))


def test_an_override_after_the_dashes_replaces_the_leaderboard_setting():
    for command in dry_run("--dataset", "ruler", "--", "dataset.num_samples=500")[:3]:
        assert [a for a in command if a.startswith("dataset.num_samples=")] == ["dataset.num_samples=500"]
        assert "dataset.context_length=4096" in command
    assert not any("num_samples" in a for a in dry_run("--dataset", "pg19")[0])


def test_full_pg19_scores_16k_tokens_and_full_needle_is_a_5x5_grid_or_more():
    from kvbench.datasets import austen

    baseline = dry_run("--dataset", "pg19")[0]
    (job,) = sweep_jobs(baseline)
    cfg = job_config(job).dataset
    assert cfg.source == "austen"
    assert len(austen.BOOK_IDS) * cfg.max_windows_per_book * cfg.eval_length >= 16_384  # every novel holds 22 windows
    (job,) = sweep_jobs(dry_run("--dataset", "needle")[0])
    cfg = job_config(job).dataset
    assert len(cfg.context_lengths) >= 5 and len(cfg.depths) >= 5
