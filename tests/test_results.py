"""Result directory naming, atomic completion and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.results import RunDirectory, format_ratio, run_name, variant_from_overrides


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
            ["budget=128"],
            ["max_context_length=2048"],
            ["query_aware=true", "dataset.context_length=4096"],
        )
    }
    assert len(variants) == 7
    assert variant_from_overrides(base + ["query_aware=false"]) == ""


def test_long_variants_are_shortened_but_stay_distinct():
    a = variant_from_overrides([f"dataset.tasks=[{','.join('t' + str(i) for i in range(40))}]"])
    b = variant_from_overrides([f"dataset.tasks=[{','.join('t' + str(i) for i in range(41))}]"])
    assert len(a) <= 80 and a != b


def _cfg(**extra):
    return OmegaConf.create({"press": {"name": "snapkv"}, "compression_ratio": 0.5, "output_dir": "x", **extra})


def test_finalize_is_all_or_nothing_and_resume_needs_same_config(tmp_path):
    directory = RunDirectory(tmp_path, "d__m__p__0.50")
    cfg = _cfg()
    directory.checkpoint(cfg, [{"sample_id": "a", "prediction": "1"}])
    directory.checkpoint(cfg, [{"sample_id": "b", "prediction": "2"}])
    assert not directory.path.exists() and not directory.is_complete()
    assert list(directory.load_checkpoint(cfg)["sample_id"]) == ["a", "b"]
    assert directory.load_checkpoint(_cfg(compression_ratio=0.75)) is None  # another configuration
    # the output location is not part of the identity
    assert directory.load_checkpoint(_cfg(output_dir="elsewhere")) is not None
    staging = directory.staging()
    (staging / "extra.png").write_bytes(b"png")
    directory.finalize(staging, pd.DataFrame({"sample_id": ["a"], "context": ["long"], "answers": [["x", "y"]]}), {"score": 1.0}, cfg, overwrite=False)
    assert directory.is_complete() and (directory.path / "extra.png").exists()
    saved = pd.read_csv(directory.path / "predictions.csv")
    assert "context" not in saved and json.loads(saved["answers"][0]) == ["x", "y"]
    assert not directory.partial.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_a_corrupt_metrics_file_is_not_complete(tmp_path):
    directory = RunDirectory(tmp_path, "n")
    directory.path.mkdir()
    for name in ("predictions.csv", "config.yaml"):
        (directory.path / name).write_text("x")
    (directory.path / "metrics.json").write_text("{not json")
    assert not directory.is_complete()
