"""Result directory naming, identity, atomic completion and resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.device import device_model
from kvbench.errors import KVBenchError
from kvbench.results import (RunDirectory, format_ratio, identity_config, identity_difference, run_identity, run_name,
                             run_variant, variant_from_overrides)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ratio,text", [(0.5, "0.50"), (0.875, "0.875"), (0.0, "0.00"), (0.25, "0.25"), (0.1, "0.10"), (0.3333, "0.3333")])
def test_ratio_prints_unambiguously(ratio, text):
    assert format_ratio(ratio) == text


def test_name_has_the_four_parts():
    assert run_name("ruler", "smollm2-135m", "snapkv", 0.5) == "ruler__smollm2-135m__snapkv__0.50"
    assert run_name("ruler", "org/model", "knorm", 0.875, "query_aware") == "ruler__org-model__knorm__0.875__query_aware"


def test_settings_that_change_results_change_the_name():
    base = ["press=snapkv", "compression_ratio=0.5", "model=smollm2-135m", "dataset=ruler"]
    assert variant_from_overrides(base) == ""
    # where results go / how they are logged never changes the name
    assert variant_from_overrides(base + ["output_dir=/x", "overwrite=true", "logger.name=wandb", "device=cpu"]) == ""
    variants = {
        variant_from_overrides(base + extra)
        for extra in (
            [],
            ["query_aware=true"],
            ["dataset.context_length=4096"],
            ["press.window_size=32"],
            ["dataset.window_size=32"],
            ["budget=128"],
            ["max_context_length=2048"],
            ["query_aware=true", "dataset.context_length=4096"],
        )
    }
    assert len(variants) == 8
    assert variant_from_overrides(base + ["query_aware=false"]) == ""


def test_a_key_given_twice_is_named_by_the_value_hydra_applies():
    twice = variant_from_overrides(["dataset.context_lengths=[200]", "dataset.context_lengths=[400]"])
    assert twice == variant_from_overrides(["dataset.context_lengths=[400]"]) != variant_from_overrides(["dataset.context_lengths=[200]"])
    assert variant_from_overrides(["press.window_size=32", "press.window_size=64"]) == "press.window_size=64"


def variant_of(*overrides: str) -> str:
    """The variant kvbench's entry point names a run composed from ``overrides`` with."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return run_variant(task, list(cfg.hydra.overrides.task), choices)


def test_a_default_written_out_names_no_second_directory():
    """``seed=42`` is the plain command's run: it was computed again under its own name and listed twice."""
    assert variant_of("seed=42", "budget=null", "batch_size=1", "cache_layout=packed", "max_context_length=null",
                      "model.dtype=auto", "model.attn_implementation=sdpa", "model.name_or_path=smollm2-135m",
                      "dataset.num_samples=1", "dataset.source=generated", "dataset.reserve_generation=true",
                      "press.window_size=64", "press.clustering=topk") == ""
    assert variant_of("seed=7", "dataset.num_samples=1", "press.window_size=32") == "press.window_size=32__seed=7"
    # the default of the chosen group's file: epsilon is 0.0001 for critical_snapkv, 0.01 for expected_attention
    assert variant_of("press=critical_snapkv", "press.epsilon=0.0001") == ""
    assert variant_of("press=expected_attention", "press.epsilon=0.0001") == "press.epsilon=0.0001"
    assert variant_of("dataset=pg19", "dataset.context_length=1024", "dataset.eval_length=64") == "eval_length=64"
    # a key given twice: the value Hydra applies decides
    assert variant_of("seed=7", "seed=42") == "" and variant_of("seed=42", "seed=7") == "seed=7"
    # compared as written: another type is another setting (validate refuses the wrong ones)
    assert variant_of("dataset.num_samples=1.0") == "num_samples=1.0"
    assert variant_of("++dataset.num_samples=1") == ""
    assert variant_of("+seed2=42") == "+seed2=42"  # a key no file has (refused later by the known-keys check)


def test_a_value_holding_the_part_separator_is_not_read_as_two_overrides():
    """Parts are joined with "__": a value containing it would name two other overrides' directory."""
    assert variant_from_overrides(["dataset.context_length=4096__seed=7"]) != variant_from_overrides(
        ["dataset.context_length=4096", "seed=7"])


