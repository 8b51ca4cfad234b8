"""The speed benchmark on a tiny random Llama (``--model random:<dir with config.json>``): the CSV holds every
row and column, cache bytes follow the ratio, the decode length is honoured, plots are drawn, bad input is
refused before anything is written, and the memory-bound arithmetic matches a real cache."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from kvbench.benchmark import bound
from kvbench.benchmark.__main__ import main
from kvbench.benchmark.configs import RANDOM_CONFIGS
from kvbench.benchmark.model_source import load, resolve_source
from kvbench.benchmark.speed import BenchmarkOptions, plan
from tests.tiny_models import tiny_model

COLUMNS = {"context_length", "press", "ratio", "prefill_seconds", "compression_seconds", "ttft_seconds",
           "decode_ms_per_token", "decoded_tokens", "kv_bytes", "kv_bytes_uncompressed", "kv_kept_fraction",
           "peak_memory_bytes", "device_name", "dtype", "model", "torch_version", "transformers_version"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").config.save_pretrained(folder)  # max_position_embeddings 1024
    return folder


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    code = main(["--model", f"random:{tiny_config}", "--context-lengths", "96,160", "--presses", "no_press,snapkv,adakv_snapkv",
                 "--ratios", "0,0.5", "--decode-tokens", "5", "--device", "cpu", "--out", str(out), "--bandwidth-gbps", "100"])
    assert code == 0
    return out, pd.read_csv(out / "speed.csv")


def test_csv_rows_and_columns(run):
    _, df = run
    assert COLUMNS <= set(df.columns)
    # no_press ignores the ratio: one row per length; the others one per (length, ratio)
    assert len(df) == 2 * (1 + 2 + 2)
    assert set(df[df["press"] == "no_press"]["ratio"]) == {0.0}
    assert (df["decoded_tokens"] == 5).all()
    assert (df["decode_ms_per_token"] > 0).all() and (df["ttft_seconds"] >= df["prefill_seconds"]).all()
    assert df["dtype"].eq("float32").all() and df["peak_memory_bytes"].isna().all()  # CPU: no per-run peak


def test_cache_bytes_follow_the_ratio(run):
    _, df = run
    for length, rows in df.groupby("context_length"):
        full = rows[rows["press"] == "no_press"]["kv_bytes"].item()
        assert full == rows["kv_bytes_uncompressed"].max()
        snap = rows[(rows["press"] == "snapkv")].set_index("ratio")
        assert snap.loc[0.0, "kv_bytes"] == full and snap.loc[0.0, "measured_with"] == "no_press"
        assert snap.loc[0.5, "kv_bytes"] / full == pytest.approx(0.5, abs=0.02)
        ada = rows[(rows["press"] == "adakv_snapkv") & (rows["ratio"] == 0.5)]
        assert ada["kv_kept_fraction"].item() == pytest.approx(0.5, abs=0.02)
        assert ada["kv_bytes"].item() < full


def test_each_press_is_warmed_up_before_its_first_row(tiny_config, monkeypatch):
    """With --repeats 1 a press' first row would carry its first-call costs (lazily loaded kernels on a GPU)."""
    from kvbench.benchmark import speed

    calls = []
    real = speed.measure

    def recorded(model, press, context_ids, question_ids, decode_tokens, repeats):
        calls.append((type(press).__name__, context_ids.shape[-1] + question_ids.shape[-1], decode_tokens))
        return real(model, press, context_ids, question_ids, decode_tokens, repeats)

    monkeypatch.setattr(speed, "measure", recorded)
    options = BenchmarkOptions(model=f"random:{tiny_config}", context_lengths=[160, 96], presses=["no_press", "snapkv", "knorm"],
                               ratios=[0.5, 0.75], decode_tokens=3, device="cpu")
    model = load(resolve_source(options.model), "cpu", "float32", "sdpa")
    speed.run_grid(model, options, plan(options), "tiny")
    measured = [call for call in calls if call[2] == 3]
    assert len(measured) == 2 * (1 + 2 + 2)
    assert calls[0] == ("NoPress", 64 + 16, 2)  # the model's warm-up
    for name in {name for name, _, _ in measured} - {"NoPress"}:
        first = next(i for i, call in enumerate(calls) if call[0] == name)
        assert calls[first] == (name, 96, 2), calls  # its warm-up, at the shortest length, before its rows
    assert len(calls) == len(measured) + 1 + 2  # plus the model's warm-up and one per compressing press


