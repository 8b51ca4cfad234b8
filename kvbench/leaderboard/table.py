"""Turn a tree of run directories into one tidy table, and that table into per-dataset score grids.

Everything downstream (CSV, Markdown, plots, HTML, W&B, paper figures) reads the single DataFrame built
here, so naming and ordering decisions are made once: a press line is identified by its *label*
(press + query-aware flag + variant), ratios are rendered the way run names print them, and runs that
cannot be read are reported rather than crashing a leaderboard built from hundreds of sweeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import yaml

from kvbench.errors import KVBenchError
from kvbench import datasets
from kvbench.results import EXECUTION_KEYS, IDENTITY_FILE, NEUTRAL_KEYS, RESULT_FILES, RunDirectory, format_ratio  # the leaderboard reads what results.py writes
from kvbench.results import SPEED_COLUMNS as RUN_SPEED_COLUMNS

NO_PRESS = "no_press"
QUERY_AWARE_VARIANT = "query_aware"
# A task scored on fewer samples than this moves by more than 2 points per sample: a smoke run, not a result.
SMOKE_SAMPLES = 50
SMOKE_MARK = "§"
TRUNCATED_MARK = "†"
# Directories the tooling itself writes next to the runs; they are never runs.
RESERVED_DIRS = frozenset({"leaderboard", "wandb", "multirun", "outputs"})

SPEED_COLUMNS = tuple(RUN_SPEED_COLUMNS)  # exactly what the runner writes under metrics["speed"]
DUPLICATE_MARK = "‡"
PERPLEXITY_COLUMNS = ("perplexity", "no_press_perplexity", "perplexity_delta", "perplexity_ratio")
BASE_COLUMNS = (
    "dataset",
    "model",
    "press",
    "label",
    "kind",
    "compression_ratio",
    "configured_ratio",
    "ratio_label",
    "query_aware",
    "variant",
    "score",
    "higher_is_better",
    "num_samples",
    "num_samples_per_task",
    "smoke",
    "truncated_samples",
    "max_truncated_tokens",
    "context_length",
    "budget",
    "seed",
    "identity",
    "duplicate_of",
    "device",
    "dtype",
)
DERIVED_COLUMNS = ("wall_seconds",)
TAIL_COLUMNS = ("setting", "run_name", "run_dir")
BREAKDOWN_PREFIXES = ("task:", "bucket:", "cell:")
# Config keys that name the method or cannot change a score: runs differing only in these compete for "best".
# Besides what never enters a run's identity, batching and the cache layout give the same answers, and decode
# timing only times.
SETTING_FREE_KEYS = frozenset({key for key in NEUTRAL_KEYS if "." not in key}
                              | {"press", "compression_ratio", *EXECUTION_KEYS})


class SkippedRun(NamedTuple):
    """A directory that looked like a run but could not be used; kept so the CLI can say why."""

    path: Path
    reason: str


def line_label(press: str, query_aware: bool = False, variant: str = "") -> str:
    """One legend entry per distinct method: query-aware runs and variants must never be averaged together."""
    label = str(press)
    if query_aware:
        label += " (query-aware)"
    if variant:
        label += f" [{variant}]"
    return label


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    # per_cell may be nested ({context_length: {depth: score}}); a flat column per leaf keeps the CSV tidy.
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), sub, out)
    elif _is_number(value) or isinstance(value, bool):
        out[prefix] = float(value)


def _samples_per_task(metrics: dict[str, Any]) -> float:
    """What the run recorded; for runs written before it did, the average over its per-task breakdown."""
    if _is_number(metrics.get("num_samples_per_task")):
        return float(metrics["num_samples_per_task"])
    total = metrics.get("num_samples")
    if not _is_number(total):
        return math.nan
    tasks = metrics.get("per_task")
    return float(total) / len(tasks) if isinstance(tasks, dict) and tasks else float(total)


def _count(metrics: dict[str, Any], key: str) -> int:
    value = metrics.get(key)
    if value is None:
        return 0
    if not _is_number(value) or not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"metrics.json has {key}={value!r}, not a count")
    return int(value)


def _read_run(run_dir: Path) -> dict[str, Any]:
    """Parse one run directory into a flat row; raises ValueError with a short reason when unusable."""
    missing = [name for name in RESULT_FILES if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"unparsable metrics.json ({exc.__class__.__name__})") from None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"unparsable config.yaml ({exc.__class__.__name__})") from None
    if not isinstance(metrics, dict):
        raise ValueError("metrics.json is not a JSON object")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError("config.yaml is not a mapping")
    score = metrics.get("score")
    if not _is_number(score) or not math.isfinite(score):
        raise ValueError("metrics.json has no finite numeric 'score'")

    def section(name: str) -> dict[str, Any]:
        value = config.get(name)
        return value if isinstance(value, dict) else {}

    name_parts = run_dir.name.split("__")

    def pick(key: str, cfg_value: Any, part: int) -> Any:
        if metrics.get(key) not in (None, ""):
            return metrics[key]
        if cfg_value not in (None, ""):
            return cfg_value
        return name_parts[part] if len(name_parts) > part else ""

    dataset = str(pick("dataset", section("dataset").get("name"), 0))
    model = str(pick("model", section("model").get("name"), 1))
    press = str(pick("press", section("press").get("name"), 2))
    ratio = metrics.get("compression_ratio", config.get("compression_ratio"))
    if not _is_number(ratio):
        try:
            ratio = float(name_parts[3])
        except (IndexError, ValueError):
            raise ValueError("no compression_ratio in metrics.json or config.yaml") from None
    ratio = 0.0 if press == NO_PRESS else float(ratio)

    query_aware = bool(metrics.get("query_aware", config.get("query_aware", False)))
    variant = metrics.get("variant")
    if variant is None:
        variant = "__".join(name_parts[4:])
    # The harness folds the query-aware flag into the variant ("query_aware__window_size=32"); it is
    # shown as a flag in the label, so keep it out of the variant text to avoid saying it twice.
    parts = [p for p in str(variant).split("__") if p]
    if QUERY_AWARE_VARIANT in parts:
        query_aware = True
        parts.remove(QUERY_AWARE_VARIANT)
    variant = "__".join(parts)

    higher = metrics.get("higher_is_better")
    if not isinstance(higher, bool):
        higher = _declared(dataset, datasets.higher_is_better, True)
    kind = metrics.get("kind")
    if kind not in datasets.KINDS:
        kind = _declared(dataset, datasets.dataset_kind, "generate")
    speed = metrics.get("speed") if isinstance(metrics.get("speed"), dict) else {}
    budget = metrics.get("budget", config.get("budget"))
    configured = ratio
    if budget is not None and press != NO_PRESS and _is_number(speed.get("kv_kept_fraction")):
        # A token budget removes a different fraction of each context: place the run where it actually landed.
        ratio = round(1.0 - float(speed["kv_kept_fraction"]), 4)

    identity = RunDirectory(run_dir.parent, run_dir.name).recorded_identity()
    if identity is None and (run_dir / IDENTITY_FILE).exists():  # runs from before identity.json have none
        raise ValueError(f"unparsable {IDENTITY_FILE} (a torn write?): its device, dtype and duplicates would be unknown")
    row: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "press": press,
        "label": line_label(press, query_aware, variant),
        "kind": kind,
        "compression_ratio": ratio,
        "configured_ratio": configured,
        "ratio_label": format_ratio(ratio),
        "query_aware": query_aware,
        "variant": variant,
        "score": float(score),
        "higher_is_better": higher,
        "num_samples": _count(metrics, "num_samples") if metrics.get("num_samples") is not None else None,
        "num_samples_per_task": _samples_per_task(metrics),
        "truncated_samples": _count(metrics, "truncated_samples"),
        "max_truncated_tokens": _count(metrics, "max_truncated_tokens"),
        "context_length": section("dataset").get("context_length"),
        "budget": budget,
        "seed": config.get("seed"),
        "identity": _identity_key(identity),
        "device": _device(identity, metrics),
        "dtype": str(identity.get("dtype") or "") if identity else "",
        "wall_seconds": float(metrics["wall_seconds"]) if _is_number(metrics.get("wall_seconds")) else math.nan,
        "setting": recorded_setting(config, variant),
        "run_name": str(metrics.get("run_name") or run_dir.name),
        "run_dir": str(run_dir),
    }
    for key in SPEED_COLUMNS:
        row[key] = float(speed[key]) if _is_number(speed.get(key)) else math.nan
    for source, column in (
        ("perplexity", "perplexity"),
        ("no_press_perplexity", "no_press_perplexity"),
        ("delta", "perplexity_delta"),
        ("ratio", "perplexity_ratio"),
    ):
        if _is_number(metrics.get(source)):
            row[column] = float(metrics[source])
    row["smoke"] = bool(row["num_samples_per_task"] < SMOKE_SAMPLES)  # NaN (nothing recorded) compares False
    for key, prefix in (("per_task", "task:"), ("per_bucket", "bucket:"), ("per_cell", "cell:")):
        breakdown: dict[str, float] = {}
        if isinstance(metrics.get(key), dict):
            _flatten("", metrics[key], breakdown)
        for name, value in breakdown.items():
            row[prefix + name] = value
    return row


def _declared(dataset: str, read, default):
    """A dataset module's declaration; ``default`` for a dataset this kvbench does not know (an old or foreign run)."""
    try:
        return read(dataset)
    except KVBenchError:
        return default


