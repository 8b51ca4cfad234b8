"""Result directories: naming, identity, atomic completion, skip and resume.

``results/<dataset>__<model>__<press>__<ratio>[__<variant>]/`` holds ``predictions.csv``, ``metrics.json``,
``config.yaml`` and ``identity.json``. The name is for people; ``identity.json`` decides reuse: the resolved
config without output/logging settings, kvbench's version and git commit, the torch and transformers versions,
the model's dtype and the device type. A finished directory is reused only for an equal identity.

A run is assembled in a hidden staging directory and moved into place (``kvbench.atomic``) only when every
file is written, so a killed run never leaves a complete-looking directory. Finished samples are checkpointed
in ``.partial/<name>/`` (with the identity they belong to) so an interrupted run resumes where it stopped.
One process computes a configuration at a time (``.locks/<name>.lock``). Hidden entries are never results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kvbench import atomic
from kvbench.config_defaults import CONF_DIR, file_values, spells_out_default  # CONF_DIR: what a setting may be
from kvbench.errors import KVBenchError
from kvbench.fingerprint import source_digest

RESULT_FILES = ("predictions.csv", "metrics.json", "config.yaml")
IDENTITY_FILE = "identity.json"  # what decides reuse: see run_identity
OVERWRITE_MARK = "overwrite_launch"  # in .partial/<name>/: the launch of the overwrite=true run whose rows these are
# Overrides that never change what a run computes (where it goes, how it is logged, what runs it).
NEUTRAL_KEYS = ("output_dir", "overwrite", "device", "logger", "wandb", "hydra", "model.device")
# How a run is executed, not what it computes: in the identity (a result is reused only as it was run), but a score
# moves by rounding at most (batch padding; the packed vs masked layout; decoding after a perplexity is scored), so
# runs differing only in these are one setting on the leaderboard and share a no_press baseline.
EXECUTION_KEYS = ("batch_size", "cache_layout", "decode_timing_tokens")
IDENTITY_GROUPS = ("model", "dataset", "press", "compression_ratio")
MAX_VARIANT = 80
# The speed/memory figures a run writes under ``metrics["speed"]`` (column -> how per-sample rows are reduced);
# the leaderboard reads the same list. ``peak_memory_bytes`` is None where no per-run peak exists (CPU).
SPEED_COLUMNS = {
    "prefill_seconds": "mean",
    "compression_seconds": "mean",
    "question_seconds": "mean",
    "ttft_seconds": "mean",
    "seconds_per_token": "mean",
    "kv_bytes_before": "mean",
    "kv_bytes_after": "mean",
    "kv_kept_fraction": "mean",
    "peak_memory_bytes": "max",
}


def create_output_dir(output_dir: str | Path) -> None:
    """Create ``output_dir`` (and its parents), or say in one line that it cannot be."""
    try:
        Path(output_dir).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVBenchError(f"output_dir={output_dir} cannot be created ({exc.strerror or exc}); choose another output_dir") from exc


def format_ratio(ratio: float) -> str:
    """0.5 -> '0.50', 0.875 -> '0.875', 0.3333 -> '0.3333': unambiguous and sortable by eye."""
    text = f"{float(ratio):.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def slug(text: str) -> str:
    """File-name-safe form of any name (run variants, HF ids with '/', GPU ids with ':'): every run of other
    characters becomes one '-'; '=', '+' and '~' stay so a variant still reads as its override."""
    return re.sub(r"[^A-Za-z0-9_.=+~-]+", "-", str(text)).strip("-")


def _known_top_level_keys() -> frozenset[str]:
    """Top-level keys of ``conf/config.yaml`` (plus the config groups): a group's key of the same name keeps
    its group in a variant, so ``seed=7`` and ``dataset.seed=7`` never share a name."""
    keys = set(IDENTITY_GROUPS) | set(NEUTRAL_KEYS) | {"seed", "budget", "query_aware", "max_context_length"}
    keys |= {k for k in (file_values(CONF_DIR / "config.yaml") or {}) if k != "defaults"}
    return frozenset(keys)


TOP_LEVEL_KEYS = _known_top_level_keys()


def _variant_part(override: str) -> tuple[str, str] | None:
    """``(readable part, exact part)`` of one override, or None when it leaves the identity alone.

    Readable: ``dataset.context_length=4096`` -> ``context_length=4096`` (the dataset's group is dropped when
    the leaf is not also a top-level key); ``press.*`` and ``model.*`` keep their group (a press and a dataset
    may share a parameter name); a key appended at top level that the config does not know keeps its ``+``.
    Exact: the override as given, so two overrides that differ anywhere never share an exact part.
    """
    deleted = override.startswith("~")
    key, _, value = override.lstrip("+~").partition("=")
    if key in IDENTITY_GROUPS or key in NEUTRAL_KEYS or key.split(".")[0] in NEUTRAL_KEYS:
        return None
    exact = f"{'~' if deleted else ''}{key}={value}"
    if key == "query_aware" and not deleted and value.lower() in ("true", "false"):
        return ("query_aware", exact) if value.lower() == "true" else None
    group, _, leaf = key.partition(".")
    if group == "dataset" and leaf and "." not in leaf and leaf not in TOP_LEVEL_KEYS:
        short = leaf
    elif "." not in key and key not in TOP_LEVEL_KEYS:
        short = f"+{key}"
    else:
        short = key
    readable = f"~{short}" if deleted and not value else f"{'~' if deleted else ''}{short}={value}"
    return readable, exact


def variant_from_overrides(overrides: list[str], is_default: Callable[[str], bool] | None = None) -> str:
    """Readable suffix from the command-line overrides that change results beyond the four name parts.

    Injective: two override lists that differ in a key, a group or a value give different suffixes (a key given
    twice counts once, with its last value, the one Hydra applies). The
    readable text is kept when it is exact (only ``[A-Za-z0-9_.=+-~]``, no ``__`` inside a part); where
    cleaning lost something (``/``, spaces, brackets...) or the text passes 80 characters, a digest of the
    exact overrides is appended. ``is_default``: which of the applied overrides only spell out the value the
    config files give (``run_variant``); they name nothing.
    """
    latest = {override.lstrip("+~").partition("=")[0]: override for override in overrides}  # Hydra applies a key's last
    applied = [o for o in latest.values() if is_default is None or not is_default(o)]
    parts = [p for p in map(_variant_part, applied) if p is not None]
    if not parts:
        return ""
    readable = sorted(r for r, _ in parts)
    cleaned = [slug(r) for r in readable]
    lossy = any(c != r or "__" in r or r.startswith("_") or r.endswith("_") for c, r in zip(cleaned, readable))
    variant = "__".join(cleaned)
    if lossy or len(variant) > MAX_VARIANT:
        digest = hashlib.sha1("\n".join(sorted(e for _, e in parts)).encode()).hexdigest()[:10]
        variant = f"{variant[: MAX_VARIANT - 12].rstrip('-_')}-{digest}"
    return variant


def run_variant(cfg: DictConfig, overrides: list[str], choices: Mapping[str, str]) -> str:
    """The variant of a run composed as ``cfg`` from ``overrides`` (Hydra's task overrides) under these group
    ``choices`` (Hydra's ``runtime.choices``): an override that leaves its key at the config files' value names
    nothing, so ``seed=42`` runs in the plain command's directory."""
    return variant_from_overrides(overrides, functools.partial(spells_out_default, cfg, choices))


def run_prefix(dataset: str, model: str) -> str:
    """What every run name of one dataset and model starts with (before ``__<press>__<ratio>``)."""
    return "__".join([dataset, model.replace("/", "-")])


def run_name(dataset: str, model: str, press: str, ratio: float, variant: str = "") -> str:
    name = "__".join([run_prefix(dataset, model), press, format_ratio(ratio)])
    return f"{name}__{variant}" if variant else name


def serialise_predictions(df: pd.DataFrame) -> pd.DataFrame:
    """Lists/dicts as JSON so the CSV round-trips; the long context is left out (it is regenerated)."""
    out = df.drop(columns=[c for c in ("context", "text") if c in df.columns])
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, tuple, dict))).any():
            out[column] = out[column].map(lambda v: json.dumps(list(v) if isinstance(v, tuple) else v))
    return out


