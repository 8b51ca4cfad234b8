"""One benchmark run: resolved config -> dataset -> prefill/compress/decode (or score) -> metrics -> results.

Knows no press and no benchmark in particular: presses come from the registry, datasets and metrics from
their registries, the dataset module's declared ``KIND`` picks question answering or perplexity.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import pandas as pd
import torch
from filelock import Timeout
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvbench import baseline, generation
from kvbench.compression import LAYOUTS
from kvbench.datasets import check_config, data_inputs, dataset_kind, dataset_module, higher_is_better, load_dataset
from kvbench.device import device_model
from kvbench.errors import KVBenchError
from kvbench.metrics import metrics_module
from kvbench.model_access import batch_dependent_rope
from kvbench.models import (ModelSpec, check_attn_implementation, load_config, load_model, max_length, model_inputs,
                            resolve_device, resolve_dtype)
from kvbench.presses import build_press, check_attention
from kvbench.results import (SPEED_COLUMNS, RunDirectory, create_output_dir, identity_apart_from, identity_difference,
                             run_identity, run_name)
from kvbench.known_keys import check_known_keys
from kvbench.tracking import check_logger

log = logging.getLogger("kvbench")
_MODELS: dict[ModelSpec, tuple] = {}  # one load per process, shared by every job of a multirun


def model_revision(cfg: DictConfig) -> str | None:
    """``model.revision``: a hub id's branch, tag or commit; None (the default) reads main."""
    value = cfg.model.get("revision")
    return None if value is None else str(value)


def get_model(cfg: DictConfig, device: str):
    spec = ModelSpec(
        name_or_path=str(cfg.model.name_or_path),
        dtype=str(cfg.model.get("dtype", "auto")),
        attn_implementation=str(cfg.model.get("attn_implementation", "sdpa")),
        device=str(device),
        revision=model_revision(cfg),
    )
    if spec not in _MODELS:
        _MODELS.clear()  # a sweep over models keeps one in memory at a time
        _MODELS[spec] = load_model(spec)
    return _MODELS[spec]


def press_params(cfg: DictConfig) -> dict:
    params = {k: v for k, v in OmegaConf.to_container(cfg.press, resolve=True).items() if k != "name"}
    params["compression_ratio"] = float(cfg.compression_ratio)
    if cfg.get("budget") is not None:
        params["budget"] = cfg.budget
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
def _configured_max_length(name_or_path: str, revision: str | None) -> int | None:
    return max_length(load_config(name_or_path, revision))


def length_limit(cfg: DictConfig, model=None) -> int | None:
    """The longest sequence a run may feed the model: ``max_context_length``, else the model's
    ``max_position_embeddings`` (from the loaded model, or read from its config without the weights)."""
    explicit = explicit_max_length(cfg)
    if explicit is not None:
        return explicit
    if model is not None:
        return max_length(model.config)
    return _configured_max_length(str(cfg.model.name_or_path), model_revision(cfg))


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
    """The largest whole number among the values: ``9000.0`` is the length 9000 the dataset builds, so it is
    checked as one (skipping it would let the prompt be cut silently)."""
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    numbers = [int(v) for v in values
               if (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())]
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


def check_budget_alone(cfg: DictConfig, overrides: list[str]) -> None:
    """``budget`` keeps N tokens per head whatever the ratio says: a ratio given beside it would name and record a run
    that does not use it (and a sweep over ratios would compute one run under several names). Checked for every
    job, by the entry point and by the shared-prefill launcher (which runs its jobs without the entry point)."""
    if cfg.get("budget") is None:
        return
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "compression_ratio":
            raise KVBenchError(f"budget={cfg.budget} keeps {cfg.budget} tokens per head whatever compression_ratio says; "
                               f"drop compression_ratio={value} (or budget)")


def exit_interrupted(output_dir: str) -> NoReturn:
    """Ctrl-C: one line instead of the stack, exit 130. Every finished sample is already in its run's checkpoint
    (``<output_dir>/.partial/<run>/``), which the same command resumes from."""
    print(f"interrupted: the samples finished so far are kept under {output_dir}/.partial; rerun the same "
          "command to resume from them", file=sys.stderr)
    sys.exit(130)