def _device(identity: dict | None, metrics: dict[str, Any]) -> str:
    """What computed the run: the GPU or CPU model its identity records; the device type or the torch device for
    runs written before identities named it ("" when nothing says)."""
    recorded = identity or {}
    for value in (recorded.get("device_name"), recorded.get("device_type"), metrics.get("device")):
        if isinstance(value, str) and value:
            return value
    return ""


def _identity_key(identity: dict | None) -> str | None:
    """A short digest of ``identity.json`` (None for runs written without one): equal digests = the same run."""
    if identity is None:
        return None
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flag_duplicates(table: pd.DataFrame) -> pd.DataFrame:
    """``duplicate_of``: the first run (by name) with the same identity, or "" for a run that is the only one.

    Two directories with one identity are the same computation stored twice (a copied or renamed results
    folder): their numbers must not be averaged as if they were two measurements; grids keep the first.
    """
    first: dict[str, str] = {}
    duplicate_of = []
    for key, name in zip(table["identity"], table["run_name"]):  # a copy sharing a run_name: its directory (_named_by_directory)
        if isinstance(key, str) and key in first:
            duplicate_of.append(first[key])
        else:
            if isinstance(key, str):
                first[key] = name
            duplicate_of.append("")
    return table.assign(duplicate_of=duplicate_of)