def test_plots_written(run):
    out, _ = run
    for name in ("decode_ms_per_token.png", "cache_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_bound_column_uses_measured_cache(run, tiny_config):
    _, df = run
    config = resolve_source(f"random:{tiny_config}").config
    weights = bound.weight_bytes_per_step(config, torch.float32)
    question = df["question_tokens"] * bound.kv_bytes_per_token(config, torch.float32)  # read by every step too
    expected = (weights + df["kv_bytes"] + question) / 100e9 * 1e3
    assert df["memory_bound_ms_per_token"].tolist() == pytest.approx(expected.tolist())


def test_kv_bytes_per_token_matches_a_real_cache(run, tiny_config):
    _, df = run
    config = resolve_source(f"random:{tiny_config}").config
    row = df[df["press"] == "no_press"].iloc[0]
    context = row["context_length"] - row["question_tokens"]
    assert row["kv_bytes"] == context * bound.kv_bytes_per_token(config, torch.float32)


def test_llama_8b_figures():
    config = resolve_source("random:llama-3.1-8b").config
    assert RANDOM_CONFIGS["llama-3.1-8b"]["num_key_value_heads"] == 8
    assert bound.kv_bytes_per_token(config, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    # 8.03 B parameters, less the untied input embedding (128256 x 4096) but for the one row looked up
    assert bound.weight_bytes_per_step(config, torch.bfloat16) == (8_030_261_248 - 128_255 * 4096) * 2
    table = bound.bound_table(config, torch.bfloat16, [8192], [0.0, 0.75], 3350.0).set_index("ratio")
    assert table.loc[0.0, "kept_kv_bytes"] == 2**30 and table.loc[0.75, "kept_kv_bytes"] == 2**28
    # With the speed benchmark's 16 uncompressed question tokens: 2044 of 8176 context tokens kept, plus 16.
    asked = bound.bound_table(config, torch.bfloat16, [8192], [0.0, 0.75], 3350.0, question_tokens=16).set_index("ratio")
    assert asked.loc[0.0, "kept_kv_bytes"] == 2**30 and asked.loc[0.75, "kept_kv_bytes"] == 2060 * 2**17
    assert table.loc[0.0, "bound_ms_per_token"] == pytest.approx((15_009_857_536 + 2**30) / 3.35e9)


@pytest.mark.parametrize("args, message", [
    (["--presses", "snapkv,nope"], "unknown press 'nope'"),
    (["--ratios", "0,1.0"], "outside [0, 1)"),
    (["--ratios", "half"], "comma-separated floats"),
    (["--context-lengths", "2048"], "above the model's max_position_embeddings=1024"),
    (["--decode-tokens", "1"], "at least 2"),
    (["--context-lengths", "1020", "--decode-tokens", "8"], "reaches position 1027, above the model's max_position_embeddings=1024"),
    (["--presses", "snapkv,observed_attention"], "press 'observed_attention' needs the attention weights"),
    (["--out", str(Path(__file__))  + "/out"], "is a file; give a folder"),
    (["--bandwidth-gbps", "nan"], "--bandwidth-gbps must be a positive number, got nan"),  # a NaN floor column, exit 0
    (["--bandwidth-gbps", "inf"], "--bandwidth-gbps must be a positive number, got inf"),
])
def test_bad_input_refused_before_writing(tiny_config, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["--model", f"random:{tiny_config}", "--context-lengths", "96", "--device", "cpu", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_an_out_folder_that_cannot_be_created_is_one_line(tiny_config, tmp_path, capsys):
    """/proc takes no new folders, for root too (not writable for others, ENOENT for root after the model loaded)."""
    out = "/proc/kvbench-out/speed"
    code = main(["--model", f"random:{tiny_config}", "--context-lengths", "96", "--device", "cpu", "--presses", "knorm",
                 "--ratios", "0.5", "--decode-tokens", "2", "--repeats", "1", "--out", out])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith(f"error: --out {out}") and "give a folder you can write to" in err and "\n" not in err


def test_the_model_is_labelled_by_its_folder_name(tiny_config, tmp_path):
    """``Path.stem`` cut ``Llama-3.1-8B`` to ``Llama-3``, and every ``.../config.json`` was labelled ``config``."""
    folder = tmp_path / "Llama-3.1-8B"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_config / "config.json").read_text())
    assert resolve_source(f"random:{folder}").name == "random-Llama-3.1-8B"
    assert resolve_source(f"random:{folder}/config.json").name == "random-Llama-3.1-8B"
    assert resolve_source(f"random:{folder}/").name == "random-Llama-3.1-8B"


def test_a_new_run_never_leaves_an_earlier_runs_plots_beside_its_csv(tiny_config, tmp_path, monkeypatch):
    """A run that stopped after its first row left the previous run's two plots beside its one-row CSV."""
    from kvbench import benchmark

    out = tmp_path / "out"
    out.mkdir()
    for name in (benchmark.DECODE_PLOT, benchmark.CACHE_PLOT):
        (out / name).write_bytes(b"an earlier run's plot")
    original = benchmark.run_grid

    def stopped(model, options, jobs, name, on_row):
        original(model, options, jobs[:1], name, on_row)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(benchmark, "run_grid", stopped)
    options = BenchmarkOptions(model=f"random:{tiny_config}", context_lengths=(96,), presses=("no_press", "knorm"),
                               ratios=(0.5,), decode_tokens=2, repeats=1, device="cpu", out=out)
    with pytest.raises(RuntimeError):
        benchmark.run(options)
    assert len(pd.read_csv(out / "speed.csv")) == 1
    assert not (out / benchmark.DECODE_PLOT).exists() and not (out / benchmark.CACHE_PLOT).exists()


def test_bound_only_takes_the_models_whole_context(capsys, tmp_path):
    """The bound decodes nothing, yet a context at the model's maximum was refused for the tokens it would decode:
    the SmolLM2 rows of docs/benchmarks.md could not be reproduced."""
    code = main(["--model", "random:smollm2-135m", "--dtype", "bfloat16", "--device", "cpu", "--context-lengths", "8192",
                 "--ratios", "0,0.75", "--bandwidth-gbps", "3350", "--bound-only", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert code == 0 and "0.137" in text and "0.094" in text  # the table's 0.137 -> 0.094 ms


@pytest.mark.parametrize("script, args, message", [
    ("press_overhead.py", ["--context", "0"], "--context must be a number of tokens from 1 to the model's 8192, got 0"),
    ("press_overhead.py", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("press_overhead.py", ["--ratio", "1.5"], "a compression ratio is a number in [0, 1)"),
    ("cache_bytes.py", ["--ratios", "1.5"], "a compression ratio is a number in [0, 1)"),
    ("cache_bytes.py", ["--model", "/no/such/model"], "model directory '/no/such/model' does not exist"),
])
def test_benchmark_scripts_refuse_bad_numbers_in_one_line(script, args, message):
    """They were tracebacks (a zero context deep in the prefill, zero repeats in the median, any error of
    cache_bytes.py), or came after the model had loaded."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("model", ["./no/such/model", "random:./no/such/model"])
def test_missing_model_folder_refused(tmp_path, capsys, model):
    out = tmp_path / "out"
    assert main(["--model", model, "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_bound_only_prints_computed_figures_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--model", "random:llama-3.1-8b", "--dtype", "bfloat16", "--device", "cpu", "--context-lengths", "8192",
                 "--ratios", "0,0.75", "--bandwidth-gbps", "3350", "--bound-only", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "computed, not measured" in text
    assert "4.801" in text and "4.561" in text  # (15.01 GB + 1.07 GB or 0.27 GB of kept KV) / 3.35 TB/s
    assert not out.exists()


@pytest.mark.integration
def test_shipped_smollm2_config_is_the_packaged_models_architecture():
    """``random:smollm2-135m`` times the packaged default where its weights are not installed: same shapes, same RoPE."""
    shipped, packaged = resolve_source("random:smollm2-135m").config, resolve_source("smollm2-135m").config
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "hidden_act", "model_type"]
    assert {f: getattr(shipped, f) for f in fields} == {f: getattr(packaged, f) for f in fields}
    assert shipped.rope_parameters["rope_theta"] == packaged.rope_parameters["rope_theta"]
    assert shipped.rms_norm_eps == pytest.approx(packaged.rms_norm_eps)


def test_each_row_is_planned_once_and_no_press_first():
    """Repeated lengths, presses and ratios are one row each, and no_press is measured before the pairs that
    compress nothing reuse it."""
    jobs = plan(BenchmarkOptions(context_lengths=(96, 96), presses=("snapkv", "no_press", "snapkv"), ratios=(0.0, 0.5, 0.5)))
    assert [(job.context_length, job.press_name, job.ratio) for job in jobs] == [(96, "no_press", 0.0), (96, "snapkv", 0.0),
                                                                               (96, "snapkv", 0.5)]
