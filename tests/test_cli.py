"""`python -m kvbench` end to end on the packaged model: bad input, skip, kill and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvbench.device import device_model
from kvbench.errors import KVBenchError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SENTENCES = "The river ran past the mill and the miller counted his sacks of flour before the winter came. "


def kvbench(*args, env=None, timeout=300, **kw):
    merged = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvbench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in merged.items() if v is not None}, **kw)


@pytest.fixture()
def books(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "mill.txt").write_text(SENTENCES * 120)
    return folder


def pg19_args(books, out, *extra):
    return ["dataset=pg19", "dataset.source=local", f"dataset.path={books}", "dataset.context_length=96",
            "dataset.eval_length=16", "dataset.max_windows_per_book=8", f"output_dir={out}", *extra]


def complete_dirs(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if not p.name.startswith(".") and (p / "metrics.json").exists()] if out.exists() else []


def compose_pg19(books, out: Path, *extra: str):
    """The config of a small PG-19 run (two windows per book), composed as the command line would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=pg19_args(books, out, "dataset.max_windows_per_book=2", *extra))


@pytest.mark.parametrize(
    "args,expected",
    [
        (["press=nonexistent"], "unknown press 'nonexistent'; valid names: adakv_compactor"),
        (["model=nonexistent"], "unknown model 'nonexistent'"),
        (["dataset=nonexistent"], "unknown dataset 'nonexistent'"),
        (["compression_ratio=1.5"], "compression_ratio must be a number in [0, 1)"),
        (["compression_ratio=-0.1"], "compression_ratio must be a number in [0, 1)"),
        (["model.name_or_path=/does/not/exist"], "model directory '/does/not/exist' does not exist"),
        (["model.name_or_path=kvbench-test-org/no-such-model"], "could not load 'kvbench-test-org/no-such-model' from the "
         "Hugging Face hub (OSError): HF_HUB_OFFLINE is set and the model is not in the local hub cache"),
        (["budget=32", "compression_ratio=0.25"], "budget=32 keeps 32 tokens per head whatever compression_ratio says; "
                                                   "drop compression_ratio=0.25 (or budget)"),
        (["device=foo"], "unknown device 'foo'; use auto, cpu, cuda or cuda:<index>"),
        (["model.name="], "model.name must name the model in result directories"),
        # a setting no config file declares (a typo added with +) would run on the defaults under its own name
        (["+dataset.eval_len=8"], "dataset 'pg19' has no setting eval_len; known: context_length, eval_length,"),
        (["+sed=1"], "kvbench has no setting sed; known: batch_size, budget,"),
        (["+model.dtyp=float32"], "model has no setting dtyp; known: attn_implementation, dtype,"),
        (["dataset=pg19", "dataset.source=hub", "dataset.hub_id=/no/such/books"],
         "'/no/such/books' is neither an existing directory nor a hub id (name or namespace/name)"),
        (["model.revision=main"], "model.revision=main names a hub commit, but the model is read from"),
        (["+press.window_size=8", "press=knorm"], "press 'knorm' has no parameter window_size"),
        # without "+": Hydra's six lines, whose advice (add "+") failed in turn; a sweep stopped at its first knorm job
        (["press=knorm", "press.window_size=8"], "press 'knorm' has no parameter window_size; it has no parameters "
                                                  "(see conf/press/knorm.yaml)"),
        (["-m", "press=snapkv,knorm", "press.window_size=8"], "press 'knorm' has no parameter window_size"),
        (["-m", "hydra/sweeper=presses", "press.window_size=8"], "press adakv_compactor, compactor, "
         "critical_adakv_expected_attention, critical_expected_attention, expected_attention, keydiff, knorm, random, "
         "streaming_llm, tova have no parameter window_size (see conf/press/); sweep those that have it: "
         "press=adakv_snapkv,critical_adakv_snapkv,critical_snapkv,pyramidkv,snapkv"),
        (["dataset.eval_len=8"], "dataset 'pg19' has no setting eval_len; valid: context_length, eval_length,"),
        (["model.dtyp=float32"], "model 'smollm2-135m' has no setting dtyp; valid: attn_implementation, dtype,"),
        (["logger=nonexistent"], "unknown logger 'nonexistent'; valid names: none, wandb"),
        (["logger.name=nonexistent"], "unknown logger 'nonexistent'; valid names: none, wandb"),
        (["query_aware=true"], "query_aware=true does not apply to dataset 'pg19': a perplexity dataset has no question"),
        (["decode_timing_tokens=1"], "decode_timing_tokens must be 0 (off) or an integer >= 2"),
        (["budget=1.5"], "budget must be an integer or null, got 1.5"),
        (["budget=abc"], "budget must be an integer or null, got 'abc'"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["query_aware=maybe"], "query_aware must be true or false, got 'maybe'"),
        (["overwrite=no"], "overwrite must be true or false, got 'no'"),  # a non-empty string: it replaced finished results
        # a top-level typo without "+": Hydra's six lines, whose advice (add "+") failed in turn
        (["compresion_ratio=0.5"], "kvbench has no setting compresion_ratio; known: batch_size, budget,"),
        (["-m", "prss=snapkv,knorm"], "kvbench has no setting prss; known: batch_size, budget,"),
        (["model.dtype=int8"], "unknown dtype 'int8'; use auto, float32, bfloat16 or float16"),
        (["press=snapkv", "press.window_size=0"], "press parameter window_size must be an integer >= 1, got 0"),
        (["press=critical_snapkv", "press.first_stage_ratio=1.5"], "press parameter first_stage_ratio must be a number in [0, 1], got 1.5"),
        (["max_context_length=112", "decode_timing_tokens=32"],  # the window (96 + 16) fits, the decoding does not
         "decode_timing_tokens=32 after a 96-token context passes max_context_length=112"),
        # dataset values are the dataset's own check, made before the model (here: one that does not exist) is read
        (["dataset.eval_length=0", "model.name_or_path=/does/not/exist"], "dataset.eval_length must be a positive integer, got 0"),
        (["dataset.path=/does/not/exist", "model.name_or_path=/does/not/exist"], "dataset.path=/does/not/exist is not a directory"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, books, args, expected):
    out = tmp_path / "results"
    result = kvbench(*pg19_args(books, out), *args, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert complete_dirs(out) == []


@pytest.mark.parametrize("args,expected", [
    (["dataset.num_samples=0"], "dataset.num_samples must be a positive integer, got 0"),
    (["dataset.context_length=abc"], "dataset.context_length must be a positive integer, got 'abc'"),
    (["dataset.tasks=[nope]"], "unknown RULER task(s) nope; valid names: niah_single_1"),
    (["dataset.source=foo"], "unknown dataset.source 'foo'; use generated or hub"),
    (["dataset.reserve_generation=maybe"], "dataset.reserve_generation must be true or false, got 'maybe'"),
    (["dataset.seed=abc"], "dataset.seed must be an integer, got 'abc'"),
    (["dataset=longbench_e", "dataset.path=/does/not/exist"], "dataset.path=/does/not/exist is not a directory"),
    (["model.attn_implementation=foo"], "unknown attention implementation 'foo'; use one of eager, sdpa"),
])
def test_the_default_datasets_settings_are_refused_before_the_model_is_read(tmp_path, args, expected):
    """Checked after the model had loaded (minutes for an 8B hub model), each left a lock file; the model here does not
    exist, so an error naming the setting shows that it came first."""
    out = tmp_path / "results"
    result = kvbench(f"output_dir={out}", "model.name_or_path=/does/not/exist", *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert not (out / ".locks").exists() and complete_dirs(out) == []


def _wrapped(inner: Exception) -> OSError:
    """``inner`` as transformers raises it: inside an OSError of its own."""
    try:
        try:
            raise inner
        except Exception as exc:
            raise OSError("We couldn't connect to the hub or find the file") from exc
    except OSError as outer:
        return outer


def test_a_failed_hub_load_says_why(monkeypatch):
    """Gated, missing, a wrong revision and offline-without-cache used to read alike ("check the id and your
    network"); the reason is taken from the hub's error inside transformers' OSError."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from kvbench.models import _hub_error

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cases = {
        GatedRepoError("gated", response=response): "the repository is gated: accept its license on the hub",
        RepositoryNotFoundError("404", response=response): "no such repository, or a private one",
        RevisionNotFoundError("404", response=response): "the repository has no such revision: check model.revision",
        ConnectionError("no route"): "check the id and your network or HF_TOKEN",
    }
    for inner, reason in cases.items():
        message = str(_hub_error("org/model", _wrapped(inner)))
        assert message.startswith("could not load 'org/model' from the Hugging Face hub (OSError): " + reason), message
        assert message.endswith(", or use the offline default model=smollm2-135m") and "\n" not in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set and the model is not in the local hub cache" in str(_hub_error("org/model", _wrapped(OSError())))


@pytest.mark.parametrize("name", ["a/b/c", "Qwen/Qwen3 8B", "bad..name"])
def test_a_malformed_hub_id_is_a_clear_error_where_the_identity_asks_for_its_commit(name):
    """LongBench asks for the model's commit before anything checks the name (the length check only runs for
    datasets whose length is under test); huggingface_hub's validation error was a traceback."""
    from kvbench.models import model_inputs

    with pytest.raises(KVBenchError, match=f"'{re.escape(name)}' is neither an existing directory nor a hub id"):
        model_inputs(name)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["dataset=ruler", "dataset.context_length=9000"],
         "dataset.context_length=9000 is above max_context_length=8192 (the model's max_position_embeddings)"),
        (["dataset=needle", "dataset.context_lengths=[512,9000]"], "dataset.context_lengths + dataset.max_new_tokens=9032 is above max_context_length=8192"),
        (["dataset=ruler", "dataset.context_length=1024", "max_context_length=512"], "dataset.context_length=1024 is above max_context_length=512"),
        # The lengths pass, the prompts do not: the chat template and question come on top of the needle's haystack,
        # the answer's room on top of a RULER prompt that reserves none. Refused before anything is decoded.
        (["dataset=needle", "dataset.context_lengths=[256]", "dataset.depths=[50]", "max_context_length=300"],
         "sample needle/256/50 takes 345 tokens with its chat template, question and max_new_tokens, above "
         "max_context_length=300; cutting it would test another length: lower dataset.context_lengths or raise max_context_length"),
        (["dataset=ruler", "dataset.context_length=1024", "dataset.reserve_generation=false", "dataset.tasks=[vt]",
          "dataset.num_samples=1", "max_context_length=1024"], "sample vt-0000 takes 10"),
    ],
)
def test_an_over_long_length_under_test_is_refused_in_one_line_and_nothing_is_written(tmp_path, args, expected):
    out = tmp_path / "results"
    result = kvbench(*args, f"output_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # Only Hydra's own log folder (and the empty lock of a run that loaded the model): no result directory, no
    # .partial checkpoint, no staging directory.
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".hydra", ".locks"}
    assert not out.exists() or all(p.stat().st_size == 0 for p in (out / ".locks").glob("*"))