def _named_by_directory(table: pd.DataFrame) -> pd.DataFrame:
    """Runs named by their directories where two share the recorded ``run_name`` (a copied or renamed run):
    a warning that names one run twice could not be acted on."""
    shared = table["run_name"].duplicated(keep=False)
    names = [Path(path).name if clash else name for name, path, clash in zip(table["run_name"], table["run_dir"], shared)]
    return table.assign(run_name=names)


def _separate_conflicts(table: pd.DataFrame) -> pd.DataFrame:
    """Give its own label to each run of a cell (dataset, model, label, ratio asked for) that another run of
    another identity also claims: results gathered from several machines or versions under renamed directories.
    Averaged, the cell would show a number no run produced. The label says what differs where the device or dtype
    does, else names the directory. (Token-budget runs asked at two ratios land in one cell by design: their
    configured ratios differ, and they are averaged.)"""
    live = table[table["duplicate_of"].fillna("") == ""]
    keys = ["dataset", "model", "label", "compression_ratio", "configured_ratio"]
    labels = table["label"].copy()
    for _, cell in live.groupby(keys, sort=False, dropna=False):
        if len(cell) < 2:
            continue
        by_setup = len(cell[["device", "dtype"]].drop_duplicates()) == len(cell)
        for index, row in cell.iterrows():
            suffix = f"{row['device']}, {row['dtype']}" if by_setup else Path(row["run_dir"]).name
            labels[index] = f"{row['label']} @ {suffix}"
    # a second copy of a relabelled run is listed under its first run's label, which is the one the grids show
    first_label = dict(zip(live["run_name"], labels[live.index]))
    for index, first in table["duplicate_of"].fillna("").items():
        if first:
            labels[index] = first_label.get(first, labels[index])
    return table.assign(label=labels)


def _looks_like_run(path: Path) -> bool:
    if any((path / name).exists() for name in RESULT_FILES):
        return True
    return path.name not in RESERVED_DIRS and "__" in path.name


def _bucket_key(column: str) -> tuple[float, str]:
    # Length buckets ("0-4k words", "4-8k words", "8k+ words") should read left to right by length, not alphabetically.
    match = re.match(r"bucket:(\d+(?:\.\d+)?)", column)
    return (float(match.group(1)) if match else math.inf, column)


