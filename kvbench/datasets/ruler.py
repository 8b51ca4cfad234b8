"""RULER (Hsieh et al., 2024, arXiv:2404.06654): 13 synthetic long-context tasks.

``source=generated`` (default) builds the tasks offline, deterministically from ``seed``, as NVIDIA/RULER's
generators do (templates and settings of the commit in ``ruler_commit``), at any ``context_length`` measured with
the evaluated model's own tokenizer, so small models and CPU runs get prompts that really are as long as asked.
As in RULER, ``context_length`` holds the whole prompt as the model reads it (chat template included) and the
answer's ``max_new_tokens`` (``reserve_generation``).
``source=hub`` reads kvpress' fixed 4k/8k/16k set (``simonjegou/ruler``) for comparisons with published numbers. Either
way the prompt is cut into ``context`` and ``question`` where kvpress cuts RULER's prompts (at the last occurrence of the
question's opening: for qa, RULER's instruction repeated after the documents), so a press compresses the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from kvbench import hub
from kvbench.datasets import ruler_data
from kvbench.datasets.options import positive_int
from kvbench.datasets.ruler_tasks import MAX_NEW_TOKENS, RULER_COMMIT, SPECS, Prompt, Target, generate
from kvbench.errors import KVBenchError
from kvbench.fingerprint import files_digest, package_version
from kvbench.generation import prompt_tokens

TASKS: tuple[str, ...] = tuple(SPECS)
DEFAULTS = {
    "source": "generated",
    "context_length": 1024,
    "num_samples": 1,
    "tasks": None,
    "seed": 42,
    "reserve_generation": True,
    "ruler_commit": RULER_COMMIT,
    "hub_id": "simonjegou/ruler",
    "hub_config": None,
    "revision": None,
}
HUB_CONFIGS = ("4096", "8192", "16384")
KIND = "generate"
HIGHER_IS_BETTER = True
# The length is the test: the runner refuses a context_length above max_context_length instead of cutting it.
LENGTH_KEYS = ("context_length",)
COLUMNS = ("context", "question", "answer_prefix", "answers", "max_new_tokens", "task", "sample_id", "context_length")


def _option(cfg: Mapping | None, key: str):
    value = cfg.get(key) if cfg is not None else None
    return DEFAULTS[key] if value is None else value


def select_tasks(tasks) -> list[str]:
    """``None``/``"all"`` -> every task; otherwise a list (or comma-separated string) of task names."""
    if tasks is None or tasks == "all":
        return list(TASKS)
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    elif isinstance(tasks, Sequence):  # a list, or OmegaConf's ListConfig
        names = [str(t) for t in tasks]
    else:
        raise KVBenchError(f"dataset.tasks must be null, all, a task name or a list of task names, got {tasks!r}")
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise KVBenchError(f"unknown RULER task(s) {', '.join(unknown) or '(none given)'}; valid names: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def task_kind(task: str) -> str:
    return SPECS[task]["kind"]


def check(cfg: Mapping | None) -> None:
    """Every setting ``load`` reads, checked before the model loads (minutes for an 8B hub model)."""
    select_tasks(_option(cfg, "tasks"))
    for key in ("context_length", "num_samples"):
        positive_int(cfg, key, DEFAULTS[key])
    if _source(cfg) == "generated":
        _generator_settings(cfg)


def _source(cfg: Mapping | None) -> str:
    source = str(_option(cfg, "source"))
    if source not in ("generated", "hub"):
        raise KVBenchError(f"unknown dataset.source '{source}'; use generated or hub")
    return source


def _generator_settings(cfg: Mapping | None) -> tuple[int, bool]:
    """``(seed, reserve_generation)`` of the generated source, checked."""
    seed = _option(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KVBenchError(f"dataset.seed must be an integer, got {seed!r}")
    reserve = _option(cfg, "reserve_generation")
    if not isinstance(reserve, bool):  # bool("no") is True: a string would reserve under a name saying it does not
        raise KVBenchError(f"dataset.reserve_generation must be true or false, got {reserve!r}")
    commit = str(_option(cfg, "ruler_commit"))
    if commit != RULER_COMMIT:
        raise KVBenchError(
            f"dataset.ruler_commit records the RULER revision the generator follows ({RULER_COMMIT}); "
            f"'{commit}' is not available: remove the override (or use dataset.source=hub)"
        )
    return seed, reserve


def load(cfg: Mapping | None, tokenizer) -> pd.DataFrame:
    """Both sources yield the same columns (:data:`COLUMNS`), so runs and scorers never depend on the source."""
    tasks = select_tasks(_option(cfg, "tasks"))
    length, num_samples = (positive_int(cfg, key, DEFAULTS[key]) for key in ("context_length", "num_samples"))
    if _source(cfg) == "hub":
        return _load_hub(cfg, tasks, length, num_samples)
    if tokenizer is None:
        raise KVBenchError("generated RULER prompts are sized with the model's tokenizer; pass one (or use dataset.source=hub)")
    seed, reserve = _generator_settings(cfg)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    template = prompt_tokens(tokenizer, "", [""])
    rows = []
    for task in tasks:
        max_new_tokens = MAX_NEW_TOKENS[task_kind(task)]
        reserved = max_new_tokens if reserve else 0
        for index in range(num_samples):
            prompt = _fitted(task, seed, index, Target(length, length - reserved - template, count, template), tokenizer)
            rows.append({
                "context": prompt.context,
                "question": prompt.question,
                "answer_prefix": prompt.answer_prefix,
                "answers": list(prompt.answers),
                "max_new_tokens": max_new_tokens,
                "task": task,
                "sample_id": f"{task}-{index:04d}",
                "context_length": length,
            })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def data_inputs(cfg: Mapping | None) -> dict[str, str | None]:
    """What generated samples are drawn from besides the config: RULER's data package and the word lists."""
    if str(_option(cfg, "source")) == "hub":
        hub_id = str(_option(cfg, "hub_id"))
        folder = _local_copy(hub_id)
        if folder is not None:  # its files are what the run reads
            return {"local_files": files_digest(folder.rglob("*"), folder)}
        return {"hub_commit": hub.commit(hub_id, _option(cfg, "revision"), "dataset")}
    return {ruler_data.DISTRIBUTION: package_version(ruler_data.DISTRIBUTION), "wonderwords": package_version("wonderwords")}


