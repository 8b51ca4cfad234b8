"""Builders for fake ``results/<run_name>/`` trees, shaped exactly like the harness writes them.

Leaderboard and tracking tests share these so both read the same realistic files without running a model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from kvbench.results import run_identity, run_name

DEFAULT_SPEED = {
    "prefill_seconds": 0.40,
    "compression_seconds": 0.05,
    "ttft_seconds": 0.47,
    "seconds_per_token": 0.02,
    "kv_bytes_before": 8 * 1024 * 1024,
    "kv_bytes_after": 4 * 1024 * 1024,
    "peak_memory_bytes": 512 * 1024 * 1024,
}


def _speed_for(ratio: float) -> dict[str, float]:
    speed = dict(DEFAULT_SPEED)
    speed["kv_bytes_after"] = int(speed["kv_bytes_before"] * (1 - ratio))
    speed["seconds_per_token"] = 0.02 * (1 - ratio / 2)
    speed["compression_seconds"] = 0.0 if ratio == 0 else 0.05
    return speed


def make_config(dataset: str, model: str, press: str, ratio: float, query_aware: bool = False) -> dict[str, Any]:
    return {
        "model": {"name": model, "name_or_path": model, "dtype": "auto", "attn_implementation": "sdpa"},
        "dataset": {"name": dataset, "kind": "perplexity" if dataset == "pg19" else "generate",
                    "context_length": 1024, "num_samples": 5},
        "press": {"name": press, "window_size": 64, "kernel_size": 5, "pooling": "avg"},
        "compression_ratio": ratio,
        "budget": None,
        "query_aware": query_aware,
        "max_context_length": 8192,
        "seed": 42,
        "device": "auto",
        "output_dir": "results",
        "overwrite": False,
        "logger": {"name": "none"},
        "wandb": {"project": "kvbench", "mode": "offline", "group": None, "entity": None},
    }


def write_run(
    root: Path,
    dataset: str,
    model: str,
    press: str,
    ratio: float,
    score: float,
    *,
    query_aware: bool = False,
    variant: str = "",
    speed: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    predictions: pd.DataFrame | None = None,
    device_name: str | None = "Test CPU",
) -> Path:
    """Write one complete run dir (config.yaml, metrics.json, predictions.csv, identity.json) and return it."""
    name_variant = variant or ("query_aware" if query_aware else "")
    name = run_name(dataset, model, press, ratio, name_variant)
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = make_config(dataset, model, press, ratio, query_aware)
    for part in variant.split("__"):  # a variant is an override: the config (hence the identity) carries it
        key, sep, value = part.partition("=")
        if sep:
            group, dot, leaf = key.partition(".")
            if dot:  # press.window_size=32: a key of its group, as Hydra writes it
                config.setdefault(group, {})[leaf] = yaml.safe_load(value)
            else:
                section = config["dataset"] if key in config["dataset"] else config
                section[key] = yaml.safe_load(value)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    identity = run_identity(OmegaConf.create(config), dtype="float32", device_type="cpu", device_name=device_name)
    (run_dir / "identity.json").write_text(json.dumps(identity, indent=2))
    metrics: dict[str, Any] = {
        "score": score,
        "run_name": name,
        "dataset": dataset,
        "model": model,
        "press": press,
        "compression_ratio": ratio,
        "query_aware": query_aware,
        "variant": variant,
        "higher_is_better": dataset != "pg19",
        "num_samples": 5,
        "speed": dict(speed) if speed is not None else _speed_for(ratio),
    }
    metrics.update(extra or {})
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if predictions is None:
        predictions = pd.DataFrame(
            {
                "context": ["long context " * 50] * 2,
                "question": ["q1", "q2"],
                "answers": ["['a']", "['b']"],
                "prediction": ["a", "x"],
                "task": ["niah_single_1", "vt"],
            }
        )
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    return run_dir


def make_results_tree(root: Path) -> dict[str, Any]:
    """A small but complete sweep: RULER with 2 presses + query-aware + no_press, LongBench-E, PG-19,
    plus one corrupt, one incomplete and one hidden (in-progress) dir. Returns what the tests expect."""
    model = "smollm2-135m"
    expected: dict[tuple, float] = {}
    ruler = {"snapkv": {0.25: 81.0, 0.5: 74.5, 0.875: 40.25}, "knorm": {0.25: 70.0, 0.5: 55.0, 0.875: 12.0}}
    for press, scores in ruler.items():
        for ratio, score in scores.items():
            write_run(root, "ruler", model, press, ratio, score,
                      extra={"per_task": {"niah_single_1": score + 1, "vt": score - 1}})
            expected[("ruler", press, ratio, False)] = score
    for ratio, score in {0.5: 78.0, 0.875: 52.0}.items():
        write_run(root, "ruler", model, "snapkv", ratio, score, query_aware=True)
        expected[("ruler", "snapkv", ratio, True)] = score
    write_run(root, "ruler", model, "no_press", 0.0, 88.0,
              extra={"per_task": {"niah_single_1": 90.0, "vt": 86.0}})
    expected[("ruler", "no_press", 0.0, False)] = 88.0
    for press, ratio, score in (("no_press", 0.0, 40.0), ("snapkv", 0.5, 36.0), ("snapkv", 0.875, 30.0)):
        buckets = {"0-4k words": score + 2, "4-8k words": score, "8k+ words": score - 3}
        write_run(root, "longbench_e", model, press, ratio, score,
                  extra={"per_bucket": buckets, "per_task": {"qasper": score}})
        expected[("longbench_e", press, ratio, False)] = score
    for press, ratio, ppl in (("no_press", 0.0, 12.5), ("snapkv", 0.5, 13.75), ("snapkv", 0.875, 19.0),
                              ("knorm", 0.5, 15.0)):
        write_run(root, "pg19", model, press, ratio, ppl,
                  extra={"perplexity": ppl, "no_press_perplexity": 12.5, "delta": ppl - 12.5, "ratio": ppl / 12.5})
        expected[("pg19", press, ratio, False)] = ppl
    # A variant run is its own line, distinct from the plain press at the same ratio.
    write_run(root, "ruler", model, "snapkv", 0.5, 60.0, variant="context_length=4096")
    expected[("ruler", "snapkv [context_length=4096]", 0.5, False)] = 60.0

    corrupt = root / run_name("ruler", model, "tova", 0.5)
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text(yaml.safe_dump(make_config("ruler", model, "tova", 0.5)))
    (corrupt / "metrics.json").write_text('{"score": 1.0, "run_name": ')
    (corrupt / "predictions.csv").write_text("a,b\n1,2\n")
    incomplete = root / run_name("ruler", model, "expected_attention", 0.5)
    incomplete.mkdir()
    (incomplete / "config.yaml").write_text(yaml.safe_dump(make_config("ruler", model, "expected_attention", 0.5)))
    hidden = root / f".{run_name('ruler', model, 'streaming_llm', 0.5)}"
    write_run(root, "ruler", model, "streaming_llm", 0.5, 1.0).rename(hidden)
    return {
        "expected": expected,
        "corrupt": corrupt.name,
        "incomplete": incomplete.name,
        "hidden": hidden.name,
        "num_runs": len(expected),
    }


def offline_runs(wandb_dir: Path) -> list[Path]:
    """Offline run folders wandb wrote under ``<dir>/wandb/``, oldest first."""
    return sorted((Path(wandb_dir) / "wandb").glob("offline-run-*"))


def _wandb_log_payloads(path: Path) -> list[bytes]:
    # The .wandb file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version), then
    # 32 KiB blocks of records, each with a 7-byte header (crc32, little-endian length, chunk type).
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if pos + 7 + length > len(data):
            break  # record still being written
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    return payloads


def read_offline_run(run_folder: Path, timeout: float = 20.0) -> dict[str, Any]:
    """Summary, config, group, name and tags of an offline run, from the files wandb wrote.

    Older wandb versions write ``files/wandb-summary.json``; wandb-core (>= 0.19) keeps everything in
    the run's ``.wandb`` log until ``wandb sync``, so that log is decoded when the JSON is absent.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run_folder = Path(run_folder)
    log_file = next(run_folder.glob("*.wandb"))
    # wandb-core writes the log asynchronously: run.finish() can return before the file holds its
    # final "exit" record, so wait (bounded) for it instead of reading a half-written log.
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for payload in _wandb_log_payloads(log_file):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    info: dict[str, Any] = {"summary": {}, "config": {}, "group": "", "name": "", "tags": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["group"] = record.run.run_group
            info["name"] = record.run.display_name
            info["tags"] = list(record.run.tags)
            for item in record.run.config.update:
                info["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                info["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                if item.key:
                    info["summary"][item.key] = json.loads(item.value_json)
                elif item.nested_key:
                    node = info["summary"]
                    for key in item.nested_key[:-1]:
                        node = node.setdefault(key, {})
                    node[item.nested_key[-1]] = json.loads(item.value_json)
    summary_file = run_folder / "files" / "wandb-summary.json"
    if summary_file.is_file():
        info["summary"].update(json.loads(summary_file.read_text()))
    return info