def ordered_columns(columns: list[str]) -> list[str]:
    """Stable, readable column order: identity, score, speed, perplexity, breakdowns, provenance."""
    present = set(columns)
    head = [c for c in (*BASE_COLUMNS, *SPEED_COLUMNS, *DERIVED_COLUMNS, *PERPLEXITY_COLUMNS) if c in present]
    tasks = sorted(c for c in columns if c.startswith("task:"))
    buckets = sorted((c for c in columns if c.startswith("bucket:")), key=_bucket_key)
    cells = sorted(c for c in columns if c.startswith("cell:"))
    tail = [c for c in TAIL_COLUMNS if c in present]
    known = set(head) | set(tasks) | set(buckets) | set(cells) | set(tail)
    extra = [c for c in columns if c not in known]
    return head + tasks + buckets + cells + extra + tail


def bucket_columns(table: pd.DataFrame) -> list[str]:
    """LongBench-E length buckets present in ``table``, shortest first."""
    return sorted((c for c in table.columns if c.startswith("bucket:")), key=_bucket_key)


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, list[SkippedRun]]:
    """Read every complete run under ``results_dir`` into one row each.

    Hidden directories are runs still being written, so they are ignored silently; directories that
    look like runs but are incomplete or corrupt are returned as ``SkippedRun`` so callers can warn.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise KVBenchError(f"results directory '{root}' does not exist; pass the output_dir your runs wrote to")
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedRun] = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith(".") or not _looks_like_run(path):
            continue
        try:
            rows.append(_read_run(path))
        except (ValueError, OSError) as exc:
            skipped.append(SkippedRun(path, str(exc)))
    if not rows:
        return pd.DataFrame(columns=list(BASE_COLUMNS + SPEED_COLUMNS + DERIVED_COLUMNS + TAIL_COLUMNS)), skipped
    table = _separate_conflicts(_flag_duplicates(_named_by_directory(pd.DataFrame(rows))))
    table = table[ordered_columns(list(table.columns))]
    # no_press first inside each (dataset, model) block: it is the reference every press is read against.
    table["_ref"] = table["press"] != NO_PRESS
    table = table.sort_values(["dataset", "model", "_ref", "label", "compression_ratio"], kind="stable")
    table = table.drop(columns="_ref").reset_index(drop=True)
    table["num_samples"] = pd.to_numeric(table["num_samples"], errors="coerce").astype("Int64")
    return table, skipped


def score_grid(table: pd.DataFrame, dataset: str, model: str, value: str = "score") -> pd.DataFrame:
    """Rows = press labels, columns = ratio labels: the shape people read leaderboards in.

    A setting that differs (a seed, a press parameter) is in the label, so a cell holds one run; the exception,
    token-budget runs configured at two ratios that removed the same fraction, are averaged. A second copy of one
    identity (``duplicate_of``) is not a second measurement and is left out (and marked).
    """
    block = block_rows(table, dataset, model)
    if block.empty:
        return pd.DataFrame()
    grid = block.pivot_table(index="label", columns="compression_ratio", values=value, aggfunc="mean")
    grid = grid.reindex(columns=sorted(grid.columns))
    order = list(dict.fromkeys(block["label"]))
    grid = grid.reindex(order)
    grid.columns = [format_ratio(c) for c in grid.columns]
    grid.index.name = "press"
    return grid


def block_rows(table: pd.DataFrame, dataset: str, model: str) -> pd.DataFrame:
    """One (dataset, model) block without the second copies of an identity."""
    block = table[(table["dataset"] == dataset) & (table["model"] == model)]
    if "duplicate_of" in block:
        block = block[block["duplicate_of"].fillna("") == ""]
    return block


def _duplicated_names(table: pd.DataFrame, dataset: str, model: str) -> set[str]:
    """Run names in a block that have a second copy of their identity."""
    block = table[(table["dataset"] == dataset) & (table["model"] == model)]
    if "duplicate_of" not in block:
        return set()
    return set(block["duplicate_of"].fillna("")) - {""}


def mark_grid(table: pd.DataFrame, dataset: str, model: str) -> pd.DataFrame:
    """Same shape as :func:`score_grid`: per cell, ``SMOKE_MARK`` if a run behind it is a smoke run and
    ``TRUNCATED_MARK`` if one had prompts cut to fit ``max_context_length``, ``DUPLICATE_MARK`` if its run
    has a second copy with the same identity (empty string otherwise).

    When every run of the block is a smoke run the block's heading says so once and the cells stay clean.
    """
    duplicated = _duplicated_names(table, dataset, model)
    block = block_rows(table, dataset, model)
    if block.empty:
        return pd.DataFrame()
    smoke = block["smoke"].astype(bool) if "smoke" in block else pd.Series(False, index=block.index)
    if smoke.all():
        smoke = smoke & False
    cut = pd.to_numeric(block["truncated_samples"], errors="coerce").fillna(0) > 0 if "truncated_samples" in block else smoke & False
    dup = block["run_name"].isin(duplicated)
    marks = block.assign(_mark=[SMOKE_MARK * s + TRUNCATED_MARK * t + DUPLICATE_MARK * d for s, t, d in zip(smoke, cut, dup)])
    grid = marks.pivot_table(index="label", columns="compression_ratio", values="_mark",
                             aggfunc=lambda v: "".join(m for m in (SMOKE_MARK, TRUNCATED_MARK, DUPLICATE_MARK) if any(m in x for x in v)))
    grid = grid.reindex(columns=sorted(grid.columns)).reindex(list(dict.fromkeys(block["label"]))).fillna("")
    grid.columns = [format_ratio(c) for c in grid.columns]
    grid.index.name = "press"
    return grid


def mark_legend(table: pd.DataFrame, dataset: str, model: str) -> list[str]:
    """One sentence per mark used in a block, saying what it means there (with its numbers)."""
    block = table[(table["dataset"] == dataset) & (table["model"] == model)]
    lines = []
    if "smoke" in block and block["smoke"].astype(bool).any():
        smoke = block[block["smoke"].astype(bool)]
        fewest = int(pd.to_numeric(smoke["num_samples_per_task"], errors="coerce").min())
        scope = "smoke runs: every run here has" if len(smoke) == len(block) else f"{SMOKE_MARK} smoke run ({len(smoke)} of {len(block)} runs):"
        lines.append(f"{scope} fewer than {SMOKE_SAMPLES} samples per task (as few as {fewest}); not leaderboard-grade.")
    if "truncated_samples" in block:
        cut = pd.to_numeric(block["truncated_samples"], errors="coerce").fillna(0)
        if (cut > 0).any():
            most = int(pd.to_numeric(block["max_truncated_tokens"], errors="coerce").fillna(0).max())
            lines.append(f"{TRUNCATED_MARK} truncated: prompts cut in the middle to fit max_context_length "
                         f"({int(cut.max())} samples in the worst run, up to {most} tokens cut from one).")
    if "duplicate_of" in block:
        copies = block[block["duplicate_of"].fillna("") != ""]
        for name, first in zip(copies["run_name"], copies["duplicate_of"]):
            lines.append(f"{DUPLICATE_MARK} duplicate: `{name}` has the same identity as `{first}` (the same run stored twice); "
                         f"only `{first}` is shown, remove one of them.")
    return lines


def all_smoke(table: pd.DataFrame, dataset: str, model: str) -> bool:
    block = table[(table["dataset"] == dataset) & (table["model"] == model)]
    return bool(len(block)) and "smoke" in block and bool(block["smoke"].astype(bool).all())


def blocks(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The (dataset, model) pairs in table order; each gets its own grid and figures."""
    if table.empty:
        return []
    return list(dict.fromkeys(zip(table["dataset"], table["model"])))


