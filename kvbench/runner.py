"""One benchmark run: resolved config -> dataset -> prefill/compress/decode (or score) -> metrics -> results.

Knows no press and no benchmark in particular: presses come from the registry, datasets and metrics from
their registries, the dataset module's declared ``KIND`` picks question answering or perplexity.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass

import pandas as pd
import torch
from filelock import Timeout
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvbench import generation
from kvbench.datasets import dataset_kind, dataset_module, higher_is_better, load_dataset
from kvbench.errors import KVBenchError
from kvbench.metrics import metrics_module
from kvbench.models import ModelSpec, load_config, load_model, max_length, resolve_device, resolve_dtype
from kvbench.presses import build_press
from kvbench.results import SPEED_COLUMNS, RunDirectory, run_identity, run_name
from kvbench.tracking import check_logger

log = logging.getLogger("kvbench")
_MODELS: dict[ModelSpec, tuple] = {}  # one load per process, shared by every job of a multirun


def get_model(cfg: DictConfig, device: str):
    spec = ModelSpec(
        name_or_path=str(cfg.model.name_or_path),
        dtype=str(cfg.model.get("dtype", "auto")),
        attn_implementation=str(cfg.model.get("attn_implementation", "sdpa")),
        device=str(device),
    )
    if spec not in _MODELS:
        _MODELS.clear()  # a sweep over models keeps one in memory at a time
        _MODELS[spec] = load_model(spec)
    return _MODELS[spec]


def press_params(cfg: DictConfig) -> dict:
    params = {k: v for k, v in OmegaConf.to_container(cfg.press, resolve=True).items() if k != "name"}
    params["compression_ratio"] = float(cfg.compression_ratio)
    if cfg.get("budget") is not None:
        params["budget"] = int(cfg.budget)
    return params


def explicit_max_length(cfg: DictConfig) -> int | None:
    """``max_context_length`` as given: a positive integer, or None for "the model's maximum length"."""
    value = cfg.get("max_context_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVBenchError(f"max_context_length must be a positive integer or null (the model's maximum length), got {value!r}")
    return value


@functools.lru_cache(maxsize=8)
def _configured_max_length(name_or_path: str) -> int | None:
    return max_length(load_config(name_or_path))


def length_limit(cfg: DictConfig, model=None) -> int | None:
    """The longest sequence a run may feed the model: ``max_context_length``, else the model's
    ``max_position_embeddings`` (from the loaded model, or read from its config without the weights)."""
    explicit = explicit_max_length(cfg)
    if explicit is not None:
        return explicit
    if model is not None:
        return max_length(model.config)
    return _configured_max_length(str(cfg.model.name_or_path))


def lengths_under_test(module, dcfg) -> list[tuple[str, int]]:
    """The token lengths a dataset module declares as what it tests (``LENGTH_KEYS``), read from its config.

    An entry of ``LENGTH_KEYS`` names a config key, or a tuple of keys whose values add up (a perplexity
    window is its context plus its scored tokens); a list value (a grid of lengths) counts by its largest.
    """
    lengths = []
    for entry in getattr(module, "LENGTH_KEYS", ()):
        keys = (entry,) if isinstance(entry, str) else tuple(entry)
        largest = [_largest_int(dcfg.get(key)) for key in keys]
        if None not in largest:  # an unset or malformed value is the dataset's own error to report
            lengths.append((" + ".join(f"dataset.{key}" for key in keys), sum(largest)))
    return lengths


def _largest_int(value) -> int | None:
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    numbers = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(numbers) if numbers else None


def check_lengths(cfg: DictConfig) -> None:
    """Where the length is the test (RULER, needle, perplexity windows), a length the model may not see is
    refused here, before the model loads and before anything is written: cutting it would test another length."""
    lengths = lengths_under_test(dataset_module(cfg.dataset.name), cfg.dataset)
    if not lengths:
        return
    limit = length_limit(cfg)
    if limit is None:
        return
    implicit = explicit_max_length(cfg) is None
    for name, value in lengths:
        if value > limit:
            raise KVBenchError(
                f"{name}={value} is above max_context_length={limit}"
                + (" (the model's max_position_embeddings)" if implicit else "")
                + f"; lower {name.split(' + ')[0]}"
                + (", or set max_context_length to go past the model's length on purpose" if implicit else " or raise max_context_length")
            )


def validate(cfg: DictConfig) -> None:
    """Fail before loading anything heavy (the registries raise for unknown names)."""
    if dataset_kind(cfg.dataset.name) == "perplexity" and cfg.get("query_aware"):
        raise KVBenchError(f"query_aware=true does not apply to dataset '{cfg.dataset.name}': a perplexity dataset has no question "
                           f"to prefill before compression; drop query_aware")
    ratio = cfg.compression_ratio
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise KVBenchError(f"compression_ratio must be a number in [0, 1), got {ratio}")
    build_press(cfg.press.name, **press_params(cfg))
    check_lengths(cfg)


@dataclass
class RunContext:
    cfg: DictConfig
    model: object
    tokenizer: object
    press: object
    directory: RunDirectory
    max_length: int | None = None  # resolved max_context_length: no sequence the model sees is longer
    identity: dict | None = None  # what the checkpoint rows belong to (kvbench.results.run_identity)


def _speed_row(run: generation.ContextRun) -> dict:
    stats = run.compression
    before = stats.kv_bytes_before if stats.layers else run.kv_bytes_after
    return {
        "context_tokens": run.context_tokens,
        "prefill_seconds": run.prefill_seconds,
        "compression_seconds": stats.seconds,
        "kv_bytes_before": before,
        "kv_bytes_after": run.kv_bytes_after,
        "kv_kept_fraction": stats.kept_pairs / stats.total_pairs if stats.total_pairs else 1.0,
        "peak_memory_bytes": run.peak_memory_bytes,
    }


def generate_predictions(ctx: RunContext, df: pd.DataFrame, done: pd.DataFrame | None) -> pd.DataFrame:
    """Answer every row; rows sharing a context share one compressed prefill (unless query-aware)."""
    cfg = ctx.cfg
    finished = set(done["sample_id"]) if done is not None else set()
    todo = df[~df["sample_id"].isin(finished)]
    if cfg.query_aware:
        groups = [todo.iloc[[i]] for i in range(len(todo))]
    else:
        groups = [g for _, g in todo.groupby(["context", "answer_prefix"], sort=False)]
    window, warned, warned_cut = ctx.press.window, False, False
    records = []
    progress = tqdm(total=len(df), initial=len(finished), desc=f"{ctx.directory.name}", unit="sample", leave=False)
    for group in groups:
        first = group.iloc[0]
        use_chat = bool(first.get("chat_template", True)) if "chat_template" in group.columns else None
        prompt = generation.build_prompt(
            ctx.tokenizer,
            first["context"],
            list(group["question"]),
            first["answer_prefix"],
            use_chat_template=use_chat,
            query_aware=bool(cfg.query_aware),
            max_length=ctx.max_length,
            max_new_tokens=[int(x) for x in group["max_new_tokens"]],
        )
        if prompt.truncated_tokens and not warned_cut:
            log.warning("a prompt does not fit max_context_length=%d with its question and max_new_tokens: %d tokens were cut "
                        "from the middle of its context; metrics.json counts such samples (truncated_samples, max_truncated_tokens)",
                        ctx.max_length, prompt.truncated_tokens)
            warned_cut = True
        short = window is not None and prompt.context_ids.shape[-1] <= window and not ctx.press.is_noop(prompt.context_ids.shape[-1])
        if short and not warned:
            log.warning("context of %d tokens is not longer than the press window (%d): the whole window is kept; recorded as short_context",
                        prompt.context_ids.shape[-1], window)
            warned = True
        run = generation.answer_questions(ctx.model, ctx.tokenizer, prompt, ctx.press, [int(x) for x in group["max_new_tokens"]])
        speed = _speed_row(run)
        batch = []
        for (_, row), answer in zip(group.iterrows(), run.answers):
            record = {k: v for k, v in row.items() if k != "context"}
            record.update(speed)
            record.update(
                prediction=answer.text,
                output_tokens=len(answer.token_ids),
                ttft_seconds=answer.ttft_seconds,
                seconds_per_token=answer.seconds_per_token,
                truncated_tokens=prompt.truncated_tokens,
                short_context=bool(short),
            )
            batch.append(record)
        ctx.directory.checkpoint(ctx.identity, batch)
        records.extend(batch)
        progress.update(len(batch))
    progress.close()
    out = pd.DataFrame(records)
    if done is not None:
        out = pd.concat([done, out], ignore_index=True)
    order = {sid: i for i, sid in enumerate(df["sample_id"])}
    return out.sort_values("sample_id", key=lambda s: s.map(order)).reset_index(drop=True)


def perplexity_predictions(ctx: RunContext, windows: pd.DataFrame, done: pd.DataFrame | None) -> pd.DataFrame:
    """Score every window: its first ``context_tokens`` ids are prefilled (and compressed), the rest scored.

    A perplexity dataset yields one row per window with ``sample_id``, ``input_ids`` and ``context_tokens``
    (plus extras, kept in the predictions); where the windows lie is the dataset's business.
    """
    finished = set(done["sample_id"]) if done is not None else set()
    records = []
    for window in tqdm(windows.to_dict("records"), desc=ctx.directory.name, unit="window", leave=False):
        if window["sample_id"] in finished:
            continue
        ids = torch.tensor([list(window["input_ids"])], dtype=torch.long)
        split = int(window["context_tokens"])
        if ctx.max_length is not None and ids.shape[-1] > ctx.max_length:
            raise KVBenchError(f"a perplexity window of {ids.shape[-1]} tokens is above max_context_length={ctx.max_length}; "
                               f"use shorter windows or set max_context_length")
        nll, n, run = generation.continuation_nll(ctx.model, ids[:, :split], ids[:, split:], ctx.press)
        record = {k: v for k, v in window.items() if k != "input_ids"}
        record.update(nll_sum=nll, num_tokens=n, perplexity=math.exp(nll / n))
        record.update(_speed_row(run))
        record["teacher_forced_seconds"] = run.extra["teacher_forced_seconds"]
        ctx.directory.checkpoint(ctx.identity, [record])
        records.append(record)
    out = pd.DataFrame(records)
    return pd.concat([done, out], ignore_index=True) if done is not None else out


def sample_counts(predictions: pd.DataFrame) -> dict:
    """How much data stands behind the score, and how much of it was cut to fit the model.

    ``num_samples_per_task`` is the smallest task's count (the whole run when rows carry no task): one
    sample of a task with N samples moves that task's score by 100/N points.
    """
    if "task" in predictions and len(predictions):
        per_task = int(predictions.groupby("task").size().min())
    else:
        per_task = len(predictions)
    cut = pd.to_numeric(predictions["truncated_tokens"], errors="coerce").fillna(0) if "truncated_tokens" in predictions else pd.Series(dtype=float)
    return {
        "num_samples": len(predictions),
        "num_samples_per_task": per_task,
        "truncated_samples": int((cut > 0).sum()),
        "max_truncated_tokens": int(cut.max()) if len(cut) else 0,
    }


def summarize_speed(predictions: pd.DataFrame) -> dict:
    """One figure per ``SPEED_COLUMNS`` entry; None where nothing was measured (peak memory on CPU)."""
    speed = {}
    for col, how in SPEED_COLUMNS.items():
        if col in predictions:
            values = pd.to_numeric(predictions[col], errors="coerce").dropna()
            speed[col] = float(getattr(values, how)()) if len(values) else None
    return speed


def _baseline_metrics(cfg: DictConfig, variant: str) -> dict | None:
    """The finished no_press run of the same windows (query-awareness means nothing without compression)."""
    variant = "__".join(part for part in variant.split("__") if part and part != "query_aware")
    name = run_name(cfg.dataset.name, cfg.model.name, "no_press", 0.0, variant)
    baseline = RunDirectory(cfg.output_dir, name)
    return baseline.metrics() if baseline.is_complete() else None


def expected_identity(cfg: DictConfig) -> dict:
    """The run's identity, known before the model loads: ``device: auto`` and ``model.dtype: auto`` are resolved
    the way ``kvbench.models`` loads the model (cuda when available; float32 on CPU, bfloat16 on GPU)."""
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.model.get("dtype", "auto")), device)
    identity_cfg = cfg.copy()
    if cfg.press.name == "no_press":
        identity_cfg.compression_ratio = 0.0  # every ratio of a sweep shares the one uncompressed run
    return run_identity(identity_cfg, dtype=str(dtype).removeprefix("torch."), device_type=device.type)


def execute(cfg: DictConfig, variant: str = "") -> dict:
    """Run one configuration, or reuse its finished result when the recorded identity matches; return its metrics.

    Everything that can be refused (names, values, lengths, the logger) is checked before anything is written.
    Two processes given the same configuration at once: one computes under the run's lock, the other waits and
    then reuses the result.
    """
    validate(cfg)
    logger = check_logger(cfg)
    identity = expected_identity(cfg)
    ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
    name = run_name(cfg.dataset.name, cfg.model.name, cfg.press.name, ratio, variant)
    directory = RunDirectory(cfg.output_dir, name)
    lock = directory.lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[kvbench] {name}: another process is computing this configuration; waiting for it")
        lock.acquire()
    try:
        if directory.is_complete() and not cfg.overwrite:
            directory.check_identity(identity)
            print(f"[kvbench] {name}: already complete in {directory.path} (overwrite=true to rerun)")
            return directory.metrics()
        return _compute(cfg, variant, name, directory, identity, logger)
    finally:
        lock.release()


def _compute(cfg: DictConfig, variant: str, name: str, directory: RunDirectory, identity: dict, logger: str) -> dict:
    start = time.perf_counter()
    model, tokenizer = get_model(cfg, cfg.device)
    identity["dtype"] = str(model.dtype).removeprefix("torch.")  # the model's actual dtype is what counts
    torch.manual_seed(int(cfg.seed))
    press = build_press(cfg.press.name, **press_params(cfg))
    ctx = RunContext(cfg, model, tokenizer, press, directory, length_limit(cfg, model), identity)
    data = load_dataset(cfg.dataset.name, cfg.dataset, tokenizer)
    done = None if cfg.overwrite else directory.load_checkpoint(identity)
    if done is not None:
        print(f"[kvbench] {name}: resuming after {len(done)} finished samples")
    elif cfg.overwrite and directory.partial.exists():
        shutil.rmtree(directory.partial, ignore_errors=True)  # a rerun starts afresh, never appends to old rows
    kind = dataset_kind(cfg.dataset.name)
    predictions = perplexity_predictions(ctx, data, done) if kind == "perplexity" else generate_predictions(ctx, data, done)
    ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
    scorer = metrics_module(cfg.dataset.name)
    metrics = {"score": None, **scorer.compute(predictions)}
    metrics.update(
        run_name=name,
        dataset=cfg.dataset.name,
        model=cfg.model.name,
        press=cfg.press.name,
        compression_ratio=ratio,
        budget=cfg.get("budget"),
        query_aware=bool(cfg.query_aware),
        variant=variant,
        kind=kind,
        higher_is_better=higher_is_better(cfg.dataset.name),
        max_context_length=ctx.max_length,
        **sample_counts(predictions),
        short_contexts=int(predictions["short_context"].sum()) if "short_context" in predictions else 0,
        speed=summarize_speed(predictions),
        wall_seconds=time.perf_counter() - start,
        device=str(model.device),
    )
    if kind == "perplexity" and cfg.press.name != "no_press" and hasattr(scorer, "compare_to_baseline"):
        baseline = _baseline_metrics(cfg, variant)
        if baseline is not None:
            metrics.update(scorer.compare_to_baseline(metrics, baseline))
    staging = directory.staging()
    if hasattr(scorer, "write_artifacts"):
        scorer.write_artifacts(predictions, staging)
    path = directory.finalize(staging, predictions, metrics, cfg, identity, overwrite=bool(cfg.overwrite))
    if logger == "wandb":
        from kvbench.tracking import log_run

        log_run(cfg, metrics, predictions, path)
    print_summary(metrics, path)
    return metrics


def print_summary(metrics: dict, path) -> None:
    print(f"\n[kvbench] {metrics['run_name']}: score = {metrics['score']:.2f} over {metrics['num_samples']} samples "
          f"({'higher' if metrics['higher_is_better'] else 'lower'} is better)")
    if metrics.get("truncated_samples"):
        print(f"truncated: {metrics['truncated_samples']} samples cut to max_context_length={metrics['max_context_length']} "
              f"(up to {metrics['max_truncated_tokens']} tokens each)")
    for key in ("per_task", "per_bucket"):
        if metrics.get(key):
            table = pd.Series(metrics[key], name="score").round(2)
            print(table.to_string())
    speed = metrics.get("speed", {})
    if speed:
        print("speed: " + ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=n/a" for k, v in speed.items()))
    print(f"elapsed: {metrics['wall_seconds']:.1f} s (model load, data and the run itself)")
    print(f"results: {path}")
