"""One benchmark run: resolved config -> dataset -> prefill/compress/decode (or score) -> metrics -> results.

Knows no press and no benchmark in particular: presses come from the registry, datasets and metrics from
their registries, the dataset's ``kind`` picks question answering or perplexity.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvbench import generation
from kvbench.datasets import dataset_module, load_dataset
from kvbench.errors import KVBenchError
from kvbench.metrics import metrics_module
from kvbench.models import ModelSpec, load_model
from kvbench.presses import build_press
from kvbench.results import RunDirectory, run_name

log = logging.getLogger("kvbench")
_MODELS: dict[ModelSpec, tuple] = {}  # one load per process, shared by every job of a multirun
SPEED_COLUMNS = {
    "prefill_seconds": "mean",
    "compression_seconds": "mean",
    "ttft_seconds": "mean",
    "seconds_per_token": "mean",
    "kv_bytes_before": "mean",
    "kv_bytes_after": "mean",
    "kv_kept_fraction": "mean",
    "peak_memory_bytes": "max",
}


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


def validate(cfg: DictConfig) -> None:
    """Fail before loading anything heavy (the registries raise for unknown names)."""
    dataset_module(cfg.dataset.name)
    ratio = cfg.compression_ratio
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise KVBenchError(f"compression_ratio must be a number in [0, 1), got {ratio}")
    build_press(cfg.press.name, **press_params(cfg))


@dataclass
class RunContext:
    cfg: DictConfig
    model: object
    tokenizer: object
    press: object
    directory: RunDirectory


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


def _window_of(press) -> int | None:
    inner = getattr(press, "press", press)
    return getattr(inner, "window_size", None)


def generate_predictions(ctx: RunContext, df: pd.DataFrame, done: pd.DataFrame | None) -> pd.DataFrame:
    """Answer every row; rows sharing a context share one compressed prefill (unless query-aware)."""
    cfg = ctx.cfg
    finished = set(done["sample_id"]) if done is not None else set()
    todo = df[~df["sample_id"].isin(finished)]
    if cfg.query_aware:
        groups = [todo.iloc[[i]] for i in range(len(todo))]
    else:
        groups = [g for _, g in todo.groupby(["context", "answer_prefix"], sort=False)]
    window, warned = _window_of(ctx.press), False
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
            max_context_length=cfg.max_context_length,
        )
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
        ctx.directory.checkpoint(cfg, batch)
        records.extend(batch)
        progress.update(len(batch))
    progress.close()
    out = pd.DataFrame(records)
    if done is not None:
        out = pd.concat([done, out], ignore_index=True)
    order = {sid: i for i, sid in enumerate(df["sample_id"])}
    return out.sort_values("sample_id", key=lambda s: s.map(order)).reset_index(drop=True)


def perplexity_windows(tokenizer, books: pd.DataFrame, dcfg: DictConfig) -> list[dict]:
    """Token windows per book: ``context_length`` prefilled (compressed), the next ``eval_length`` scored."""
    context_length, eval_length = int(dcfg.context_length), int(dcfg.eval_length)
    stride, limit = int(dcfg.get("stride", context_length + eval_length)), dcfg.get("max_windows_per_book")
    windows = []
    for _, book in books.iterrows():
        ids = tokenizer(book["text"], add_special_tokens=False)["input_ids"]
        starts = range(0, len(ids) - context_length - eval_length + 1, stride)
        for i, start in enumerate(starts):
            if limit is not None and i >= int(limit):
                break
            windows.append({"id": book["id"], "window": i, "start": start, "ids": ids[start : start + context_length + eval_length]})
    if not windows:
        raise KVBenchError(f"no book is longer than context_length + eval_length = {context_length + eval_length} tokens; lower dataset.context_length")
    return windows


def perplexity_predictions(ctx: RunContext, books: pd.DataFrame, done: pd.DataFrame | None) -> pd.DataFrame:
    dcfg = ctx.cfg.dataset
    windows = perplexity_windows(ctx.tokenizer, books, dcfg)
    finished = set(done["sample_id"]) if done is not None else set()
    records = []
    context_length = int(dcfg.context_length)
    for window in tqdm(windows, desc=ctx.directory.name, unit="window", leave=False):
        sample_id = f"{window['id']}-{window['window']:03d}"
        if sample_id in finished:
            continue
        ids = torch.tensor([window["ids"]])
        nll, n, run = generation.continuation_nll(ctx.model, ids[:, :context_length], ids[:, context_length:], ctx.press)
        record = {"sample_id": sample_id, "id": window["id"], "window": window["window"], "start": window["start"],
                  "nll_sum": nll, "num_tokens": n, "perplexity": math.exp(nll / n)}
        record.update(_speed_row(run))
        record["teacher_forced_seconds"] = run.extra["teacher_forced_seconds"]
        ctx.directory.checkpoint(ctx.cfg, [record])
        records.append(record)
    out = pd.DataFrame(records)
    return pd.concat([done, out], ignore_index=True) if done is not None else out


def summarize_speed(predictions: pd.DataFrame) -> dict:
    return {col: float(getattr(predictions[col], how)()) for col, how in SPEED_COLUMNS.items() if col in predictions}


def _baseline_metrics(cfg: DictConfig, variant: str) -> dict | None:
    """The finished no_press run of the same windows (query-awareness means nothing without compression)."""
    variant = "__".join(part for part in variant.split("__") if part and part != "query_aware")
    name = run_name(cfg.dataset.name, cfg.model.name, "no_press", 0.0, variant)
    baseline = RunDirectory(cfg.output_dir, name)
    return baseline.metrics() if baseline.is_complete() else None


def execute(cfg: DictConfig, variant: str = "") -> dict:
    """Run one configuration (or skip it if already complete); return its metrics."""
    validate(cfg)
    ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
    name = run_name(cfg.dataset.name, cfg.model.name, cfg.press.name, ratio, variant)
    directory = RunDirectory(cfg.output_dir, name)
    if directory.is_complete() and not cfg.overwrite:
        print(f"[kvbench] {name}: already complete in {directory.path} (overwrite=true to rerun)")
        return directory.metrics()
    start = time.perf_counter()
    model, tokenizer = get_model(cfg, cfg.device)
    torch.manual_seed(int(cfg.seed))
    press = build_press(cfg.press.name, **press_params(cfg))
    ctx = RunContext(cfg, model, tokenizer, press, directory)
    data = load_dataset(cfg.dataset.name, cfg.dataset, tokenizer)
    done = None if cfg.overwrite else directory.load_checkpoint(cfg)
    if done is not None:
        print(f"[kvbench] {name}: resuming after {len(done)} finished samples")
    kind = cfg.dataset.get("kind", "generate")
    predictions = perplexity_predictions(ctx, data, done) if kind == "perplexity" else generate_predictions(ctx, data, done)
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
        higher_is_better=metrics.get("higher_is_better", True),
        num_samples=len(predictions),
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
    path = directory.finalize(staging, predictions, metrics, cfg, overwrite=bool(cfg.overwrite))
    if cfg.get("logger", {}).get("name") == "wandb":
        from kvbench.tracking import log_run

        log_run(cfg, metrics, predictions, path)
    print_summary(metrics, path)
    return metrics


def print_summary(metrics: dict, path) -> None:
    print(f"\n[kvbench] {metrics['run_name']}: score = {metrics['score']:.2f} over {metrics['num_samples']} samples "
          f"({'higher' if metrics['higher_is_better'] else 'lower'} is better)")
    for key in ("per_task", "per_bucket"):
        if metrics.get(key):
            table = pd.Series(metrics[key], name="score").round(2)
            print(table.to_string())
    speed = metrics.get("speed", {})
    if speed:
        print("speed: " + ", ".join(f"{k}={v:.4g}" for k, v in speed.items()))
    print(f"results: {path}")