def identity_config(config: DictConfig) -> dict:
    """The resolved config as it enters a run's identity: without where results go or how they are logged
    (``output_dir``, ``overwrite``, ``logger``, ``wandb``, ``hydra``) and without ``device`` (the identity
    records the device *type* instead)."""
    data = OmegaConf.to_container(config, resolve=True)
    for key in NEUTRAL_KEYS:
        group, _, leaf = key.partition(".")
        if leaf and isinstance(data.get(group), dict):
            data[group].pop(leaf, None)
        else:
            data.pop(key, None)
    return data


@functools.lru_cache(maxsize=1)
def kvbench_commit() -> str | None:
    """The git commit of the kvbench checkout this code runs from, None outside a git checkout of kvbench."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None  # no git, or kvbench installed inside some other repository
    return lines[1]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_identity(config: DictConfig, *, dtype: str, device_type: str, device_name: str | None,
                 inputs: dict | None = None) -> dict:
    """Everything that can change a run's numbers; a finished result is reused only for an equal identity.

    ``inputs``: what the run reads besides its config (data and model file digests, data package versions;
    ``kvbench.fingerprint``). ``kvbench_source`` is the digest of the code itself, which the commit misses when
    the checkout has uncommitted edits or kvbench was installed without git. ``device_name`` (the GPU or CPU
    model) because rounding and speed differ between devices of one type; ``flash_attn`` because where it is
    installed it computes the attention of head-adaptive layers and of ``attn_implementation=flash_attention_2``;
    ``tokenizers`` because it turns every prompt into the ids the model reads (RULER sizes its haystacks with it).
    """
    return {
        "config": identity_config(config),
        "inputs": dict(inputs or {}),
        "kvbench_version": _version("kvbench"),
        "kvbench_commit": kvbench_commit(),
        "kvbench_source": source_digest(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "flash_attn": _version("flash-attn"),
        "dtype": dtype,
        "device_type": device_type,
        "device_name": device_name,
    }


def identity_apart_from(identity: dict, config_keys: tuple[str, ...]) -> dict:
    """The identity (as it reads back from JSON) without the given top-level config keys: what two runs must share
    to share a prefill, or for one to be the other's uncompressed baseline."""
    plain = _plain(identity)
    return {**plain, "config": {k: v for k, v in plain["config"].items() if k not in config_keys}}


