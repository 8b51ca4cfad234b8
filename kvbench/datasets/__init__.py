"""Benchmarks: one module per benchmark, each exposing ``load(cfg, tokenizer) -> pandas.DataFrame``.

A dataset never sees the model. Generation benchmarks return the canonical columns
``context, question, answer_prefix, answers, max_new_tokens, task`` (+ extras); perplexity benchmarks
return one row per scored window: ``sample_id, input_ids, context_tokens`` (+ extras such as where the
window lies in its book). The tokenizer is only used to measure or cut text in tokens.
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


def dataset_module(name: str):
    if name not in DATASETS:
        raise KVBenchError(f"unknown dataset '{name}'; valid names: {', '.join(sorted(DATASETS))}")
    return importlib.import_module(DATASETS[name])


def load_dataset(name: str, cfg, tokenizer):
    return dataset_module(name).load(cfg, tokenizer)