def test_long_variants_are_shortened_but_stay_distinct():
    a = variant_from_overrides([f"dataset.tasks=[{','.join('t' + str(i) for i in range(40))}]"])
    b = variant_from_overrides([f"dataset.tasks=[{','.join('t' + str(i) for i in range(41))}]"])
    assert len(a) <= 80 and a != b


def test_a_key_keeps_its_group_where_it_could_be_mistaken():
    names = {variant_from_overrides([o]) for o in ("seed=7", "dataset.seed=7", "+press.seed=7", "++model.seed=7", "+seed2=7", "dataset.seed2=7")}
    assert len(names) == 6
    # the common cases stay short and readable
    assert variant_from_overrides(["dataset.context_length=4096", "dataset.num_samples=100"]) == "context_length=4096__num_samples=100"
    assert variant_from_overrides(["seed=7"]) == "seed=7"
    assert variant_from_overrides(["press.window_size=32"]) == "press.window_size=32"


def test_values_that_clean_alike_stay_distinct():
    a, b, c = (variant_from_overrides([f"dataset.path={v}"]) for v in ("/data/a b", "/data/a/b", "data-a-b"))
    assert len({a, b, c}) == 3 and c == "path=data-a-b"
    assert a.startswith("path=-data-a-b-") and b.startswith("path=-data-a-b-")  # readable, plus a digest
    assert variant_from_overrides(["dataset.x=a_", "dataset.y=b"]) != variant_from_overrides(["dataset.x=a", "dataset._y=b"])


# ---- property: different resolved configurations never share a directory ---------------------------------

GROUPS = {"dataset": ["ruler", "needle", "pg19"], "press": ["snapkv", "knorm", "no_press"], "model": ["smollm2-135m", "pythia-160m"]}
KEYS = {
    "seed": ["7", "42", "8"],
    "budget": ["null", "64", "128"],
    "max_context_length": ["null", "2048", "4096"],
    "query_aware": ["true", "false"],
    "compression_ratio": ["0.25", "0.5", "0.75"],
    "++dataset.seed": ["7", "42", "8"],
    "++dataset.num_samples": ["1", "2", "3"],
    "++dataset.context_length": ["512", "1024", "4096"],
    "++dataset.tasks": ["[vt]", "[vt,qa_1]", "[qa_1,vt]", "null"],
    "++dataset.path": ["/data/a b", "/data/a/b", "data-a-b"],
    "++press.seed": ["7", "8"],
    "++press.window_size": ["32", "64"],
    "++press.kernel_size": ["5", "7"],
    "++model.dtype": ["auto", "float32", "bfloat16"],
    "++model.attn_implementation": ["sdpa", "eager"],
    "++model.name_or_path": ["smollm2-135m", "/models/x"],
}


def _random_overrides(rng: random.Random) -> tuple[str, ...]:
    chosen = [f"{g}={rng.choice(v)}" for g, v in GROUPS.items() if rng.random() < 0.4]
    for key in rng.sample(sorted(KEYS), rng.randint(0, 4)):
        chosen.append(f"{key}={rng.choice(KEYS[key])}")
    return tuple(chosen)


def test_different_resolved_configs_never_share_a_name():
    """Random pairs of real overrides (top-level, dataset.*, press.*, model.*, group choices), composed by Hydra
    from conf/: whenever the identity configs differ, the full run names differ."""
    rng = random.Random(1234)
    lists = {_random_overrides(rng) for _ in range(150)}
    lists |= {("seed=7",), ("++dataset.seed=7",), ("++press.seed=7",), ("++dataset.window_size=32",), ("++press.window_size=32",)}
    seen: dict[str, tuple] = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides in sorted(lists):
            cfg = compose("config", overrides=list(overrides))
            ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
            if cfg.press.name == "no_press":
                cfg.compression_ratio = 0.0  # as kvbench.runner.expected_identity: one uncompressed run per sweep
            name = run_name(cfg.dataset.name, cfg.model.name, cfg.press.name, ratio, variant_from_overrides(list(overrides)))
            ident = json.dumps(identity_config(cfg), sort_keys=True)
            if name in seen:
                other, other_ident = seen[name]
                assert ident == other_ident, f"{overrides} and {other} resolve differently but share the name {name}"
            seen[name] = (overrides, ident)
    assert len(seen) > 100


# ---- identity, checkpoints, completion -------------------------------------------------------------------


