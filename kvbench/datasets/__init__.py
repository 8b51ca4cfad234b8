"""Benchmarks: one module per benchmark, each exposing ``load(cfg, tokenizer) -> pandas.DataFrame``.

A dataset never sees the model. A module declares what the rest must know about it: ``KIND`` ("generate":
questions answered by greedy decoding; "perplexity": windows scored by teacher forcing) and
``HIGHER_IS_BETTER`` (the headline score's direction); the runner, the leaderboard and the plots read those
through ``dataset_kind`` / ``higher_is_better`` and never name a benchmark. A module that declares neither
is a generation benchmark scored higher-is-better. Generation benchmarks return the canonical columns
``context, question, answer_prefix, answers, max_new_tokens, task`` (+ extras, and an optional
``stop_text``: a text whose token ends the answer where the benchmark's own harness stops it); perplexity
benchmarks return one row per scored window: ``sample_id, input_ids, context_tokens`` (+ extras such as where the
window lies in its book). The tokenizer is only used to measure or cut text in tokens. A module that reads
more than its config names (local files, a data package) says what with ``data_inputs(cfg)``: digests and
versions that enter the run's identity, so a result is not reused over other data. A module may declare
``check(cfg)``: the config errors it can find without a tokenizer, raised before the model loads.
"""

from __future__ import annotations

import importlib

from kvbench.errors import KVBenchError

DATASETS = {
    "ruler": "kvbench.datasets.ruler",
    "longbench_e": "kvbench.datasets.longbench",
    "pg19": "kvbench.datasets.pg19",
    "needle": "kvbench.datasets.needle",
}
CANONICAL_COLUMNS = ("context", "question", "answer_prefix", "answers", "max_new_tokens", "task")
KINDS = ("generate", "perplexity")


def dataset_module(name: str):
    if name not in DATASETS:
        raise KVBenchError(f"unknown dataset '{name}'; valid names: {', '.join(sorted(DATASETS))}")
    return importlib.import_module(DATASETS[name])


def load_dataset(name: str, cfg, tokenizer):
    """The benchmark's rows. Their ``sample_id`` must be unique: a run's checkpoint, its resume and the
    comparison of runs all find a sample by it, so a repeated id would make a resumed run drop a sample."""
    data = dataset_module(name).load(cfg, tokenizer)
    if "sample_id" in data.columns:
        repeated = data["sample_id"][data["sample_id"].duplicated()].unique().tolist()
        if repeated:
            shown = ", ".join(map(repr, repeated[:5])) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
            raise KVBenchError(f"dataset '{name}' gives more than one sample the id {shown}; give every sample (record, "
                               f"book, grid cell) its own id in the data or the dataset settings")
    return data


def data_inputs(name: str, cfg) -> dict:
    """What the dataset reads besides its config (``data_inputs`` of its module; none declared: nothing)."""
    declared = getattr(dataset_module(name), "data_inputs", None)
    return dict(declared(cfg)) if declared is not None else {}


def check_config(name: str, cfg) -> None:
    """The dataset's own config checks (``check`` of its module), run before anything loads."""
    declared = getattr(dataset_module(name), "check", None)
    if declared is not None:
        declared(cfg)


def dataset_kind(name: str) -> str:
    """``generate`` or ``perplexity``, as the dataset module declares (``KIND``)."""
    kind = getattr(dataset_module(name), "KIND", "generate")
    if kind not in KINDS:
        raise KVBenchError(f"dataset module for '{name}' declares KIND={kind!r}; use one of {', '.join(KINDS)}")
    return kind


def higher_is_better(name: str) -> bool:
    """Whether a higher headline score is better on this dataset, as its module declares (``HIGHER_IS_BETTER``)."""
    return bool(getattr(dataset_module(name), "HIGHER_IS_BETTER", True))