@pytest.mark.parametrize("grid, expected", [
    ("dataset.context_lengths='256'", "dataset.context_lengths must be a list of numbers, e.g. dataset.context_lengths=[1024,2048]; got '256'"),
    ("dataset.depths=[50,abc]", "dataset.depths must hold numbers, e.g. dataset.depths=[0,50,100]; ['abc'] are not"),
    ("dataset.answers=[]", "dataset.answers must list non-empty key phrases copied from dataset.needle"),
])
def test_a_malformed_needle_grid_is_refused_before_the_model_is_read(tmp_path, grid, expected):
    out = tmp_path / "results"
    result = kvbench("dataset=needle", grid, "model.name_or_path=/does/not/exist", f"output_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and complete_dirs(out) == []


def test_one_scored_token_per_window_works(tmp_path, books):
    out = tmp_path / "results"
    result = kvbench(*pg19_args(books, out, "dataset.eval_length=1", "dataset.max_windows_per_book=3", "press=knorm"))
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = complete_dirs(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_windows"] == 3 and metrics["num_tokens"] == 3 and metrics["score"] > 1.0
    assert metrics["num_samples_per_task"] == 3 and metrics["truncated_samples"] == 0 and metrics["max_context_length"] == 8192


def test_decode_timing_records_latency_and_leaves_the_perplexity_alone(tmp_path, books):
    runs = {}
    for tokens in (0, 4):
        out = tmp_path / f"results-{tokens}"
        result = kvbench(*pg19_args(books, out, "dataset.max_windows_per_book=2", "press=snapkv", f"decode_timing_tokens={tokens}"))
        assert result.returncode == 0, result.stderr[-2000:]
        (run_dir,) = complete_dirs(out)
        runs[tokens] = json.loads((run_dir / "metrics.json").read_text())
    assert runs[4]["score"] == pytest.approx(runs[0]["score"], rel=1e-6)
    assert runs[0]["speed"].get("seconds_per_token") is None and runs[0]["speed"].get("ttft_seconds") is None
    assert runs[4]["speed"]["seconds_per_token"] > 0
    assert runs[4]["speed"]["ttft_seconds"] == pytest.approx(runs[4]["speed"]["prefill_seconds"])


def test_decode_timing_is_refused_for_a_generation_dataset(tmp_path):
    result = kvbench("dataset=ruler", "decode_timing_tokens=8", f"output_dir={tmp_path / 'results'}", env={"HF_HUB_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1
    assert "decode_timing_tokens applies to perplexity datasets; dataset 'ruler' times its own decoding" in errors[0]


def kill_after_two_windows(args: list[str], out: Path, sig: int = signal.SIGKILL, seen: list | None = None) -> int:
    """Start ``python -m kvbench *args``, send ``sig`` once its checkpoint holds two windows; the rows it holds
    (``seen`` gets the exit status and the output)."""
    # A test run started in the background by a shell without job control inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child gets Ctrl-C's default, as from a terminal.
    process = subprocess.Popen([sys.executable, "-m", "kvbench", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    rows = None
    while time.time() < deadline and process.poll() is None:
        found = list((out / ".partial").glob("*/rows.jsonl")) if (out / ".partial").exists() else []
        if found and len(found[0].read_text().splitlines()) >= 2:
            rows = found[0]
            break
        time.sleep(0.05)
    assert rows is not None, "the run never checkpointed a window"
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    if seen is not None:
        seen.extend([process.returncode, output])
    return len(rows.read_text().splitlines())


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, books):
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "compression_ratio=0.5")
    seen: list = []
    done_before = kill_after_two_windows(args, out, signal.SIGINT, seen)
    status, output = seen
    assert status == 130 and "Traceback" not in output, output[-2000:]
    assert f"interrupted: the samples finished so far are kept under {out}/.partial; rerun the same command" in output
    assert complete_dirs(out) == []
    resumed = kvbench(*args)
    assert resumed.returncode == 0 and f"resuming after {done_before} finished samples" in resumed.stdout


def test_ctrl_c_under_the_shared_prefill_launcher_is_the_same_line(tmp_path, books):
    """The launcher runs its jobs without the entry point, whose handler printed this line: it was 37 frames."""
    out = tmp_path / "results"
    args = ["-m", "hydra/launcher=shared_prefill", *pg19_args(books, out, "press=knorm", "compression_ratio=0.5")]
    seen: list = []
    kill_after_two_windows(args, out, signal.SIGINT, seen)
    status, output = seen
    assert status == 130 and "Traceback" not in output, output[-2000:]
    assert f"interrupted: the samples finished so far are kept under {out}/.partial; rerun the same command" in output
    assert complete_dirs(out) == []


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has SLURM")
def test_the_slurm_launcher_without_slurm_is_one_line(tmp_path, books):
    result = kvbench("-m", "hydra/launcher=slurm", *pg19_args(books, tmp_path / "results"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: hydra/launcher=slurm submits through SLURM, and this machine has no srun")


def test_a_gpu_launcher_config_resolves_on_its_own(tmp_path):
    """``--cfg hydra --resolve`` read ${kvbench.gpu_count:...} before anything had registered it: a traceback."""
    result = kvbench("hydra/launcher=shared_prefill_gpus", "--cfg", "hydra", "-p", "hydra.launcher.n_jobs", "--resolve",
                     env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, books):
    (tmp_path / "a-file").write_text("")
    result = kvbench(*pg19_args(books, tmp_path / "a-file" / "results"), env={"HF_HUB_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"output_dir={tmp_path / 'a-file' / 'results'} cannot be created (Not a directory); choose another" in errors[0]


def test_run_skip_kill_and_resume(tmp_path, books):
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "compression_ratio=0.5")
    done_before = kill_after_two_windows(args, out)
    assert complete_dirs(out) == []  # killed: nothing complete-looking
    resumed = kvbench(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after {done_before} finished samples" in resumed.stdout
    (run_dir,) = complete_dirs(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_windows"] == 8 and metrics["press"] == "knorm" and metrics["compression_ratio"] == 0.5
    assert metrics["speed"]["kv_bytes_after"] < metrics["speed"]["kv_bytes_before"]
    started = time.time()
    again = kvbench(*args)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert time.time() - started < 30


def test_an_overwrite_run_resumes_in_its_own_hydra_job_directory_only(tmp_path, books):
    """A requeued SLURM task runs again in its Hydra job directory: with overwrite=true it must resume there (it
    started from zero on every requeue), while a new command, in a new directory, still starts afresh."""
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "compression_ratio=0.5", "overwrite=true")
    done_before = kill_after_two_windows([*args, f"hydra.run.dir={tmp_path / 'job'}"], out)
    assert complete_dirs(out) == []
    requeued = kvbench(*args, f"hydra.run.dir={tmp_path / 'job'}")
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert f"resuming after {done_before} finished samples" in requeued.stdout
    kill_after_two_windows([*args, f"hydra.run.dir={tmp_path / 'job'}"], out)
    rerun = kvbench(*args, f"hydra.run.dir={tmp_path / 'another job'}")
    assert rerun.returncode == 0 and "resuming" not in rerun.stdout, rerun.stderr[-2000:]
    (run_dir,) = complete_dirs(out)
    assert json.loads((run_dir / "metrics.json").read_text())["num_windows"] == 8


def test_context_shorter_than_the_window_runs_warns_and_is_recorded(tmp_path):
    data = tmp_path / "lb"
    data.mkdir()
    record = {"input": "Who wrote it?", "context": "Alice wrote the note.", "answers": ["Alice"], "length": 10,
              "dataset": "hotpotqa_e", "language": "en", "all_classes": None, "_id": "x1"}
    (data / "hotpotqa_e.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "results"
    result = kvbench("dataset=longbench_e", f"dataset.path={data}", "dataset.tasks=[hotpotqa]", "press=snapkv", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("not longer than the press window") == 1
    (run_dir,) = complete_dirs(out)
    assert json.loads((run_dir / "metrics.json").read_text())["short_contexts"] == 1


def test_multirun_logs_each_run_to_offline_wandb(tmp_path, books):
    from tests.conftest_results import offline_runs, read_offline_run

    out = tmp_path / "results"
    home = tmp_path / "wandb-home"
    env = {"WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"), "NETRC": str(home / "none"),
           "WANDB_API_KEY": None, "WANDB_MODE": None, "WANDB_DIR": None}
    args = pg19_args(books, out, "dataset.max_windows_per_book=2", "logger=wandb", "wandb.mode=offline",
                     "wandb.group=cli-test", f"wandb.dir={tmp_path / 'wb'}")
    result = kvbench("-m", "press=knorm,streaming_llm", "compression_ratio=0.5", *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {json.loads((d / "metrics.json").read_text())["press"]: json.loads((d / "metrics.json").read_text()) for d in complete_dirs(out)}
    logged = [read_offline_run(folder) for folder in offline_runs(tmp_path / "wb")]
    assert len(logged) == 2, sorted(p.name for p in (tmp_path / "wb").rglob("*") if "offline-run" in p.name)
    for info in logged:
        press = info["config"]["press"]["name"]
        assert info["group"] == "cli-test"
        assert info["summary"]["score"] == pytest.approx(runs[press]["score"])
        assert info["summary"]["speed/prefill_seconds"] == pytest.approx(runs[press]["speed"]["prefill_seconds"])


def test_two_processes_with_one_configuration_compute_it_once(tmp_path, books):
    """Two sweeps over one output_dir: one computes under the run's lock, the other waits and reuses the result."""
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=4")
    procs = [subprocess.Popen([sys.executable, "-m", "kvbench", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    computed = [o for o in outputs if "score =" in o]
    reused = [o for o in outputs if "already complete" in o]
    assert len(computed) == 1 and len(reused) == 1, outputs
    (run_dir,) = complete_dirs(out)
    assert (run_dir / "identity.json").is_file()
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())  # no stale checkpoint
    assert not [p.name for p in out.iterdir() if p.name.startswith((".staging", f".{run_dir.name}"))]


def test_a_result_of_another_setup_is_not_reused(tmp_path, books):
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=2")
    assert kvbench(*args).returncode == 0
    (run_dir,) = complete_dirs(out)
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["dtype"] == "float32" and identity["device_type"] == "cpu" and identity["config"]["press"]["name"] == "knorm"
    here = device_model(torch.device("cpu"))
    assert identity["device_name"] == here == json.loads((run_dir / "metrics.json").read_text())["device_name"]
    identity["device_name"] = "Another CPU"  # as if computed on another machine (other rounding, other speed)
    (run_dir / "identity.json").write_text(json.dumps(identity))
    again = kvbench(*args)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert f'device_name: "Another CPU" -> "{here}"' in errors[0] and "overwrite=true" in errors[0]
    rerun = kvbench(*args, "overwrite=true")
    assert rerun.returncode == 0 and "score =" in rerun.stdout
    assert json.loads((run_dir / "identity.json").read_text())["device_name"] == here


def baseline_then_run(books, out: Path, common: tuple, press: str, *args: str) -> tuple[Path, dict, dict]:
    """A no_press run, then ``press`` at ratio 0.5 with ``args`` (both with ``common``): the baseline's directory and
    metrics, and the compressed run's metrics."""
    assert kvbench(*pg19_args(books, out, "press=no_press", *common)).returncode == 0
    (baseline_dir,) = complete_dirs(out)
    compressed = kvbench(*pg19_args(books, out, f"press={press}", "compression_ratio=0.5", *args, *common))
    assert compressed.returncode == 0, compressed.stderr[-2000:]
    (run_dir,) = [p for p in complete_dirs(out) if f"__{press}__" in p.name]
    return baseline_dir, json.loads((baseline_dir / "metrics.json").read_text()), json.loads((run_dir / "metrics.json").read_text())


def test_a_press_with_its_own_parameters_is_compared_with_the_baseline_of_its_windows_only(tmp_path, books):
    """The baseline is found by identity: a press parameter in the run's name (press.clustering=kmeans) does not hide
    it, and a no_press result of another setup (here: another transformers) is not taken for it."""
    out = tmp_path / "results"
    common = ("dataset.max_windows_per_book=2",)
    baseline_dir, baseline, metrics = baseline_then_run(books, out, common, "snapkv", "press.clustering=kmeans")
    assert metrics["no_press_perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-12)
    assert metrics["ratio"] == pytest.approx(metrics["perplexity"] / baseline["perplexity"])
    identity = json.loads((baseline_dir / "identity.json").read_text())
    identity["transformers"] = "0.0.1"  # as if another transformers had computed the baseline
    (baseline_dir / "identity.json").write_text(json.dumps(identity))
    knorm = kvbench(*pg19_args(books, out, "press=knorm", "compression_ratio=0.5", *common))
    assert knorm.returncode == 0, knorm.stderr[-2000:]
    (knorm_dir,) = [p for p in complete_dirs(out) if "__knorm__" in p.name]
    assert "no_press_perplexity" not in json.loads((knorm_dir / "metrics.json").read_text())


def test_a_run_batched_otherwise_than_its_baseline_is_still_compared_with_it(tmp_path, books):
    """Batch size (like the cache layout and decode timing) moves a perplexity by rounding only: a knorm run at
    batch size 2 found no baseline computed at batch size 1, and fills in its comparison when the baseline comes
    later; a baseline run as the run was is the one taken."""
    out = tmp_path / "results"
    common = ("dataset.max_windows_per_book=2",)
    baseline_dir, baseline, metrics = baseline_then_run(books, out, common, "knorm", "batch_size=2")
    assert metrics["no_press_perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-12)
    recorded = json.loads((baseline_dir / "metrics.json").read_text())
    (baseline_dir / "metrics.json").write_text(json.dumps({**recorded, "perplexity": 99.0}))  # marks the batch-1 one
    twin = kvbench(*pg19_args(books, out, "press=no_press", "batch_size=2", *common))
    assert twin.returncode == 0, twin.stderr[-2000:]
    (twin_dir,) = [p for p in complete_dirs(out) if "__no_press__" in p.name and "batch_size=2" in p.name]
    twin_ppl = json.loads((twin_dir / "metrics.json").read_text())["perplexity"]
    from kvbench import baseline as baseline_module
    from kvbench.runner import expected_identity

    cfg = compose_pg19(books, out, "press=knorm", "compression_ratio=0.5", "batch_size=2")
    assert baseline_module.baseline_metrics(cfg, expected_identity(cfg))["perplexity"] == twin_ppl != 99.0


@pytest.mark.integration
def test_batching_a_model_whose_rope_follows_the_longest_context_is_refused(tmp_path, books):
    """Dynamic NTK (and LongRoPE) take their frequencies from the longest context of a batch: batch_size > 1 is
    refused in one line before anything is written, and the same run at batch size 1 goes through."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model_dir = tmp_path / "tiny-dynamic"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=2", f"model.name_or_path={model_dir}",
                     "model.name=tiny-dynamic")
    refused = kvbench(*args, "batch_size=2", env={"HF_HUB_OFFLINE": "1"})
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-2000:]
    assert "'dynamic' RoPE" in errors[0] and "use batch_size=1" in errors[0]
    assert complete_dirs(out) == [] and not (out / ".partial").exists()
    alone = kvbench(*args, env={"HF_HUB_OFFLINE": "1"})
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert len(complete_dirs(out)) == 1


def test_a_failed_result_write_leaves_no_staging_and_the_rerun_resumes(tmp_path, books, monkeypatch):
    """A full disk at the end of a run: one error saying the rows are kept, no hidden staging directory left behind
    (it sat on the full disk), and the rerun finishes from the checkpoint."""
    import errno

    from kvbench import runner
    from kvbench.results import RunDirectory

    out = tmp_path / "results"
    cfg = compose_pg19(books, out, "press=knorm")
    finalize = RunDirectory.finalize

    def disk_full(self, staging, *args, **kwargs):
        (staging / "predictions.csv").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDirectory, "finalize", disk_full)
    with pytest.raises(KVBenchError, match=r"could not write the results of .*knorm.* \(No space left on device\); its 2 "
                                           r"samples are checkpointed: free space or fix .* and rerun the same command"):
        runner.execute(cfg)
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == [] and complete_dirs(out) == []
    (rows,) = (out / ".partial").glob("*/rows.jsonl")
    assert len(rows.read_text().splitlines()) == 2
    monkeypatch.setattr(RunDirectory, "finalize", finalize)
    assert runner.execute(cfg)["num_windows"] == 2
    assert len(complete_dirs(out)) == 1


@pytest.mark.parametrize("rerun", ["no_press", "knorm"])
def test_a_comparison_a_kill_left_unwritten_is_written_by_the_next_run_of_either_side(tmp_path, books, monkeypatch,
                                                                                     capsys, rerun):
    """Killed after the baseline was published but before it filled in the runs that finished first: rerunning the
    baseline or the compressed run (both only "already complete") writes the missing comparison."""
    from kvbench import baseline, runner

    out = tmp_path / "results"
    knorm_cfg = compose_pg19(books, out, "press=knorm", "compression_ratio=0.5")
    baseline_cfg = compose_pg19(books, out, "press=no_press")
    runner.execute(knorm_cfg)
    monkeypatch.setattr(baseline, "fill_in_comparisons", lambda *args, **kwargs: [])  # the kill, as far as it matters
    reference = runner.execute(baseline_cfg)["perplexity"]
    (knorm_dir,) = [p for p in complete_dirs(out) if "__knorm__" in p.name]
    assert "no_press_perplexity" not in json.loads((knorm_dir / "metrics.json").read_text())
    monkeypatch.undo()
    capsys.readouterr()
    returned = runner.execute(knorm_cfg if rerun == "knorm" else baseline_cfg)
    assert "already complete" in capsys.readouterr().out
    metrics = json.loads((knorm_dir / "metrics.json").read_text())
    assert metrics["no_press_perplexity"] == pytest.approx(reference, rel=1e-12)
    assert metrics["ratio"] == pytest.approx(metrics["perplexity"] / reference)
    if rerun == "knorm":
        assert returned["no_press_perplexity"] == metrics["no_press_perplexity"]


def test_a_full_disk_while_the_baseline_fills_in_a_comparison_is_one_line_and_the_rerun_writes_it(tmp_path, books,
                                                                                                 monkeypatch):
    import errno

    from kvbench import runner
    from kvbench.results import RunDirectory

    out = tmp_path / "results"
    knorm_cfg = compose_pg19(books, out, "press=knorm", "compression_ratio=0.5")
    baseline_cfg = compose_pg19(books, out, "press=no_press")
    runner.execute(knorm_cfg)

    def disk_full(self, extra):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDirectory, "add_metrics", disk_full)
    with pytest.raises(KVBenchError, match=r"^pg19__.*no_press.*: could not write the comparison with the no_press run "
                                           r"into metrics.json \(No space left on device\); free space or fix .* and rerun"):
        runner.execute(baseline_cfg)
    monkeypatch.undo()
    reference = runner.execute(baseline_cfg)["perplexity"]  # already complete: fills the comparison in
    (knorm_dir,) = [p for p in complete_dirs(out) if "__knorm__" in p.name]
    assert json.loads((knorm_dir / "metrics.json").read_text())["no_press_perplexity"] == pytest.approx(reference, rel=1e-12)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_goes_on_from_the_kept_rows(tmp_path, books,
                                                                                              monkeypatch, capsys):
    import builtins
    import errno

    from kvbench import results, runner

    out = tmp_path / "results"
    cfg = compose_pg19(books, out, "press=knorm", "compression_ratio=0.5")
    appends = []

    def disk_fills_up(path, mode="r", *args, **kwargs):
        if str(path).endswith("rows.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(results, "open", disk_fills_up, raising=False)
    with pytest.raises(KVBenchError, match=r"^could not checkpoint .*knorm.* in .*\.partial.* \(No space left on device\); "
                                           r"free space or fix .* and rerun the same command to go on"):
        runner.execute(cfg)
    (rows,) = (out / ".partial").glob("*/rows.jsonl")
    assert len(rows.read_text().splitlines()) == 1 and complete_dirs(out) == []
    monkeypatch.undo()
    capsys.readouterr()
    assert runner.execute(cfg)["num_windows"] == 2
    assert "resuming after 1 finished samples" in capsys.readouterr().out


def test_what_a_killed_finalisation_left_is_removed_by_the_next_run_and_nothing_else(tmp_path, books):
    """A kill inside finalisation leaves the staging copy, the old result set aside by overwrite=true, or the checkpoint
    of a published result: the next run of the configuration removes them. Another run's staging is not its business."""
    from kvbench import runner

    out = tmp_path / "results"
    cfg = compose_pg19(books, out, "press=knorm", "compression_ratio=0.5")
    runner.execute(cfg)
    (run_dir,) = complete_dirs(out)
    left = [out / f".{run_dir.name}.tmp-abc123", out / f".{run_dir.name}.old-def456" / run_dir.name]
    for folder in left:
        shutil.copytree(run_dir, folder)
    (out / ".partial" / run_dir.name).mkdir(parents=True)
    (out / ".partial" / run_dir.name / "rows.jsonl").write_text("{}\n")
    other = out / f".{run_dir.name}__window_size=8.tmp-ghi789"  # a longer name's staging: another run's
    other.mkdir()
    runner.execute(cfg)
    assert sorted(p.name for p in out.iterdir() if p.name != ".locks") == sorted([run_dir.name, other.name])


def test_a_default_written_out_reuses_the_plain_run_alone_and_in_a_shared_prefill_sweep(tmp_path, books):
    """``seed=42`` (the default) named a second directory, computed again and listed twice on the leaderboard."""
    out = tmp_path / "results"
    args = pg19_args(books, out, "press=knorm", "dataset.max_windows_per_book=2")
    assert kvbench(*args).returncode == 0
    (plain,) = complete_dirs(out)
    solo = kvbench(*args, "seed=42", "press.name=knorm", "batch_size=1")
    assert solo.returncode == 0 and "already complete" in solo.stdout, solo.stderr[-2000:]
    sweep = kvbench("-m", "hydra/launcher=shared_prefill", *args, "seed=42", "compression_ratio=0.5,0.25")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert sweep.stdout.count("already complete") == 1  # 0.5 reused; 0.25 computed under the plain name
    assert sorted(p.name for p in complete_dirs(out)) == sorted([plain.name, plain.name.replace("__0.50", "__0.25")])