def _cfg(**extra):
    return OmegaConf.create({"press": {"name": "snapkv"}, "compression_ratio": 0.5, "output_dir": "x", "device": "auto",
                             "logger": {"name": "none"}, **extra})


def _identity(dtype="float32", device_name="CPU A", **extra):
    return run_identity(_cfg(**extra), dtype=dtype, device_type="cpu", device_name=device_name)


def _finish(directory, identity, score=1.0, overwrite=False):
    staging = directory.staging()
    predictions = pd.DataFrame({"sample_id": ["a"], "context": ["long"], "answers": [["x", "y"]]})
    return directory.finalize(staging, predictions, {"score": score}, _cfg(), identity, overwrite=overwrite)


def test_identity_leaves_out_where_and_how_results_are_kept():
    base = _identity()
    assert base == _identity(output_dir="elsewhere", overwrite=True, logger={"name": "wandb"}, device="cuda:1",
                             wandb={"mode": "online"})
    assert {"kvbench_version", "kvbench_commit", "torch", "transformers", "tokenizers", "flash_attn", "dtype", "device_type",
            "device_name", "config"} <= set(base)
    assert base["torch"] and base["transformers"] and base["tokenizers"] and base["kvbench_version"]
    assert "output_dir" not in base["config"] and "device" not in base["config"]
    assert base != _identity(dtype="bfloat16") and base != _identity(seed=7)
    assert identity_difference(base, _identity(dtype="bfloat16", seed=7)) == ["config.seed: (absent) -> 7", 'dtype: "float32" -> "bfloat16"']
    # Another CPU or GPU model rounds differently (near ties) and times differently: another run.
    assert identity_difference(base, _identity(device_name="CPU B")) == ['device_name: "CPU A" -> "CPU B"']


def test_finished_result_is_reused_only_for_the_same_identity(tmp_path):
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    _finish(directory, _identity())
    assert directory.is_complete() and directory.recorded_identity() == json.loads(json.dumps(_identity()))
    directory.check_identity(_identity())  # same identity: reusable
    directory.check_identity(_identity(output_dir="elsewhere"))
    with pytest.raises(KVBenchError) as error:
        directory.check_identity(_identity(dtype="bfloat16", press={"name": "snapkv", "window_size": 8}))
    message = str(error.value)
    assert "\n" not in message and "overwrite=true" in message
    assert "dtype" in message and "config.press.window_size" in message and "config.seed" not in message
    (directory.path / "identity.json").write_text("[1, 2]")  # valid JSON of another shape: no identity, not a crash
    with pytest.raises(KVBenchError, match="no readable identity.json.*overwrite=true"):
        directory.check_identity(_identity())
    (directory.path / "identity.json").unlink()  # a result from before identities were recorded
    with pytest.raises(KVBenchError, match="no readable identity.json.*overwrite=true"):
        directory.check_identity(_identity())


def test_finalize_is_all_or_nothing_and_resume_needs_same_identity(tmp_path):
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    ident = _identity()
    directory.checkpoint(ident, [{"sample_id": "a", "prediction": "1"}])
    directory.checkpoint(ident, [{"sample_id": "b", "prediction": "2"}])
    assert not directory.path.exists() and not directory.is_complete()
    assert list(directory.load_checkpoint(ident)["sample_id"]) == ["a", "b"]
    assert list(directory.load_checkpoint(_identity(output_dir="elsewhere"))["sample_id"]) == ["a", "b"]
    staging = directory.staging()
    (staging / "extra.png").write_bytes(b"png")
    directory.finalize(staging, pd.DataFrame({"sample_id": ["a"], "context": ["long"], "answers": [["x", "y"]]}), {"score": 1.0}, _cfg(), ident, overwrite=False)
    assert directory.is_complete() and (directory.path / "extra.png").exists() and (directory.path / "identity.json").exists()
    saved = pd.read_csv(directory.path / "predictions.csv")
    assert "context" not in saved and json.loads(saved["answers"][0]) == ["x", "y"]
    assert not directory.partial.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name not in (".locks",)] == []


