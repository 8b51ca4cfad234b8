"""The SnapKV design-space study: pythia-70m config, the sweep presets' job sets, the analysis script."""

from __future__ import annotations

import importlib.util
import itertools
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import kvbench
from kvbench.generation import continuation_nll, prefill
from kvbench.results import run_name, variant_from_overrides
from kvbench.runner import press_params
from tests.conftest_results import write_run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIR = ROOT / "analysis"
BUDGETS = (256, 512, 1024, 2048)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sweep_jobs(overrides: list[str], sweeps: tuple[str, ...] = ()) -> list[list[str]]:
    """The per-job task overrides Hydra's basic sweeper makes (preset params, then the command line's; ``sweeps``
    are command-line sweep overrides, which compose() itself refuses)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = parser.parse_overrides(params + list(cfg.hydra.overrides.task) + list(sweeps))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_config(job: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=job)


# -- the model config -------------------------------------------------------------------------------------------

def test_pythia_70m_config_names_the_hub_model():
    model = compose_cfg(["model=pythia-70m"]).model
    assert (model.name, model.name_or_path, model.attn_implementation) == ("pythia-70m", "EleutherAI/pythia-70m", "sdpa")


@pytest.mark.parametrize("clustering", ["topk", "kmeans"])
def test_snapkv_compresses_a_tiny_random_model_with_pythia_70m_attention(clustering):
    """Pythia-70M's attention geometry (GPT-NeoX, 8 heads of 64, rotary on a quarter of each head), 2 layers."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=256, hidden_size=512, num_attention_heads=8, num_hidden_layers=2, intermediate_size=256,
                           rotary_pct=0.25, partial_rotary_factor=0.25, max_position_embeddings=2048, eos_token_id=2, bos_token_id=1)
    model = GPTNeoXForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(0))
    press = kvbench.build_press("snapkv", budget=64, window_size=32, kernel_size=7, pooling="max", clustering=clustering)
    cache, _, stats, _ = prefill(model, ids, press)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [64, 64]
    assert stats.kept_pairs == 2 * 8 * 64
    nll, n, _ = continuation_nll(model, ids[:, :128], ids[:, 128:], press)
    assert n == 32 and math.isfinite(nll)


# -- the sweep presets ------------------------------------------------------------------------------------------

def test_snapkv_grid_is_48_snapkv_jobs_over_window_kernel_pooling_budget():
    jobs = sweep_jobs(["hydra/sweeper=snapkv_grid"])
    settings = set()
    for job in jobs:
        values = dict(o.split("=", 1) for o in job)
        assert values["press"] == "snapkv" and values["dataset"] == "pg19"
        settings.add((int(values["budget"]), int(values["press.window_size"]), int(values["press.kernel_size"]), values["press.pooling"]))
    assert len(jobs) == 48
    assert settings == set(itertools.product(BUDGETS, (32, 64), (5, 7, 13), ("avg", "max")))
    cfg = job_config(jobs[-1])
    assert cfg.budget == 2048 and cfg.dataset.context_length + cfg.dataset.eval_length <= 2048  # fits pythia-70m
    kvbench.build_press(cfg.press.name, **press_params(cfg))  # every key is a snapkv parameter


def test_baselines_are_no_press_and_knorm_at_the_same_budgets_and_data():
    grid = [job_config(j) for j in sweep_jobs(["hydra/sweeper=snapkv_grid"])]
    jobs = sweep_jobs(["hydra/sweeper=snapkv_grid_baselines"])
    pairs = set()
    for job in jobs:
        cfg = job_config(job)
        pairs.add((cfg.press.name, cfg.budget))
        assert cfg.dataset == grid[0].dataset
        kvbench.build_press(cfg.press.name, **press_params(cfg))  # no snapkv-only parameter reaches knorm
    assert len(jobs) == 8 and pairs == set(itertools.product(("no_press", "knorm"), BUDGETS))
    assert {c.budget for c in grid} == {b for _, b in pairs}


def test_grid_runs_get_distinct_result_directories_and_the_command_line_wins():
    jobs = sweep_jobs(["hydra/sweeper=snapkv_grid", "dataset.context_length=512", "model=pythia-70m"], ("budget=64,128",))
    assert len(jobs) == 24
    names = {run_name("pg19", "pythia-70m", "snapkv", 0.5, variant_from_overrides(j)) for j in jobs}
    assert len(names) == 24
    assert all("context_length=512" in n and "budget=" in n for n in names)


# -- the analysis script ----------------------------------------------------------------------------------------