def higher_is_better(table: pd.DataFrame, dataset: str) -> bool:
    """Direction of the headline score for one dataset (perplexity is the odd one out)."""
    flags = table.loc[table["dataset"] == dataset, "higher_is_better"]
    return bool(flags.iloc[0]) if len(flags) else _declared(dataset, datasets.higher_is_better, True)


def is_perplexity(table: pd.DataFrame, dataset: str) -> bool:
    """Whether a dataset's runs are perplexity runs (the dataset module's ``KIND``, as recorded by each run)."""
    kinds = table.loc[table["dataset"] == dataset, "kind"] if "kind" in table else pd.Series(dtype=object)
    kind = kinds.iloc[0] if len(kinds) else _declared(dataset, datasets.dataset_kind, "generate")
    return kind == "perplexity"


def setting(variant: str) -> str:
    """What a run measured besides its press, for a run without a recorded config: its variant text without the
    ``press.*`` parameters (exact only while no part of the variant was shortened into a digest)."""
    return "__".join(part for part in str(variant or "").split("__") if part and not part.startswith("press."))


def recorded_setting(config: dict[str, Any], variant: str) -> str:
    """What a run measured besides its method, from its ``config.yaml``: everything but the press, the ratio and
    what cannot change a score (where results go, logging, device, batching, cache layout, decode timing).
    Runs at another context length, task list, sample count, seed or query-awareness answer another question,
    so they never compete for "best"; the variant text cannot tell that once a long variant is shortened."""
    if not config:
        return setting(variant)
    kept = {key: value for key, value in config.items() if key not in SETTING_FREE_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def best_labels(grid: pd.DataFrame, higher: bool, marks: pd.DataFrame | None = None,
                settings: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Per ratio column, which compressing presses reach the best score (ties all win).

    The no-press reference is excluded: it never compresses, so "winning" a column is meaningless for it.
    With ``settings`` (label -> :func:`setting`) presses compete only with those of the same setting; with
    ``marks`` (:func:`mark_grid`) a smoke cell wins only where no cell of its setting is leaderboard-grade.
    """
    winners: dict[str, set[str]] = {}
    candidates = grid.drop(index=[i for i in grid.index if i.startswith(NO_PRESS)], errors="ignore")
    for column in candidates.columns:
        values = candidates[column].dropna()
        groups = values.groupby([(settings or {}).get(label, "") for label in values.index])
        for _, group in groups:
            if len(group) < 2:
                continue
            if marks is not None:
                full = group[[SMOKE_MARK not in marks.at[label, column] for label in group.index]]
                group = full if len(full) else group
            best = group.max() if higher else group.min()
            winners.setdefault(column, set()).update(group.index[group == best])
    return winners


def block_winners(table: pd.DataFrame, dataset: str, model: str, grid: pd.DataFrame, marks: pd.DataFrame) -> dict[str, set[str]]:
    """:func:`best_labels` for one block's grid, each label in its own setting, smoke cells behind full ones."""
    block = block_rows(table, dataset, model)
    settings = dict(zip(block["label"], block["setting"]))
    return best_labels(grid, higher_is_better(table, dataset), marks, settings)


def format_score(value: float) -> str:
    """Scores are 0–100 accuracies or perplexities; two decimals reads well for both."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def counted_runs(table: pd.DataFrame) -> str:
    """How many runs the leaderboard shows: a second copy of an identity is listed, never counted again."""
    copies = int((table["duplicate_of"].fillna("") != "").sum()) if "duplicate_of" in table else 0
    shown = len(table) - copies
    return f"{shown} run{'' if shown == 1 else 's'}" + (f" ({copies} stored twice, shown once: {DUPLICATE_MARK})" if copies else "")


def to_markdown(table: pd.DataFrame, skipped: list[SkippedRun] | None = None) -> str:
    """A Markdown leaderboard, one score grid per (dataset, model); in bold, per ratio, the best compressed score
    among runs of one setting (:func:`block_winners`)."""
    lines = ["# KV-cache compression leaderboard", ""]
    lines.append(f"{counted_runs(table)}. Rows: press; columns: compression ratio (fraction of the KV cache removed).")
    lines.append("`no_press` is the uncompressed reference (ratio 0.00). Bold: the best compressed score of a ratio among runs "
                 "of the same settings (a smoke run only where no full run competes).")
    lines.append("")
    for dataset, model in blocks(table):
        higher = higher_is_better(table, dataset)
        grid = score_grid(table, dataset, model)
        marks = mark_grid(table, dataset, model)
        winners = block_winners(table, dataset, model, grid, marks)
        lines.append(f"## {dataset} / {model}" + (" (smoke runs)" if all_smoke(table, dataset, model) else ""))
        lines.append("")
        lines.append(f"Score: {'higher' if higher else 'lower'} is better.")
        lines.append("")
        header = ["press", *grid.columns]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([" --- "] + [" ---: "] * len(grid.columns)) + "|")
        for label, values in grid.iterrows():
            cells = []
            for column in grid.columns:
                text = format_score(values[column])
                if text and label in winners.get(column, ()):
                    text = f"**{text}**"
                if text and marks.at[label, column]:
                    text += f" {marks.at[label, column]}"
                cells.append(text)
            lines.append("| " + " | ".join([str(label).replace("|", "\\|"), *cells]) + " |")
        lines.append("")
        legend = mark_legend(table, dataset, model)
        if legend:
            lines.extend(f"{line}  " for line in legend)
            lines.append("")
    if skipped:
        lines.append("## Skipped run directories")
        lines.append("")
        for item in skipped:
            lines.append(f"- `{item.path.name}`: {item.reason}")
        lines.append("")
    return "\n".join(lines)