def test_a_checkpoint_of_another_identity_is_moved_aside_never_appended_to(tmp_path, capsys):
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    directory.checkpoint(_identity(), [{"sample_id": "a", "prediction": "old"}])
    other = _identity(dtype="bfloat16")
    assert directory.load_checkpoint(other) is None
    assert "another setup" in capsys.readouterr().out
    stale = sorted(p.name for p in directory.partial.iterdir())
    assert any(n.startswith("rows.jsonl.stale-") for n in stale) and "rows.jsonl" not in stale
    directory.checkpoint(other, [{"sample_id": "b", "prediction": "new"}])
    rows = directory.load_checkpoint(other)
    assert list(rows["sample_id"]) == ["b"] and list(rows["prediction"]) == ["new"]
    # and the old identity's rows do not come back either
    assert directory.load_checkpoint(_identity()) is None


def test_a_kill_while_a_checkpoint_is_moved_aside_never_mixes_two_setups(tmp_path):
    """The identity and the rows are moved aside one after the other; a kill between them must not leave the
    next run's rows under the old identity (resumed later by the old setup) or the old rows resumable."""
    directory, old, new = RunDirectory(tmp_path, "d__m__p__0.50"), _identity(), _identity(dtype="bfloat16")
    directory.checkpoint(old, [{"sample_id": "a", "prediction": "old"}])
    (directory.partial / "rows.jsonl").rename(directory.partial / "rows.jsonl.stale-x")  # killed after the rows went
    assert directory.load_checkpoint(new) is None
    directory.checkpoint(new, [{"sample_id": "b", "prediction": "new"}])
    assert directory.load_checkpoint(old) is None  # the new rows are not the old setup's
    directory.checkpoint(new, [{"sample_id": "c", "prediction": "new"}])
    assert list(directory.load_checkpoint(new)["sample_id"]) == ["c"]

    other = RunDirectory(tmp_path, "d__m__p__0.75")  # killed the other way round: rows left, their identity gone
    other.checkpoint(old, [{"sample_id": "a", "prediction": "old"}])
    (other.partial / "identity.json").unlink()
    assert other.load_checkpoint(old) is None and other.load_checkpoint(new) is None


def test_overwrite_resumes_only_its_own_launch(tmp_path):
    """overwrite=true reuses no earlier row, except rows its own launch (a requeued SLURM task, same Hydra job
    directory) checkpointed before it was stopped."""
    directory, ident = RunDirectory(tmp_path, "d__m__p__0.50"), _identity()
    directory.checkpoint(ident, [{"sample_id": "a", "prediction": "earlier run"}])
    assert directory.start_over(ident, "/sweep/launch-1/0") is None and not (directory.partial / "rows.jsonl").exists()
    directory.checkpoint(ident, [{"sample_id": "b", "prediction": "launch 1"}])
    assert list(directory.start_over(ident, "/sweep/launch-1/0")["sample_id"]) == ["b"]  # requeued: resumes
    assert directory.start_over(ident, "/sweep/launch-2/0") is None  # a new command: afresh
    directory.checkpoint(ident, [{"sample_id": "c", "prediction": "launch 2"}])
    assert directory.start_over(ident, None) is None and not directory.partial.exists()  # outside Hydra: afresh


def test_torn_checkpoint_lines_are_dropped_and_later_rows_survive(tmp_path):
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    ident = _identity()
    directory.checkpoint(ident, [{"sample_id": "a", "prediction": "1"}])
    with open(directory.partial / "rows.jsonl", "a") as handle:
        handle.write('{"sample_id": "b", "predic')  # killed mid-write: no newline
    assert list(directory.load_checkpoint(ident)["sample_id"]) == ["a"]
    directory.checkpoint(ident, [{"sample_id": "c", "prediction": "3"}])  # the resumed run appends
    assert list(directory.load_checkpoint(ident)["sample_id"]) == ["a", "c"]
    (directory.partial / "rows.jsonl").write_text('{"sample_id": "x"')
    assert directory.load_checkpoint(ident) is None


def test_overwrite_replaces_a_finished_result_of_the_same_identity(tmp_path):
    """Without overwrite, a result another process finished first is kept (same identity, same numbers); with it,
    the new run's files replace it (a rerun to re-time the same setup)."""
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    _finish(directory, _identity(), score=1.0)
    _finish(directory, _identity(), score=2.0)
    assert directory.metrics()["score"] == 1.0
    _finish(directory, _identity(), score=3.0, overwrite=True)
    assert directory.metrics()["score"] == 3.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"] == []


