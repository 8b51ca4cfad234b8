"""LongBench-E: the 13 English LongBench tasks re-sampled so that every length bucket is populated.

LongBench-E exists to show how a score degrades with context length, which is exactly what a KV-cache
press changes; the per-bucket breakdown lives in :mod:`kvbench.metrics.longbench`. Prompts and generation
lengths are LongBench's own so that scores stay comparable with published tables.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench import hub
from kvbench.datasets.options import positive_int
from kvbench.datasets.unique_ids import UniqueIds
from kvbench.errors import KVBenchError
from kvbench.fingerprint import files_digest

KIND = "generate"
HIGHER_IS_BETTER = True
HUB_ID = "THUDM/LongBench"

# LongBench's per-task prompt templates (English tasks of LongBench-E).
PROMPTS: dict[str, str] = {
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n '
        "Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        'write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        'of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench's per-task generation budgets (dataset2maxlen).
MAX_NEW_TOKENS: dict[str, int] = {
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "gov_report": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

TASKS: tuple[str, ...] = tuple(PROMPTS)

# pred.py ends samsum answers at the first newline token, and never lets the first one be a newline or EOS
# (eos_token_id=[eos, newline], min_length=context_length + 1): the model would otherwise go on with "Dialogue:".
STOP_TEXT: dict[str, str] = {"samsum": "\n"}

# LongBench runs these few-shot / completion tasks as raw text: a chat wrapper would break the pattern
# the examples set up (the model must continue "Type:", "Answer:", or the code itself).
NO_CHAT_TEMPLATE: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})


def split_template(task: str) -> tuple[str, str, str]:
    """Return ``(context_template, question_template, answer_prefix)`` for ``task``.

    The harness may truncate and compress the context but must keep the question intact, so the
    template is cut right after ``{context}``. For chat tasks the template's closing cue line
    ("Answer:", "Summary:", "The answer is: ") opens the assistant turn, where it steers the first
    generated token the same way it did at the end of LongBench's single-string prompt. The cue is kept
    verbatim, trailing space included: without a chat template ``context + question + answer_prefix`` is then
    LongBench's prompt exactly, and with one it is kvpress' answer prefix. Raw-text tasks keep everything in
    the question so that ``context + question`` is LongBench's prompt verbatim: its text, that is. The two are
    tokenized apart (the context is compressed, the question not), so whitespace meeting at the join can tokenize
    as two tokens where LongBench's one tokenization of the whole prompt has one.
    """
    template = PROMPTS[task]
    head, tail = template.split("{context}")
    context_template = head + "{context}"
    if task in NO_CHAT_TEMPLATE:
        return context_template, tail, ""
    cut = tail.rfind("\n") + 1
    last_line = tail[cut:]
    if "{input}" in last_line or not last_line.strip():
        return context_template, tail, ""
    return context_template, tail[:cut], last_line


def _task_list(cfg: Mapping[str, Any]) -> list[str]:
    tasks = cfg.get("tasks", None)
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Sequence):
        raise KVBenchError(f"dataset.tasks must be null, a task name or a list of task names, got {tasks!r}")
    tasks = list(dict.fromkeys(str(t) for t in tasks))  # a task named twice is run once
    unknown = [t for t in tasks if t not in PROMPTS]
    if unknown:
        raise KVBenchError(
            f"unknown LongBench-E task(s) {', '.join(unknown)}; set dataset.tasks to a subset of {', '.join(TASKS)} (or null for all)"
        )
    if not tasks:
        raise KVBenchError(f"dataset.tasks is empty; list some of {', '.join(TASKS)} or set it to null for all")
    return tasks


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise KVBenchError(f"{path}:{number} is not valid JSON ({exc.msg}); re-download the LongBench data") from exc
    return rows


def _local_file(directory: Path, task: str) -> Path | None:
    candidates = [directory / f"{task}_e.jsonl", directory / f"{task}.jsonl", directory / "data" / f"{task}_e.jsonl"]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def data_inputs(cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """The digest of the local jsonl files the selected tasks read; for the hub, the commit its revision resolves to."""
    path = cfg.get("path", None)
    if path is None:
        return {"hub_commit": hub.commit(str(cfg.get("hub_id", None) or HUB_ID), cfg.get("revision", None), "dataset")}
    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
        return {}
    files = [found for found in (_local_file(directory, task) for task in _task_list(cfg)) if found is not None]
    return {"local_files": files_digest(files, directory)}


def _local_rows(directory: Path, task: str) -> list[dict]:
    found = _local_file(directory, task)
    if found is not None:
        return _read_jsonl(found)
    raise KVBenchError(
        f"no LongBench file for task '{task}' in {directory}; expected {task}_e.jsonl or {task}.jsonl "
        f"(unzip LongBench's data.zip there, or restrict dataset.tasks)"
    )


def _offline_error(hub_id: str, task: str, exc: BaseException) -> KVBenchError:
    return KVBenchError(
        f"could not load LongBench-E task '{task}' from the hub '{hub_id}' ({type(exc).__name__}); "
        f"download LongBench's data.zip, unzip it and use dataset.path=<dir of LongBench jsonl>"
    )


def _hub_rows(hub_id: str, task: str, revision: str | None) -> list[dict]:
    """Fetch ``<task>_e`` from the hub.

    ``THUDM/LongBench`` is published both as a script-based dataset and as a ``data.zip`` of jsonl files;
    recent ``datasets`` releases refuse dataset scripts, so the zip is the fallback that keeps working.
    """
    import datasets

    revision = hub.load_revision(hub_id, revision, "dataset")
    try:
        return [dict(row) for row in datasets.load_dataset(hub_id, f"{task}_e", split="test", revision=revision)]
    except Exception as first_error:  # noqa: BLE001 - any failure means: try the zip, then tell the user
        try:
            from huggingface_hub import hf_hub_download

            archive = hf_hub_download(hub_id, "data.zip", repo_type="dataset", revision=revision)
            with zipfile.ZipFile(archive) as zipped:
                member = next((n for n in zipped.namelist() if n.endswith(f"/{task}_e.jsonl") or n == f"{task}_e.jsonl"), None)
                if member is None:
                    raise first_error
                text = zipped.read(member).decode("utf-8")
        except Exception as exc:  # noqa: BLE001
            raise _offline_error(hub_id, task, exc) from exc
        return [json.loads(line) for line in io.StringIO(text) if line.strip()]


def _as_answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _as_classes(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    classes = [str(v) for v in value]
    return classes or None


REQUIRED_KEYS = ("context", "input", "answers")  # LongBench's schema; an empty input (lcc, repobench-p) is fine


def build_rows(task: str, records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Turn LongBench records (their jsonl schema) into canonical kvbench rows for ``task``."""
    context_template, question_template, answer_prefix = split_template(task)
    rows = []
    unique = UniqueIds()
    for index, record in enumerate(records):
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:  # another file's schema would be scored as empty questions against no answers
            raise KVBenchError(
                f"LongBench task '{task}': record {index} has no {', '.join(missing)}; its records need the keys "
                f"{', '.join(REQUIRED_KEYS)} (point dataset.path at LongBench's own jsonl files)"
            )
        source_id = unique(str(record.get("_id") or index))  # a repeated _id is still a sample (LongBench scores all)
        context_text = str(record.get("context") or "")
        input_text = str(record.get("input") or "")
        rows.append(
            {
                "context": context_template.replace("{context}", context_text),
                "question": question_template.replace("{input}", input_text),
                "answer_prefix": answer_prefix,
                "answers": _as_answers(record.get("answers")),
                "max_new_tokens": MAX_NEW_TOKENS[task],
                "task": task,
                "sample_id": f"{task}/{source_id}",
                "length": int(record.get("length") or len(context_text.split())),
                "all_classes": _as_classes(record.get("all_classes")),
                "chat_template": task not in NO_CHAT_TEMPLATE,
                "stop_text": STOP_TEXT.get(task),
            }
        )
    return rows