def script():
    """The analysis script as a module (analysis/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("snapkv_design_space", SCRIPT_DIR / "snapkv_design_space.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_study(root: Path, budgets=(64, 128, 256), windows=(32, 64), kernels=(5, 7), poolings=("avg", "max")) -> int:
    """Synthetic runs shaped like the presets write them; perplexity falls with the budget. Returns the run count."""
    count = 0

    def run(press: str, budget: int, ppl: float, params: dict, variant: str) -> None:
        nonlocal count
        kept = 1.0 if press == "no_press" else budget / 512
        speed = {"prefill_seconds": 0.5, "compression_seconds": 0.0 if press == "no_press" else 0.05, "ttft_seconds": None,
                 "seconds_per_token": None, "kv_bytes_before": 2**22, "kv_bytes_after": int(2**22 * kept), "kv_kept_fraction": kept}
        predictions = pd.DataFrame({"sample_id": [0, 1], "perplexity": [ppl, ppl], "num_tokens": [17, 17],
                                    "teacher_forced_seconds": [0.016 * kept, 0.016 * kept]})
        run_dir = write_run(root, "pg19", "smollm2-135m", press, 0.0 if press == "no_press" else 0.5, ppl, variant=variant,
                            speed=speed, predictions=predictions, extra={"budget": budget, "kind": "perplexity"})
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["press"] = {"name": press, **params}
        config["budget"] = budget
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        count += 1

    for budget in budgets:
        run("no_press", budget, 10.0, {}, f"budget={budget}")
        run("knorm", budget, 10.0 + 800 / budget, {}, f"budget={budget}")
        for window, kernel, pooling in itertools.product(windows, kernels, poolings):
            params = {"window_size": window, "kernel_size": kernel, "pooling": pooling, "clustering": "topk"}
            variant = f"budget={budget}__press.kernel_size={kernel}__press.pooling={pooling}__press.window_size={window}"
            run("snapkv", budget, 10.0 + 200 / budget + window / 1000 + (pooling == "max") / 10, params, variant)
    return count


def test_analysis_draws_four_figures_and_a_csv_from_result_directories(tmp_path):
    module = script()
    PROXY, main = module.PROXY, module.main

    results, out = tmp_path / "results", tmp_path / "figures"
    total = write_study(results)
    assert main([str(results), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"perplexity_vs_budget.png", "latency_vs_budget.png",
                                                   "kv_memory_vs_budget.png", "compression_share_vs_budget.png"}
    study = pd.read_csv(out / "design_space.csv")
    assert len(study) == total == 3 * (2 + 2 * 2 * 2)
    snap = study[study["press"] == "snapkv"]
    assert set(zip(snap["window_size"], snap["pooling"])) == {(32, "avg"), (32, "max"), (64, "avg"), (64, "max")}
    by_budget = snap[(snap["window_size"] == 32) & (snap["pooling"] == "avg") & (snap["kernel_size"] == 5)]
    assert list(by_budget.sort_values("budget")["perplexity"]) == sorted(by_budget["perplexity"], reverse=True)
    assert (study["latency_source"] == PROXY).all()  # perplexity runs decode nothing: measured stand-ins
    assert snap["ttft_seconds"].eq(0.5).all() and snap["compression_share"].round(4).eq(round(0.05 / 0.45, 4)).all()
    knorm = study[study["press"] == "knorm"].sort_values("budget")
    assert list(knorm["seconds_per_token"].round(6)) == [round(0.001 * b / 512, 6) for b in (64, 128, 256)]


def test_analysis_refuses_to_average_two_studies_and_names_skipped_runs(tmp_path, capsys):
    """A second grid at another context length in the same folder was averaged into the first one's lines (a
    no_press point half-way between two perplexities no run produced), and corrupt runs were left out silently."""
    main = script().main
    results = tmp_path / "results"
    write_study(results, budgets=(64,), windows=(32,), kernels=(5,), poolings=("avg",))
    other = write_run(results, "pg19", "smollm2-135m", "no_press", 0.0, 20.0, variant="budget=64__context_length=2048",
                      extra={"budget": 64, "kind": "perplexity"})
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["budget"], config["dataset"]["context_length"] = 64, 2048
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(results), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the budget runs in") and "several settings (dataset.context_length: " in err
    assert "give each grid its own output_dir" in err and not (tmp_path / "out").exists()

    shutil.rmtree(other)
    torn = next(p for p in results.iterdir() if p.name.startswith("pg19__smollm2-135m__knorm"))
    (torn / "metrics.json").write_text("{")
    assert main([str(results), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 incomplete or corrupt run dir(s):" in err and torn.name in err


def test_analysis_cannot_write_its_folder_in_one_line(tmp_path, capsys):
    main = script().main
    results = tmp_path / "results"
    write_study(results, budgets=(64,), windows=(32,), kernels=(5,), poolings=("avg",))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main([str(results), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write --out {blocked} (") and "\n" not in err


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("empty", "no complete runs in"),
    ("other", "no SnapKV budget runs on dataset 'pg19'"),
])
def test_analysis_refuses_a_folder_without_study_runs_in_one_line(tmp_path, capsys, setup, message):
    main = script().main

    results = tmp_path / "results"
    if setup != "missing":
        results.mkdir()
    if setup == "other":  # a ratio sweep, no budget runs
        write_run(results, "pg19", "smollm2-135m", "snapkv", 0.5, 12.0)
    assert main([str(results), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_the_study_runs_end_to_end_offline_on_the_packaged_model(tmp_path):
    """Both presets (a grid cut to two budgets) on the packaged model with shared prefills, then the analysis: every
    run reaches the CSV, with decode timings measured (decode_timing_tokens from the presets), not stand-ins."""
    import os
    import subprocess
    import sys

    out = tmp_path / "results"
    data = ["dataset=pg19", "dataset.context_length=128", "dataset.eval_length=16", "dataset.num_books=1",
            "dataset.max_windows_per_book=1", "budget=32,64", "hydra/launcher=shared_prefill", f"output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for preset in ("snapkv_grid", "snapkv_grid_baselines"):
        result = subprocess.run([sys.executable, "-m", "kvbench", "-m", f"hydra/sweeper={preset}", *data], cwd=ROOT,
                                capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert script().main([str(out), "--out", str(tmp_path / "figures"), "--model", "smollm2-135m"]) == 0
    study = pd.read_csv(tmp_path / "figures" / "design_space.csv")
    assert len(study) == 2 * 2 * 3 * 2 + 2 * 2  # snapkv: budgets x windows x kernels x poolings; no_press, knorm
    assert (study["latency_source"] == "decode").all() and (study["seconds_per_token"] > 0).all()
    snap = study[study["press"] == "snapkv"]
    assert set(snap["kv_kept_fraction"].round(3)) == {0.25, 0.5}  # 32 and 64 of 128 tokens per head
    assert len(list((tmp_path / "figures").glob("*.png"))) == 4