def test_a_checkpoint_whose_last_line_lost_its_newline_takes_later_rows_on_lines_of_their_own(tmp_path):
    """A kill between a record and its newline: the record is whole and kept, and the file is mended so the next
    append does not glue two records into one unreadable line (both samples would be computed again)."""
    directory, ident = RunDirectory(tmp_path, "d__m__p__0.50"), _identity()
    directory.checkpoint(ident, [{"sample_id": "a", "prediction": "1"}])
    rows = directory.partial / "rows.jsonl"
    rows.write_text(rows.read_text().rstrip("\n"))
    assert list(directory.load_checkpoint(ident)["sample_id"]) == ["a"]
    directory.checkpoint(ident, [{"sample_id": "b", "prediction": "2"}, {"sample_id": "a", "prediction": "again"}])
    resumed = directory.load_checkpoint(ident)
    assert list(resumed["sample_id"]) == ["a", "b"] and list(resumed["prediction"]) == ["1", "2"]  # one row per sample


def test_a_corrupt_metrics_file_is_not_complete(tmp_path):
    directory = RunDirectory(tmp_path, "n")
    directory.path.mkdir()
    for name in ("predictions.csv", "config.yaml"):
        (directory.path / name).write_text("x")
    (directory.path / "metrics.json").write_text("{not json")
    assert not directory.is_complete()
    (directory.path / "metrics.json").write_text("[]")  # JSON, but no run's metrics (a skip read .get on it)
    assert not directory.is_complete()


def test_identity_is_known_before_the_model_loads(monkeypatch):
    import torch

    from kvbench import runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        auto = runner.expected_identity(compose("config"))
        cpu_bf16 = runner.expected_identity(compose("config", overrides=["device=cpu", "model.dtype=bfloat16"]))
        no_press = [runner.expected_identity(compose("config", overrides=["press=no_press", f"compression_ratio={r}"]))
                    for r in (0.25, 0.75)]
    gpu = torch.cuda.is_available()
    assert (auto["device_type"], auto["dtype"]) == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))
    assert (cpu_bf16["device_type"], cpu_bf16["dtype"]) == ("cpu", "bfloat16")
    assert cpu_bf16["device_name"] == device_model(torch.device("cpu")) and cpu_bf16["device_name"]
    assert no_press[0] == no_press[1]  # every ratio of a sweep shares the one uncompressed run


def test_the_launching_process_groups_jobs_without_naming_the_device(monkeypatch):
    """Naming a GPU initialises CUDA, which a multi-GPU sweep's launching process must not do before its workers
    pin their GPUs: the prefill group key leaves the name out, each worker's own identity has it."""
    from kvbench import runner

    monkeypatch.setattr(runner, "device_model", lambda device: pytest.fail("the group key named the device"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        key = json.loads(runner.prefill_group_key(compose("config", overrides=["device=cpu"])))
    assert key["device_name"] is None and key["device_type"] == "cpu"


@pytest.mark.parametrize("dataset, rows", [
    ("ruler", [{"task": "qa_1", "prediction": "It was William Shakespeare.", "answers": ["Shakespeare", "Marlowe"]},
               {"task": "niah_multivalue", "prediction": "1234 and 5678", "answers": ["1234", "5678", "9999"]}]),
    ("longbench_e", [{"task": "hotpotqa", "prediction": "William Shakespeare", "answers": ["Shakespeare", "William Shakespeare"],
                      "all_classes": None, "length": 3000},
                     {"task": "trec", "prediction": "Description\nmore", "answers": ["Description"],
                      "all_classes": ["Description", "Entity", "Abbreviation"], "length": 5000}]),
    ("needle", [{"prediction": "eat a sandwich in Dolores Park", "answers": ["sandwich", "Dolores Park", "sunny day"],
                 "context_length": 512, "depth": 50.0}]),
])
def test_a_predictions_csv_read_back_scores_as_the_run_did(tmp_path, dataset, rows):
    """predictions.csv stores answer lists as JSON text: read back, each list was one answer (or, for the needle,
    its letters were the key phrases), and every score fell."""
    from kvbench.metrics import metrics_module
    from kvbench.results import serialise_predictions

    frame = pd.DataFrame(rows)
    serialise_predictions(frame).to_csv(tmp_path / "predictions.csv", index=False)
    read_back = pd.read_csv(tmp_path / "predictions.csv")
    assert isinstance(read_back["answers"][0], str)
    scored = metrics_module(dataset).compute(frame)
    assert scored["score"] > 0 and metrics_module(dataset).compute(read_back) == scored