def validate(cfg: DictConfig) -> None:
    """Fail before loading anything heavy (the registries raise for unknown names)."""
    check_known_keys(cfg)
    if not str(cfg.model.get("name") or "").strip():
        raise KVBenchError("model.name must name the model in result directories (e.g. model.name=my-llama), got nothing")
    for key in ("budget", "seed"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KVBenchError(f"{key} must be an integer{' or null' if key == 'budget' else ''}, got {value!r}")
    for key in ("query_aware", "overwrite"):  # bool("no") is True: overwrite=no would replace a finished result
        if not isinstance(cfg.get(key, False), bool):
            raise KVBenchError(f"{key} must be true or false, got {cfg.get(key)!r}")
    if dataset_kind(cfg.dataset.name) == "perplexity" and cfg.get("query_aware"):
        raise KVBenchError(f"query_aware=true does not apply to dataset '{cfg.dataset.name}': a perplexity dataset has no question "
                           f"to prefill before compression; drop query_aware")
    ratio = cfg.compression_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise KVBenchError(f"compression_ratio must be a number in [0, 1), got {ratio}")
    decode_tokens = cfg.get("decode_timing_tokens", 0)
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 0 or decode_tokens == 1:
        raise KVBenchError(f"decode_timing_tokens must be 0 (off) or an integer >= 2 (seconds per token are timed after "
                           f"the first token), got {decode_tokens!r}")
    if decode_tokens and dataset_kind(cfg.dataset.name) != "perplexity":
        raise KVBenchError(f"decode_timing_tokens applies to perplexity datasets; dataset '{cfg.dataset.name}' times its own "
                           f"decoding (ttft_seconds, seconds_per_token); drop decode_timing_tokens")
    batch_size = cfg.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KVBenchError(f"batch_size must be a positive integer, got {batch_size!r}")
    layout = cfg.get("cache_layout", "packed")
    if layout not in LAYOUTS:
        raise KVBenchError(f"cache_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if batch_size > 1 and layout != "packed":
        raise KVBenchError("batch_size > 1 needs cache_layout=packed (each context keeps its own length); use batch_size=1 "
                           "to compare with the masked layout")
    check_attn_implementation(str(cfg.model.get("attn_implementation", "sdpa")))
    check_config(cfg.dataset.name, cfg.dataset)
    press = build_press(cfg.press.name, **press_params(cfg))
    check_attention(cfg.press.name, press, cfg.model.get("attn_implementation", "sdpa"), "set model.attn_implementation=eager")
    check_lengths(cfg)


@dataclass
class Job:
    """One configuration of a run group: where its result goes, what it must match, its press and its rows."""

    cfg: DictConfig
    variant: str
    name: str
    directory: RunDirectory
    identity: dict
    logger: str
    press: object = None
    done: pd.DataFrame | None = None
    records: list = field(default_factory=list)
    warned_short: bool = False

    @property
    def where(self) -> Path:
        """The result directory, resolved: configurations naming one directory (however spelled) are one job."""
        return self.directory.path.resolve()

    def finished(self) -> set:
        return set(self.done["sample_id"]) if self.done is not None else set()


@dataclass
class RunContext:
    """What the jobs of a group share: one model, one tokenizer, one length limit, one dataset."""

    cfg: DictConfig
    model: object
    tokenizer: object
    jobs: list[Job]
    max_length: int | None = None  # resolved max_context_length: no sequence the model sees is longer

    @property
    def batch_size(self) -> int:
        return int(self.cfg.get("batch_size", 1))

    @property
    def layout(self) -> str:
        return str(self.cfg.get("cache_layout", "packed"))


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


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _warn_short(job: Job, context_tokens: int) -> bool:
    window = job.press.window
    short = window is not None and context_tokens <= window and not job.press.is_noop(context_tokens)
    if short and not job.warned_short:
        log.warning("%s: context of %d tokens is not longer than the press window (%d): the whole window is kept; "
                    "recorded as short_context", job.name, context_tokens, window)
        job.warned_short = True
    return short


def _prompt(ctx: RunContext, group: pd.DataFrame) -> generation.Prompt:
    """The token ids of one context and its questions, cut in the middle where they do not fit max_context_length."""
    first = group.iloc[0]
    use_chat = bool(first.get("chat_template", True)) if "chat_template" in group.columns else None
    return generation.build_prompt(
        ctx.tokenizer, first["context"], list(group["question"]), first["answer_prefix"],
        use_chat_template=use_chat, query_aware=bool(ctx.cfg.query_aware), max_length=ctx.max_length,
        max_new_tokens=[int(x) for x in group["max_new_tokens"]],
    )


def _stop_texts(group: pd.DataFrame) -> list[str | None]:
    """Each question's ``stop_text`` (a dataset's optional column: where its benchmark ends an answer), else None."""
    if "stop_text" not in group.columns:
        return [None] * len(group)
    return [text if isinstance(text, str) and text else None for text in group["stop_text"]]


def _refuse_cut(prompt: generation.Prompt, group: pd.DataFrame, max_length: int, length_key: str) -> None:
    """Where the length is the test, a prompt that would lose part of its context is refused: the cut sample
    would test a shorter context (and a needle could go with the cut)."""
    if prompt.truncated_tokens:
        raise KVBenchError(
            f"sample {group['sample_id'].iloc[0]} takes {max_length + prompt.truncated_tokens} tokens with its chat "
            f"template, question and max_new_tokens, above max_context_length={max_length}; cutting it would test another "
            f"length: lower {length_key.split(' + ')[0]} or raise max_context_length"
        )


def generate_predictions(ctx: RunContext, df: pd.DataFrame) -> None:
    """Answer every row for every job; rows sharing a context share one prefill (unless query-aware), contexts
    are prefilled ``batch_size`` at a time, and every job's press compresses the same prefill."""
    cfg = ctx.cfg
    if cfg.query_aware:
        groups = [df.iloc[[i]] for i in range(len(df))]
    else:
        groups = [g for _, g in df.groupby(["context", "answer_prefix"], sort=False)]
    warned_cut = False
    tested = lengths_under_test(dataset_module(cfg.dataset.name), cfg.dataset)
    if tested and ctx.max_length is not None:
        for group in groups:  # before any prefill, so a refusal leaves nothing half-written
            _refuse_cut(_prompt(ctx, group), group, ctx.max_length, tested[0][0])
    progress = tqdm(total=len(df), desc=ctx.jobs[0].name if len(ctx.jobs) == 1 else f"{len(ctx.jobs)} jobs",
                    unit="sample", leave=False)
    for batch in _batches(groups, ctx.batch_size):
        ids = set().union(*(set(g["sample_id"]) for g in batch))
        jobs = [job for job in ctx.jobs if not ids <= job.finished()]
        if not jobs:
            progress.update(sum(len(g) for g in batch))
            continue
        prompts = []
        for group in batch:
            prompt = _prompt(ctx, group)
            if prompt.truncated_tokens and not warned_cut:
                log.warning("a prompt does not fit max_context_length=%d with its question and max_new_tokens: %d tokens were "
                            "cut from the middle of its context; metrics.json counts such samples (truncated_samples, "
                            "max_truncated_tokens)", ctx.max_length, prompt.truncated_tokens)
                warned_cut = True
            prompts.append(prompt)
        budgets = [[int(x) for x in g["max_new_tokens"]] for g in batch]
        runs = generation.answer_prompts(ctx.model, ctx.tokenizer, prompts, [j.press for j in jobs], budgets, ctx.layout,
                                         [_stop_texts(g) for g in batch])
        for job, job_runs in zip(jobs, runs):
            rows = []
            for group, prompt, run in zip(batch, prompts, job_runs):
                short = _warn_short(job, prompt.context_ids.shape[-1])
                speed = _speed_row(run)
                for (_, row), answer in zip(group.iterrows(), run.answers):
                    if row["sample_id"] in job.finished():
                        continue
                    record = {k: v for k, v in row.items() if k != "context"}
                    record.update(speed)
                    # time to first token: the context's prefill (compression included), then the question's pass
                    record.update(prediction=answer.text, output_tokens=len(answer.token_ids),
                                  question_seconds=answer.question_seconds,
                                  ttft_seconds=run.prefill_seconds + answer.question_seconds,
                                  seconds_per_token=answer.seconds_per_token, truncated_tokens=prompt.truncated_tokens,
                                  short_context=bool(short))
                    rows.append(record)
            job.directory.checkpoint(job.identity, rows)
            job.records.extend(rows)
        progress.update(sum(len(g) for g in batch))
    progress.close()


def perplexity_predictions(ctx: RunContext, windows: pd.DataFrame) -> None:
    """Score every window for every job: its first ``context_tokens`` ids are prefilled (and compressed), the
    rest scored; ``batch_size`` windows at a time, one prefill for all the jobs' presses.

    A perplexity dataset yields one row per window with ``sample_id``, ``input_ids`` and ``context_tokens``
    (plus extras, kept in the predictions); where the windows lie is the dataset's business.
    """
    rows_in = windows.to_dict("records")
    decode_tokens = int(ctx.cfg.get("decode_timing_tokens", 0))
    for window in rows_in:
        if ctx.max_length is not None and len(window["input_ids"]) > ctx.max_length:
            raise KVBenchError(f"a perplexity window of {len(window['input_ids'])} tokens is above max_context_length="
                               f"{ctx.max_length}; use shorter windows or set max_context_length")
        if ctx.max_length is not None and int(window["context_tokens"]) + decode_tokens > ctx.max_length:
            raise KVBenchError(f"decode_timing_tokens={decode_tokens} after a {window['context_tokens']}-token context passes "
                               f"max_context_length={ctx.max_length}; lower decode_timing_tokens")
    progress = tqdm(total=len(rows_in), desc=ctx.jobs[0].name if len(ctx.jobs) == 1 else f"{len(ctx.jobs)} jobs",
                    unit="window", leave=False)
    for batch in _batches(rows_in, ctx.batch_size):
        jobs = [job for job in ctx.jobs if not {w["sample_id"] for w in batch} <= job.finished()]
        if jobs:
            ids = [torch.tensor([list(w["input_ids"])], dtype=torch.long) for w in batch]
            splits = [int(w["context_tokens"]) for w in batch]
            scored = generation.continuations_nll(ctx.model, [i[:, :s] for i, s in zip(ids, splits)],
                                                  [i[:, s:] for i, s in zip(ids, splits)], [j.press for j in jobs], ctx.layout,
                                                  decode_tokens)
            for job, results in zip(jobs, scored):
                rows = []
                for window, (nll, n, run) in zip(batch, results):
                    if window["sample_id"] in job.finished():
                        continue
                    record = {k: v for k, v in window.items() if k != "input_ids"}
                    record.update(nll_sum=nll, num_tokens=n, perplexity=math.exp(nll / n))
                    record.update(_speed_row(run))
                    record["teacher_forced_seconds"] = run.extra["teacher_forced_seconds"]
                    if "decode_seconds_per_token" in run.extra:
                        # the first scored token comes out of the prefill; later ones are decoded over the cache
                        record.update(ttft_seconds=run.prefill_seconds, seconds_per_token=run.extra["decode_seconds_per_token"])
                    rows.append(record)
                job.directory.checkpoint(job.identity, rows)
                job.records.extend(rows)
        progress.update(len(batch))
    progress.close()


def _predictions(job: Job, data: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(job.records)
    if job.done is not None:
        out = pd.concat([job.done, out], ignore_index=True)
    order = {sid: i for i, sid in enumerate(data["sample_id"])}
    return out.sort_values("sample_id", key=lambda s: s.map(order)).reset_index(drop=True)


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


PREFILL_FREE_KEYS = ("press", "compression_ratio", "budget")


def expected_identity(cfg: DictConfig, *, name_device: bool = True) -> dict:
    """The run's identity, known before the model loads: ``device: auto`` and ``model.dtype: auto`` are resolved
    the way ``kvbench.models`` loads the model (cuda when available; float32 on CPU, bfloat16 on GPU).

    ``name_device=False`` leaves the device's name out (None): naming a GPU initialises CUDA, which the launching
    process of a multi-GPU sweep must not do before its workers pin their GPUs."""
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.model.get("dtype", "auto")), device)
    inputs = {"data": data_inputs(cfg.dataset.name, cfg.dataset), "model": model_inputs(str(cfg.model.name_or_path), model_revision(cfg))}
    return run_identity(recorded_config(cfg), dtype=str(dtype).removeprefix("torch."), device_type=device.type,
                        device_name=device_model(device) if name_device else None, inputs=inputs)


def launch_directory() -> str | None:
    """The Hydra job directory this process runs in (None outside Hydra): a requeued SLURM task runs again in
    its own, every new command gets a new one (its name has the launch time)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return str(Path(HydraConfig.get().runtime.output_dir).resolve())


def recorded_config(cfg: DictConfig) -> DictConfig:
    """The configuration a run is and records (identity and ``config.yaml``): no_press at any ratio of a sweep is
    the one uncompressed run, ratio 0, whichever job of the sweep computes it."""
    if cfg.press.name != "no_press":
        return cfg
    recorded = cfg.copy()
    recorded.compression_ratio = 0.0
    return recorded


def prefill_group_key(cfg: DictConfig) -> str:
    """What jobs must share to share one prefill: the run identity without the press and how much it removes.

    Computed in the launching process, so without the device's name: every job of one launcher resolves the
    same device there, and each worker checks the full identity of its own jobs."""
    return json.dumps(identity_apart_from(expected_identity(cfg, name_device=False), PREFILL_FREE_KEYS), sort_keys=True)


def _prepare(cfg: DictConfig, variant: str) -> Job:
    """Everything that can be refused (names, values, lengths, the logger) is checked here, before anything is
    written."""
    validate(cfg)
    logger = check_logger(cfg)
    identity = expected_identity(cfg)
    directory = result_directory(cfg, variant)
    create_output_dir(cfg.output_dir)
    return Job(cfg, variant, directory.name, directory, identity, logger)


def result_directory(cfg: DictConfig, variant: str = "") -> RunDirectory:
    """Where a configuration's result goes: no_press at every ratio is the one directory of ratio 0."""
    ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
    return RunDirectory(cfg.output_dir, run_name(cfg.dataset.name, cfg.model.name, cfg.press.name, ratio, variant))


def _acquire(job: Job) -> None:
    lock = job.directory.lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[kvbench] {job.name}: another process is computing this configuration; waiting for it")
        lock.acquire()


def execute(cfg: DictConfig, variant: str = "") -> dict:
    """Run one configuration, or reuse its finished result when the recorded identity matches; return its metrics.

    Two processes given the same configuration at once: one computes under the run's lock, the other waits and
    then reuses the result.
    """
    outcome = execute_many([(cfg, variant)])[0]
    if isinstance(outcome, KVBenchError):
        raise outcome
    return outcome


def execute_many(configs: list[tuple[DictConfig, str]]) -> list[dict | KVBenchError]:
    """Run configurations that differ only in press and ratio over one prefill per sample; per configuration its
    metrics, or the ``KVBenchError`` that refused it.

    Each still gets its own ordinary result directory, identity, checkpoint and lock, exactly as if run alone
    (configurations naming one directory, such as no_press at several ratios, are computed once, by the first).
    Finished ones are reused; the rest are computed together. A configuration refused on its own (its values, or
    a finished directory of another setup) gets its error in its place, and the others still run, as they would
    one by one. An error of the shared computation itself (the prefill) is raised.
    """
    outcomes: dict[int, dict | KVBenchError] = {}
    jobs: dict[int, Job] = {}
    for i, (cfg, variant) in enumerate(configs):
        try:
            jobs[i] = _prepare(cfg, variant)
        except KVBenchError as exc:
            outcomes[i] = exc
    if len({prefill_group_key(job.cfg) for job in jobs.values()}) > 1:
        raise KVBenchError("execute_many takes configurations that differ only in press, compression_ratio and budget; "
                           "group the others apart (the shared_prefill launcher does)")
    unique: dict[Path, Job] = {}
    for i, job in list(jobs.items()):
        first = unique.setdefault(job.where, job)  # the first of the configurations sharing a directory computes it
        diff = identity_difference(first.identity, job.identity)
        if diff:  # one name for two setups (a ratio past the name's 6 decimals): one result cannot stand for both
            outcomes[i] = KVBenchError(f"{job.directory.path} is also the directory of another configuration of this sweep "
                                       f"({'; '.join(diff[:6])}); their names cannot tell them apart, so run them apart")
            del jobs[i]
    results: dict[Path, dict | KVBenchError] = {}
    held = []
    try:
        for job in sorted(unique.values(), key=lambda j: str(j.where)):  # one order for every process: no deadlock
            _acquire(job)
            held.append(job)
            job.directory.remove_leftovers()
        pending = []
        for path, job in unique.items():
            if job.directory.is_complete() and not job.cfg.overwrite:
                try:
                    job.directory.check_identity(job.identity)
                except KVBenchError as exc:
                    results[path] = exc
                    continue
                print(f"[kvbench] {job.name}: already complete in {job.directory.path} (overwrite=true to rerun)")
                job.directory.discard_checkpoint()  # left by a kill after the result was published
                _mend_comparisons(job)
                results[path] = job.directory.metrics()
            else:
                pending.append(job)
        if pending:
            results.update(_compute(pending))
    finally:
        for job in held:
            job.directory.lock().release()
    outcomes.update({i: results[job.where] for i, job in jobs.items()})
    return [outcomes[i] for i in range(len(configs))]


def _compute(jobs: list[Job]) -> dict[Path, dict]:
    start = time.perf_counter()
    cfg = jobs[0].cfg
    model, tokenizer = get_model(cfg, cfg.device)
    rope = batch_dependent_rope(model)
    if rope and int(cfg.get("batch_size", 1)) > 1:
        raise KVBenchError(f"batch_size={cfg.batch_size} cannot run {cfg.model.name_or_path}: its '{rope}' RoPE takes its "
                           f"frequencies from the longest context of a batch, so batching would change the shorter ones' "
                           f"numbers; use batch_size=1")
    torch.manual_seed(int(cfg.seed))
    for job in jobs:
        # The model's actual dtype and device are what count.
        job.identity["dtype"] = str(model.dtype).removeprefix("torch.")
        job.identity["device_name"] = device_model(model.device)
        job.press = build_press(job.cfg.press.name, **press_params(job.cfg))
        if job.cfg.overwrite:  # a rerun starts afresh, never appends to old rows, unless it is this launch's own
            job.done = job.directory.start_over(job.identity, launch_directory())
        else:
            job.done = job.directory.load_checkpoint(job.identity)
        if job.done is not None:
            print(f"[kvbench] {job.name}: resuming after {len(job.done)} finished samples")
    ctx = RunContext(cfg, model, tokenizer, jobs, length_limit(cfg, model))
    data = load_dataset(cfg.dataset.name, cfg.dataset, tokenizer)
    kind = dataset_kind(cfg.dataset.name)
    (perplexity_predictions if kind == "perplexity" else generate_predictions)(ctx, data)
    # The baseline first: perplexity runs compare themselves with the finished no_press run.
    ordered = sorted(jobs, key=lambda job: job.cfg.press.name != "no_press")
    return {job.where: _finish(job, _predictions(job, data), kind, ctx, start, len(jobs)) for job in ordered}


def _finish(job: Job, predictions: pd.DataFrame, kind: str, ctx: RunContext, start: float, group_size: int) -> dict:
    cfg = job.cfg
    ratio = 0.0 if cfg.press.name == "no_press" else float(cfg.compression_ratio)
    scorer = metrics_module(cfg.dataset.name)
    metrics = {"score": None, **scorer.compute(predictions)}
    metrics.update(
        run_name=job.name,
        dataset=cfg.dataset.name,
        model=cfg.model.name,
        press=cfg.press.name,
        compression_ratio=ratio,
        budget=cfg.get("budget"),
        query_aware=bool(cfg.query_aware),
        variant=job.variant,
        kind=kind,
        higher_is_better=higher_is_better(cfg.dataset.name),
        max_context_length=ctx.max_length,
        **sample_counts(predictions),
        short_contexts=int(predictions["short_context"].sum()) if "short_context" in predictions else 0,
        speed=summarize_speed(predictions),
        wall_seconds=time.perf_counter() - start,
        jobs_sharing_prefill=group_size,
        device=str(ctx.model.device),
        device_name=job.identity["device_name"],
    )
    compared = kind == "perplexity" and hasattr(scorer, "compare_to_baseline")
    filled: list = []  # compressed runs that finished before this baseline, given their comparison now
    with baseline.comparison_lock(cfg) if compared else nullcontext():
        if compared and cfg.press.name != "no_press":
            reference = baseline.baseline_metrics(cfg, job.identity)
            if reference is not None:
                metrics.update(scorer.compare_to_baseline(metrics, reference))
        path = _finalize(job, scorer, predictions, metrics)
        if compared and cfg.press.name == "no_press":
            filled = _writing_comparisons(job, lambda: baseline.fill_in_comparisons(cfg, job.identity, metrics,
                                                                                    scorer.compare_to_baseline))
            for run, added in filled:
                print(f"[kvbench] {run.name}: compared with this no_press run, which finished after it")
    _log_added_metrics(filled)
    if job.logger == "wandb":
        from kvbench.tracking import log_run

        log_run(recorded_config(cfg), metrics, predictions, path)
    print_summary(metrics, path)
    return metrics


def _writing_comparisons(job: Job, write: Callable[[], list]) -> list:
    """``write()``, whose failure to write a ``metrics.json`` (a full disk) is one error saying how to mend it."""
    try:
        return write()
    except OSError as exc:
        raise KVBenchError(f"{job.name}: could not write the comparison with the no_press run into metrics.json "
                           f"({exc.strerror or exc}); free space or fix {job.directory.root} and rerun the same command: "
                           "the finished results are kept and the comparison is written then") from exc


def _mend_comparisons(job: Job) -> None:
    """A finished perplexity run met again: the comparisons with its baseline that a stopped run left unwritten."""
    scorer = metrics_module(job.cfg.dataset.name)
    if dataset_kind(job.cfg.dataset.name) != "perplexity" or not hasattr(scorer, "compare_to_baseline"):
        return
    with baseline.comparison_lock(job.cfg):
        filled = _writing_comparisons(job, lambda: baseline.mend_comparisons(job.cfg, job.directory,
                                                                             scorer.compare_to_baseline))
    for run, _ in filled:
        print(f"[kvbench] {run.name}: compared with its no_press run (the comparison a stopped run left unwritten)")
    _log_added_metrics(filled)


def _log_added_metrics(filled: list) -> None:
    """Mirror metrics added to finished runs into their W&B runs; outside the comparison lock, as W&B may take its
    init timeout."""
    if filled:
        from kvbench.tracking import log_added_metrics

        for run, added in filled:
            log_added_metrics(run.path, added)


def _finalize(job: Job, scorer, predictions: pd.DataFrame, metrics: dict) -> Path:
    """Write the result directory; a write that fails (a full disk) leaves no staging behind and says how to resume:
    the rows are in the run's checkpoint."""
    staging = None
    try:
        staging = job.directory.staging()
        if hasattr(scorer, "write_artifacts"):
            scorer.write_artifacts(predictions, staging)
        return job.directory.finalize(staging, predictions, metrics, recorded_config(job.cfg), job.identity,
                                      overwrite=bool(job.cfg.overwrite))
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise KVBenchError(f"could not write the results of {job.name} ({exc.strerror or exc}); its {len(predictions)} "
                           f"samples are checkpointed: free space or fix {job.directory.root} and rerun the same "
                           "command to finish without recomputing them") from exc


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
