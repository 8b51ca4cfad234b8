"""Result directories: naming, atomic completion, skip and resume.

``results/<dataset>__<model>__<press>__<ratio>[__<variant>]/`` holds ``predictions.csv``, ``metrics.json``
and ``config.yaml``. A run is assembled in a hidden staging directory and renamed into place only when all
three files are written, so a killed run never leaves a complete-looking directory. Finished samples are
checkpointed in ``.partial/<name>/`` so an interrupted run resumes where it stopped. Hidden directories
(leading dot) are never results.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

RESULT_FILES = ("predictions.csv", "metrics.json", "config.yaml")
# Overrides that never change what a run computes (where it goes, how it is logged, what runs it).
NEUTRAL_KEYS = ("output_dir", "overwrite", "device", "logger", "wandb", "hydra", "model.device")
IDENTITY_GROUPS = ("model", "dataset", "press", "compression_ratio")
MAX_VARIANT = 80


def format_ratio(ratio: float) -> str:
    """0.5 -> '0.50', 0.875 -> '0.875', 0.3333 -> '0.3333': unambiguous and sortable by eye."""
    text = f"{float(ratio):.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")


def variant_from_overrides(overrides: list[str]) -> str:
    """Readable suffix from the command-line overrides that change results beyond the four name parts."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in IDENTITY_GROUPS or key.split(".")[0] in NEUTRAL_KEYS or key in NEUTRAL_KEYS:
            continue
        if key == "query_aware":
            if str(value).lower() in ("true", "1", "yes"):
                parts.append("query_aware")
            continue
        # press.window_size / dataset.context_length read better without their group (one level only)
        group, _, leaf = key.partition(".")
        short = leaf if group in ("press", "dataset") and "." not in leaf else key
        parts.append(f"{short}={value}")
    variant = _clean("__".join(sorted(parts)))
    if len(variant) > MAX_VARIANT:
        digest = hashlib.sha1(variant.encode()).hexdigest()[:10]
        variant = f"{variant[: MAX_VARIANT - 12]}-{digest}"
    return variant


def run_name(dataset: str, model: str, press: str, ratio: float, variant: str = "") -> str:
    name = "__".join([dataset, model.replace("/", "-"), press, format_ratio(ratio)])
    return f"{name}__{variant}" if variant else name


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def serialise_predictions(df: pd.DataFrame) -> pd.DataFrame:
    """Lists/dicts as JSON so the CSV round-trips; the long context is left out (it is regenerated)."""
    out = df.drop(columns=[c for c in ("context", "text") if c in df.columns])
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, tuple, dict))).any():
            out[column] = out[column].map(lambda v: json.dumps(list(v) if isinstance(v, tuple) else v))
    return out


class RunDirectory:
    def __init__(self, output_dir: str | Path, name: str):
        self.root = Path(output_dir)
        self.name = name
        self.path = self.root / name
        self.partial = self.root / ".partial" / name

    def is_complete(self) -> bool:
        if not all((self.path / f).is_file() for f in RESULT_FILES):
            return False
        try:
            json.loads((self.path / "metrics.json").read_text())
        except (OSError, ValueError):
            return False
        return True

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    # -- resume -------------------------------------------------------------------------------------
    def load_checkpoint(self, config: DictConfig) -> pd.DataFrame | None:
        """Rows finished by an interrupted run of the same configuration, else None."""
        rows, saved = self.partial / "rows.jsonl", self.partial / "config.yaml"
        if not rows.exists() or not saved.exists():
            return None
        if OmegaConf.to_container(OmegaConf.load(saved), resolve=True) != _identity(config):
            return None
        records = []
        for line in rows.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill mid-write; that sample is simply computed again
        if not records:
            return None
        # Two workers running the same configuration append to the same file: keep one row per sample.
        return pd.DataFrame(records).drop_duplicates("sample_id").reset_index(drop=True)

    def checkpoint(self, config: DictConfig, records: list[dict]) -> None:
        """Append finished rows (one JSON line each; a torn last line is ignored on resume)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        saved = self.partial / "config.yaml"
        if not saved.exists():
            _atomic_write_text(saved, OmegaConf.to_yaml(OmegaConf.create(_identity(config))))
        with open(self.partial / "rows.jsonl", "a") as handle:
            for record in records:
                handle.write(json.dumps(record, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # -- completion ---------------------------------------------------------------------------------
    def staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{self.name}-", dir=self.root))
        staging.chmod(0o755)  # mkdtemp makes it private; results are meant to be shared
        return staging

    def finalize(self, staging: Path, predictions: pd.DataFrame, metrics: dict, config: DictConfig, overwrite: bool) -> Path:
        """Write the three files into ``staging`` (artifacts may already be there) and rename it into place."""
        serialise_predictions(predictions).to_csv(staging / "predictions.csv", index=False)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
        if self.path.exists():
            if not overwrite and self.is_complete():
                shutil.rmtree(staging)  # another worker finished the same configuration first
                return self.path
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{self.name}-", dir=self.root))
            try:
                os.replace(self.path, trash / self.name)
            except FileNotFoundError:
                pass  # another worker moved it away in the meantime
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, self.path)
        except OSError as exc:
            # Another worker renamed its copy of this configuration into place after our check above: a
            # directory cannot be renamed onto a non-empty one. Same configuration, same results: keep theirs.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.is_complete():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return self.path
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path


def _identity(config: DictConfig) -> dict:
    data = OmegaConf.to_container(config, resolve=True)
    for key in NEUTRAL_KEYS:
        data.pop(key, None)
    return data


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