def check(cfg: Mapping[str, Any]) -> None:
    """Task names, sample count and a local folder, checked before the model loads."""
    _task_list(cfg)
    positive_int(cfg, "num_samples", None, nullable=True)
    _local_directory(cfg)


def _local_directory(cfg: Mapping[str, Any]) -> Path | None:
    """``dataset.path``, the folder of LongBench's ``<task>_e.jsonl`` files; None reads the hub."""
    path = cfg.get("path", None)
    if path is None:
        return None
    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
        raise KVBenchError(f"dataset.path={path} is not a directory; point it at the folder holding LongBench's <task>_e.jsonl files")
    return directory


def load(cfg: Mapping[str, Any], tokenizer: Any = None) -> pd.DataFrame:
    """Load LongBench-E rows; the tokenizer is unused because the harness truncates contexts itself."""
    tasks = _task_list(cfg)
    hub_id = str(cfg.get("hub_id", None) or HUB_ID)
    num_samples = positive_int(cfg, "num_samples", None, nullable=True)
    directory = _local_directory(cfg)
    rows: list[dict] = []
    for task in tasks:
        records = _local_rows(directory, task) if directory is not None else _hub_rows(hub_id, task, cfg.get("revision", None))
        if num_samples is not None:
            records = records[: int(num_samples)]
        rows.extend(build_rows(task, records))
    if not rows:
        raise KVBenchError(f"LongBench-E produced no samples for tasks {', '.join(tasks)}; check dataset.path and dataset.num_samples")
    return pd.DataFrame(rows)