def flat_keys(data, prefix: str = "") -> dict:
    """A nested dict as ``{"config.press.window_size": 8, ...}`` (an empty dict stays a leaf)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flat_keys(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def identity_difference(recorded: dict, wanted: dict) -> list[str]:
    """``["dtype: float32 -> bfloat16", ...]`` for every key whose value differs, sorted by key."""
    old, new = flat_keys(recorded), flat_keys(wanted)
    missing = object()

    def show(value) -> str:
        text = "(absent)" if value is missing else json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{k}: {show(old.get(k, missing))} -> {show(new.get(k, missing))}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


class RunDirectory:
    """One run's result directory, its resume checkpoint (``.partial/<name>/``) and its lock
    (``.locks/<name>.lock``: one process computes a configuration, a second one waits and reuses it)."""

    def __init__(self, output_dir: str | Path, name: str):
        self.root = Path(output_dir)
        self.name = name
        self.path = self.root / name
        self.partial = self.root / ".partial" / name
        self._lock = None

    def lock(self):
        """The per-run lock (one instance per directory, re-entrant within this process)."""
        if self._lock is None:
            self._lock = atomic.lock_for(self.path, self.root / ".locks" / f"{self.name}.lock")
        return self._lock

    def is_complete(self) -> bool:
        if not all((self.path / f).is_file() for f in RESULT_FILES):
            return False
        return isinstance(_read_json(self.path / "metrics.json"), dict)  # torn or not an object: not finished

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def add_metrics(self, extra: dict) -> None:
        """Merge ``extra`` into a complete run's ``metrics.json``, replaced whole. The caller holds a lock that
        every writer of this directory's metrics takes (``kvbench.baseline.comparison_lock``)."""
        atomic.replace_file(self.path / "metrics.json", _json_text({**self.metrics(), **extra}))

    def recorded_identity(self) -> dict | None:
        recorded = _read_json(self.path / IDENTITY_FILE)
        return recorded if isinstance(recorded, dict) else None  # torn or not an object: no identity to compare

    def check_identity(self, identity: dict) -> None:
        """Refuse to reuse a finished result computed under another identity, naming what differs."""
        recorded = self.recorded_identity()
        if recorded is None:
            raise KVBenchError(f"{self.path} has no readable {IDENTITY_FILE} (written by an older kvbench, or damaged), so it cannot be "
                               f"checked against this run; overwrite=true reruns it")
        diff = identity_difference(recorded, _plain(identity))
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise KVBenchError(f"{self.path} holds a result of another setup ({shown}); overwrite=true reruns it, or choose another output_dir")

    # -- resume -------------------------------------------------------------------------------------
    def load_checkpoint(self, identity: dict) -> pd.DataFrame | None:
        """Rows finished by an interrupted run of the same identity, else None.

        A checkpoint of another identity is moved aside (``rows.jsonl.stale-<time>``), never appended to.
        Lines torn by a kill mid-write are dropped and the file rewritten without them, so later appends
        start on a clean line; those samples are simply computed again.
        """
        rows, saved = self.partial / "rows.jsonl", self.partial / IDENTITY_FILE
        if not rows.exists():
            if saved.exists() and _read_json(saved) != _plain(identity):
                saved.unlink()  # left by a kill while another setup's rows were moved aside: rows appended now are ours
            return None
        if _read_json(saved) != _plain(identity):
            stamp = time.strftime("%Y%m%dT%H%M%S")
            # The identity first: killed between the two, the rows stay with no identity, which no run resumes from.
            for path in (saved, rows):
                if path.exists():
                    os.replace(path, path.with_name(f"{path.name}.stale-{stamp}"))
            print(f"[kvbench] {self.name}: the checkpoint in {self.partial} was written by another setup; "
                  f"moved aside as rows.jsonl.stale-{stamp}, starting afresh")
            return None
        text = rows.read_text()
        lines = text.splitlines()
        records = [r for r in map(_record, lines) if r is not None]
        if len(records) != len(lines) or not text.endswith("\n"):
            atomic.write_text(rows, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))
        if not records:
            return None
        # Keep one row per sample (a row is never written twice by one run, but be safe on resume).
        return pd.DataFrame(records).drop_duplicates("sample_id").reset_index(drop=True)

    def start_over(self, identity: dict, launch: str | None) -> pd.DataFrame | None:
        """``overwrite=true``: no row of an earlier run is reused, except those this same launch checkpointed
        before it was stopped, else a requeued SLURM task would start from zero every time (``launch``: its Hydra
        job directory, the same for a requeue, new for every command). Other checkpoints are removed, and the
        fresh one is marked with ``launch``."""
        mark = self.partial / OVERWRITE_MARK
        if launch is not None and mark.exists() and mark.read_text() == launch:
            return self.load_checkpoint(identity)
        shutil.rmtree(self.partial, ignore_errors=True)
        if launch is not None:
            self.partial.mkdir(parents=True, exist_ok=True)
            atomic.write_text(mark, launch)
        return None

    def checkpoint(self, identity: dict, records: list[dict]) -> None:
        """Append finished rows (one JSON line each; a torn last line is dropped on resume). A write that fails (a
        full disk) is one error saying how to go on: the rows written before it are kept."""
        try:
            self._make_partial()
            saved = self.partial / IDENTITY_FILE
            if not saved.exists():
                atomic.write_text(saved, _json_text(_plain(identity)))
            with open(self.partial / "rows.jsonl", "a") as handle:
                for record in records:
                    handle.write(json.dumps(record, default=_json_default) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise KVBenchError(f"could not checkpoint {self.name} in {self.partial} ({exc.strerror or exc}); free space or "
                               f"fix {self.root} and rerun the same command to go on from the samples checkpointed "
                               "before it") from exc

    def _make_partial(self) -> None:
        """``.partial/<name>/``, created again if another run's ``discard_checkpoint`` removed the (then empty)
        ``.partial/`` between the two ``mkdir`` calls."""
        for attempt in range(3):
            try:
                self.partial.mkdir(parents=True, exist_ok=True)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def discard_checkpoint(self) -> None:
        """Remove this run's checkpoint, and ``.partial/`` itself once no run has one."""
        shutil.rmtree(self.partial, ignore_errors=True)
        try:
            self.partial.parent.rmdir()
        except OSError:
            pass

    def remove_leftovers(self) -> None:
        """Delete what a finalisation killed mid-way left beside the result: its staging directory, and the old result
        renamed aside by ``overwrite=true`` (each a whole copy; the rows are still in the checkpoint). Called under
        the run's lock, which every finalisation holds."""
        atomic.remove_leftovers(self.path)

    # -- completion ---------------------------------------------------------------------------------
    def staging(self) -> Path:
        return atomic.staging_dir(self.path)

    def finalize(self, staging: Path, predictions: pd.DataFrame, metrics: dict, config: DictConfig, identity: dict,
                 overwrite: bool) -> Path:
        """Write the result files into ``staging`` (artifacts may already be there) and move it into place."""
        serialise_predictions(predictions).to_csv(staging / "predictions.csv", index=False)
        (staging / "metrics.json").write_text(_json_text(metrics))
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
        (staging / IDENTITY_FILE).write_text(_json_text(_plain(identity)))
        with self.lock():
            if not overwrite and self.is_complete() and self.recorded_identity() == _plain(identity):
                shutil.rmtree(staging, ignore_errors=True)  # the same run finished elsewhere first: keep it
            else:
                atomic.replace_dir(staging, self.path)
            self.discard_checkpoint()
        return self.path


def _plain(identity: dict) -> dict:
    """The identity as it reads back from JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(identity, default=_json_default))


def _json_text(data) -> str:
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or torn."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "sample_id" in record else None


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
