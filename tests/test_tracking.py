"""W&B tracking and leaderboard push, always offline and local: every test pins wandb to tmp_path and
points its server URL at a closed local port, so nothing here can reach the network or a real account."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from kvbench import tracking
from kvbench.errors import KVBenchError
from kvbench.leaderboard import build_leaderboard
from kvbench.leaderboard.__main__ import main as leaderboard_main
from kvbench.leaderboard.wandb_report import push_leaderboard
from tests.conftest_results import make_config, make_results_tree, offline_runs, read_offline_run, write_run

MODEL = "smollm2-135m"


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_RUN_GROUP", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(home / "artifacts"))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed port: any online attempt fails fast
    monkeypatch.setattr(tracking, "INIT_TIMEOUT_S", 3)


@pytest.fixture
def finished_run(tmp_path):
    results = tmp_path / "results"
    predictions = pd.DataFrame(
        {
            "context": ["a very long haystack " * 200, "another haystack " * 200],
            "question": ["What is the key?", "What is the value?"],
            "answers": [["1234"], ["x", "y"]],
            "prediction": ["1234", "z"],
            "task": ["niah_single_1", "vt"],
            "prefill_seconds": [0.4, 0.5],
            "correct": pd.array([1, None], dtype="Int64"),  # nullable dtype: pd.NA must not break the table
        }
    )
    run_dir = write_run(results, "ruler", MODEL, "snapkv", 0.5, 74.5,
                        extra={"per_task": {"niah_single_1": 100.0, "vt": 49.0}})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = make_config("ruler", MODEL, "snapkv", 0.5)
    cfg.update(output_dir=str(results), logger={"name": "wandb"})
    cfg["wandb"] = {"project": "kvbench-test", "mode": "offline", "group": "sweep-a", "entity": None}
    return cfg, metrics, predictions, run_dir


def test_flatten_metrics_nests_with_slashes():
    flat = tracking.flatten_metrics({"score": 1.0, "speed": {"ttft_seconds": 0.5}, "per_cell": {"1k": {"0.5": 1}}})
    assert flat == {"score": 1.0, "speed/ttft_seconds": 0.5, "per_cell/1k/0.5": 1}


def test_log_run_offline_writes_summary_config_and_table(finished_run):
    cfg, metrics, predictions, run_dir = finished_run
    tracking.log_run(cfg, metrics, predictions, run_dir)
    wandb_dir = Path(cfg["output_dir"]) / "wandb"
    runs = offline_runs(wandb_dir)
    assert len(runs) == 1, "log_run must write exactly one offline run under <output_dir>/wandb"
    info = read_offline_run(runs[0])
    summary = info["summary"]
    assert summary["score"] == pytest.approx(74.5)
    assert summary["per_task/niah_single_1"] == pytest.approx(100.0)
    assert summary["speed/prefill_seconds"] == pytest.approx(0.40)
    assert summary["speed/kv_bytes_after"] == pytest.approx(4 * 1024 * 1024)
    assert summary["press"] == "snapkv"
    assert summary["predictions"]["nrows"] == 2
    assert info["config"]["press"]["name"] == "snapkv"
    assert info["config"]["compression_ratio"] == 0.5
    assert info["group"] == "sweep-a"
    assert info["name"] == run_dir.name
    assert {"ruler", MODEL, "snapkv"} <= set(info["tags"])
    table = json.loads((runs[0] / "files" / summary["predictions"]["path"]).read_text())
    assert "context" not in table["columns"]
    assert {"question", "answers", "prediction"} <= set(table["columns"])
    assert ["1234"] != table["data"][0][table["columns"].index("answers")]  # lists become JSON text
    assert table["data"][0][table["columns"].index("answers")] == '["1234"]'
    assert [row[table["columns"].index("correct")] for row in table["data"]] == [1, None]


def test_explicit_dir_wins_and_disabled_writes_nothing(finished_run, tmp_path):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"] = dict(cfg["wandb"], mode="disabled", dir=str(tmp_path / "elsewhere"))
    tracking.log_run(cfg, metrics, predictions, run_dir)
    assert not (tmp_path / "elsewhere").exists() and not (Path(cfg["output_dir"]) / "wandb").exists()
    assert tracking.wandb_dir(cfg, run_dir) == tmp_path / "elsewhere"
    cfg["wandb"]["mode"] = "sometimes"
    with pytest.raises(KVBenchError, match="wandb.mode"):
        tracking.log_run(cfg, metrics, predictions, run_dir)


def test_online_without_api_key_warns_and_logs_offline(finished_run, caplog):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"]["mode"] = "online"
    assert not tracking.has_credentials()
    with caplog.at_level(logging.WARNING, logger="kvbench.tracking"):
        tracking.log_run(cfg, metrics, predictions, run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no API key" in warnings[0]
    runs = offline_runs(Path(cfg["output_dir"]) / "wandb")
    assert len(runs) == 1 and read_offline_run(runs[0])["summary"]["score"] == pytest.approx(74.5)


def test_online_with_key_but_no_network_falls_back(finished_run, monkeypatch, caplog):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"]["mode"] = "online"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with caplog.at_level(logging.WARNING, logger="kvbench.tracking"):
        tracking.log_run(cfg, metrics, predictions, run_dir)
    assert any("online init failed" in r.getMessage() for r in caplog.records)
    runs = offline_runs(Path(cfg["output_dir"]) / "wandb")
    assert len(runs) == 1 and read_offline_run(runs[0])["summary"]["score"] == pytest.approx(74.5)


def test_group_defaults_to_none_outside_a_sweep(finished_run, monkeypatch):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"]["group"] = None
    seen = {}

    def fake_start_run(**kwargs):
        seen.update(kwargs)
        return None

    monkeypatch.setattr(tracking, "start_run", fake_start_run)
    monkeypatch.setattr(tracking, "sweep_group", lambda: "2026-01-01_12-00-00")
    tracking.log_run(cfg, metrics, predictions, run_dir)
    assert seen["group"] == "2026-01-01_12-00-00"
    assert seen["directory"] == Path(cfg["output_dir"]) / "wandb"
    assert seen["config"]["press"]["window_size"] == 64
    monkeypatch.undo()
    assert tracking.sweep_group() is None


def test_the_summarys_best_is_a_full_run_when_one_exists(tmp_path):
    """A smoke run (here every run of the tree has 5 samples) is the best only of smoke runs."""
    results = tmp_path / "results"
    results.mkdir()
    make_results_tree(results)
    write_run(results, "ruler", "smollm2-135m", "knorm", 0.75, 40.0, extra={"num_samples": 1300, "num_samples_per_task": 100})
    # A full run of another setting (a short context answers another question) is not a candidate either.
    write_run(results, "ruler", "smollm2-135m", "tova", 0.75, 99.0, variant="context_length=256",
              extra={"num_samples": 1300, "num_samples_per_task": 100})
    board = build_leaderboard(results)
    push_leaderboard(board.table, board.plots, project="kvbench-test", mode="offline", directory=tmp_path / "wb")
    summary = read_offline_run(offline_runs(tmp_path / "wb")[0])["summary"]
    assert summary["best/ruler/smollm2-135m/score"] == pytest.approx(40.0)  # not the smoke run's 81.0
    assert summary["best/ruler/smollm2-135m/label"] == "knorm @ 0.75"
    assert summary["best/pg19/smollm2-135m/score"] == pytest.approx(13.75)


def test_push_leaderboard_offline(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    make_results_tree(results)
    board = build_leaderboard(results)
    out = push_leaderboard(board.table, board.plots, project="kvbench-test", mode="offline",
                           directory=tmp_path / "wb", html_path=board.html)
    assert out is not None
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 1
    summary = read_offline_run(runs[0])["summary"]
    assert summary["num_runs"] == len(board.table)
    assert summary["best/ruler/smollm2-135m/score"] == pytest.approx(81.0)
    assert summary["best/ruler/smollm2-135m/label"] == "snapkv @ 0.25"
    assert summary["best/pg19/smollm2-135m/score"] == pytest.approx(13.75)  # lower is better
    assert summary["leaderboard"]["nrows"] == len(board.table)
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(board.plots)


def test_cli_wandb_flag_without_key_still_writes_everything(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    write_run(results, "ruler", MODEL, "snapkv", 0.5, 70.0)
    write_run(results, "ruler", MODEL, "no_press", 0.0, 90.0)
    assert leaderboard_main([str(results), "--wandb"]) == 0
    assert (results / "leaderboard" / "index.html").is_file()
    runs = offline_runs(results / "wandb")
    assert len(runs) == 1
    assert read_offline_run(runs[0])["summary"]["num_runs"] == 2
    assert "wandb:" in capsys.readouterr().out


# ---- the logger config group -------------------------------------------------------------------------------


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(tracking.__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_logger_is_a_config_group_and_both_spellings_work():
    conf_dir = Path(tracking.__file__).resolve().parent.parent / "conf" / "logger"
    assert sorted(p.stem for p in conf_dir.glob("*.yaml")) == sorted(tracking.LOGGERS)
    assert tracking.check_logger(_compose()) == "none"
    assert tracking.check_logger(_compose("logger=wandb")) == "wandb"
    assert tracking.check_logger(_compose("logger.name=wandb")) == "wandb"
    assert tracking.check_logger({"logger": "wandb"}) == "wandb"  # a hand-written config with a bare string
    assert _compose("logger=wandb").wandb.mode == "auto"


@pytest.mark.parametrize("cfg,message", [
    ({"logger": {"name": "tensorboard"}}, "unknown logger 'tensorboard'; valid names: none, wandb"),
    ({"logger": "mlflow"}, "unknown logger 'mlflow'; valid names: none, wandb"),
    ({"logger": {"name": "wandb"}, "wandb": {"mode": "sometimes"}}, "wandb.mode must be one of auto, online, offline, disabled"),
])
def test_a_bad_logger_is_one_line(cfg, message):
    with pytest.raises(KVBenchError) as error:
        tracking.check_logger(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_runner_checks_the_logger_before_loading_anything(tmp_path, monkeypatch):
    from kvbench import runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model or the data was loaded before the logger was checked")

    monkeypatch.setattr(runner, "load_model", must_not_run)
    monkeypatch.setattr(runner, "load_dataset", must_not_run)
    cfg = _compose("logger.name=tensorboard", f"output_dir={tmp_path / 'out'}", "dataset.context_length=512")
    with pytest.raises(KVBenchError, match="unknown logger 'tensorboard'"):
        runner.execute(cfg)
    assert not (tmp_path / "out").exists()


def test_auto_mode_is_offline_without_a_key_and_online_with_one(finished_run, monkeypatch, caplog):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"]["mode"] = "auto"
    # wandb keeps a key seen by an earlier test in process-wide state: pin "no key" here
    monkeypatch.setattr(tracking, "has_credentials", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kvbench.tracking"):
        tracking.log_run(cfg, metrics, predictions, run_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # offline is the expected default
    assert len(offline_runs(Path(cfg["output_dir"]) / "wandb")) == 1
    import wandb

    modes = []
    monkeypatch.setattr(tracking, "has_credentials", lambda: True)
    monkeypatch.setattr(wandb, "init", lambda mode, **kwargs: modes.append(mode))
    assert tracking.start_run(project="p", mode="auto") is None and modes == ["online"]


def test_the_wandb_config_carries_the_runs_identity(finished_run):
    """dtype and device are ``auto`` in the config; what they resolved to (and the versions) is in the identity."""
    cfg, metrics, predictions, run_dir = finished_run
    identity = {"config": {"press": {"name": "snapkv"}}, "dtype": "float32", "device_type": "cpu", "torch": "2.13.0"}
    (run_dir / "identity.json").write_text(json.dumps(identity))
    tracking.log_run(cfg, metrics, predictions, run_dir)
    (run,) = offline_runs(Path(cfg["output_dir"]) / "wandb")
    assert read_offline_run(run)["config"]["identity"] == identity
    assert run.name.endswith(tracking.run_id(run_dir, identity))


def test_a_wandb_setup_error_costs_one_warning_not_the_run(finished_run, tmp_path, caplog):
    cfg, metrics, predictions, run_dir = finished_run
    (tmp_path / "a-file").write_text("")
    cfg["wandb"]["dir"] = str(tmp_path / "a-file" / "sub")  # cannot be created
    with caplog.at_level(logging.WARNING, logger="kvbench.tracking"):
        tracking.log_run(cfg, metrics, predictions, run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a-file" in warnings[0], warnings


def test_auto_mode_follows_an_exported_wandb_mode_and_project(finished_run, monkeypatch):
    cfg, metrics, predictions, run_dir = finished_run
    cfg["wandb"].update(mode="auto", project=None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracking.log_run(cfg, metrics, predictions, run_dir)
    assert not (Path(cfg["output_dir"]) / "wandb").exists()
    seen = {}
    monkeypatch.setattr(tracking, "start_run", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(tracking, "has_credentials", lambda: True)  # a key must not turn an exported offline online
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    tracking.log_run(cfg, metrics, predictions, run_dir)
    assert seen["mode"] == "offline" and seen["project"] == "from-env"
    cfg["wandb"].update(mode="online", project="explicit")  # an explicit setting wins over the environment
    tracking.log_run(cfg, metrics, predictions, run_dir)
    assert seen["mode"] == "online" and seen["project"] == "explicit"
    cfg["wandb"]["mode"] = "auto"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(KVBenchError, match="WANDB_MODE=sometimes is not a W&B mode"):
        tracking.check_logger(cfg)


def test_leaderboard_wandb_without_the_package_is_one_error_line(tmp_path, monkeypatch, capsys):
    import sys

    results = tmp_path / "results"
    make_results_tree(results)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert leaderboard_main([str(results), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb needs the wandb package") and err.count("\n") == 1
    assert not (results / "leaderboard").exists()


def test_push_leaderboard_disabled_writes_and_reports_nothing(tmp_path):
    results = tmp_path / "results"
    make_results_tree(results)
    board = build_leaderboard(results, push_wandb=True, wandb_mode="disabled")
    assert board.wandb_dir is None and "wandb:" not in board.summary()


@pytest.mark.integration
def test_a_comparison_filled_in_later_reaches_the_runs_wandb_summary(tmp_path):
    """knorm finishes before its no_press baseline: the comparison the baseline writes into knorm's metrics.json
    is added to knorm's own W&B run (same id), and the no_press run's W&B config says ratio 0, as its config.yaml."""
    import subprocess
    import sys

    import yaml

    books = tmp_path / "books"
    books.mkdir()
    (books / "mill.txt").write_text("The river ran past the mill and the miller counted his sacks. " * 120)
    out = tmp_path / "results"
    common = ["dataset=pg19", "dataset.source=local", f"dataset.path={books}", "dataset.context_length=96",
              "dataset.eval_length=16", "dataset.max_windows_per_book=2", f"output_dir={out}", "logger=wandb",
              "wandb.mode=offline"]
    root = Path(__file__).resolve().parents[1]
    for args in (["press=knorm", "compression_ratio=0.5"], ["-m", "press=no_press", "compression_ratio=0.5"]):
        done = subprocess.run([sys.executable, "-m", "kvbench", *args, *common], cwd=root, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    (knorm_dir,) = out.glob("*__knorm__*")
    (baseline_dir,) = out.glob("*__no_press__*")
    metrics = json.loads((knorm_dir / "metrics.json").read_text())
    knorm_id = tracking.run_id(knorm_dir, json.loads((knorm_dir / "identity.json").read_text()))
    runs = offline_runs(out / "wandb")
    knorm_runs = [read_offline_run(run) for run in runs if run.name.endswith(knorm_id)]
    assert len(runs) == 3 and len(knorm_runs) == 2
    assert "no_press_perplexity" not in knorm_runs[0]["summary"]
    for key in ("no_press_perplexity", "delta", "ratio"):
        assert knorm_runs[1]["summary"][key] == metrics[key]
    (baseline_run,) = [read_offline_run(run) for run in runs if not run.name.endswith(knorm_id)]
    assert yaml.safe_load((baseline_dir / "config.yaml").read_text())["compression_ratio"] == 0.0
    assert baseline_run["config"]["compression_ratio"] == 0.0