def _local_copy(hub_id: str) -> Path | None:
    """The folder ``dataset.hub_id`` names when it is a local copy of a hub export (read as it is, no revision)."""
    folder = Path(hub_id).expanduser()
    return folder if folder.is_dir() else None


def _fitted(task: str, seed: int, index: int, target: Target, tokenizer, attempts: int = 3) -> Prompt:
    """A sample whose templated prompt plus the answer's room is at most ``target.length`` tokens.

    The budget leaves out the template's own tokens, measured once on an empty prompt; the sample is then
    measured as the model will read it, and where a merge at a join made it longer, drawn again with the
    budget lowered by the excess.
    """
    answer_room = target.length - target.budget - target.template
    for _ in range(attempts):
        prompt = generate(task, seed, index, target)
        excess = prompt_tokens(tokenizer, prompt.context, [prompt.question], prompt.answer_prefix) + answer_room - target.length
        if excess <= 0:
            return prompt
        target = replace(target, budget=target.budget - excess, template=target.template + excess)
    raise KVBenchError(
        f"{task} sample {index} does not fit dataset.context_length={target.length} with the chat template after "
        f"{attempts} fits; raise dataset.context_length"
    )


def _load_hub(cfg: Mapping | None, tasks: list[str], length: int, num_samples: int) -> pd.DataFrame:
    hub_id = str(_option(cfg, "hub_id"))
    config = str(_option(cfg, "hub_config") or length)
    if hub_id == DEFAULTS["hub_id"] and config not in HUB_CONFIGS:
        raise KVBenchError(
            f"{hub_id} has configs {', '.join(HUB_CONFIGS)}, not '{config}'; set dataset.context_length "
            f"(or dataset.hub_config) to one of them, or use dataset.source=generated for any length"
        )
    import datasets

    try:
        local = _local_copy(hub_id) is not None
        revision = None if local else hub.load_revision(hub_id, _option(cfg, "revision"), "dataset")
        frame = datasets.load_dataset(hub_id, config, split="test", revision=revision).to_pandas()
    except Exception as exc:  # network, auth and missing-dataset errors come from several libraries
        raise KVBenchError(
            f"could not load {hub_id} ({config}) from the Hugging Face hub ({type(exc).__name__}: the hub is unreachable "
            f"or has no such dataset); use dataset.source=generated to build RULER offline"
        ) from exc
    missing = {"context", "question", "answer_prefix", "answer", "task", "max_new_tokens"} - set(frame.columns)
    if missing:
        raise KVBenchError(f"{hub_id} ({config}) lacks the column(s) {', '.join(sorted(missing))}; it is not a RULER export")
    target = int(config) if config.isdigit() else length
    parts = []
    for task in tasks:
        rows = frame[frame["task"] == task].head(num_samples).reset_index(drop=True)
        parts.append(pd.DataFrame({
            "context": rows["context"].astype(str),
            "question": rows["question"].astype(str),
            "answer_prefix": rows["answer_prefix"].astype(str),
            "answers": [[answer] if isinstance(answer, str) else [str(a) for a in answer] for answer in rows["answer"]],
            "max_new_tokens": rows["max_new_tokens"].astype(int),
            "task": task,
            "sample_id": [f"{task}-{i:04d}" for i in range(len(rows))],
            "context_length": target,
        }, columns=list(COLUMNS)))
    absent = [task for task, part in zip(tasks, parts) if part.empty]
    if absent:  # the run would average the other tasks under the name of the whole set
        raise KVBenchError(f"{hub_id} ({config}) has no rows for the task(s) {', '.join(absent)}; "
                           "leave them out with dataset.tasks=[...]")
    return pd.concat(parts, ignore_index=True)
