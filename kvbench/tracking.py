"""Weights & Biases logging for finished runs.

A run's results are already on disk (``results/<run_name>/``) when this is called, so tracking must
never be the thing that loses them: a missing API key, no network or a W&B hiccup costs one warning
line, not the run. Online runs without credentials fall back to offline logging so nothing is lost
and ``wandb sync`` can upload later; wandb is never allowed to block on an interactive login prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kvbench.errors import KVBenchError, first_line

log = logging.getLogger("kvbench.tracking")

LOGGERS = ("none", "wandb")  # one conf/logger/<name>.yaml each
# auto: online when W&B finds an API key, else offline (``wandb sync`` uploads later); never a login prompt.
MODES = ("auto", "online", "offline", "disabled")
# What wandb.mode=auto follows when WANDB_MODE is set (wandb's own spellings, "dryrun" and "run" included).
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
DEFAULT_PROJECT = "kvbench"
# Columns too large to be useful in a W&B table (the full prompt is already in predictions.csv).
DROPPED_COLUMNS = ("context",)
MAX_CELL_CHARS = 2000
INIT_TIMEOUT_S = 30


def _as_config(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.create(dict(cfg) if isinstance(cfg, Mapping) else {})


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as plain containers; falls back to unresolved values outside a Hydra context.

    ``${hydra:...}`` interpolations only resolve while Hydra is running, and failing to log a config
    because of one would throw away an otherwise finished run.
    """
    conf = _as_config(cfg)
    try:
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - any resolver failure: keep the raw values instead
        return OmegaConf.to_container(conf, resolve=False)  # type: ignore[return-value]


def flatten_metrics(metrics: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"speed": {"prefill_seconds": 1}}`` -> ``{"speed/prefill_seconds": 1}``; W&B summaries chart flat keys."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}{sep}{key}" if prefix else str(key), sub)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = json.dumps(value, default=str)
        else:
            flat[prefix] = value

    walk("", metrics)
    return flat


def sweep_group() -> str | None:
    """Name of the Hydra multirun sweep directory, so all jobs of one sweep land in one W&B group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    try:
        return Path(str(hydra_cfg.sweep.dir)).name or None
    except Exception:  # noqa: BLE001 - an unresolvable sweep dir just means "no group"
        return None


def has_credentials() -> bool:
    """Whether W&B has an API key, checked without ever prompting or touching the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:
        # wandb < 0.22 has no `prompt` argument; its key lookup lives on the (later deprecated) wandb.api.
        return bool(getattr(wandb.api, "api_key", None))
    except Exception:  # noqa: BLE001 - any failure to find credentials means "not logged in"
        return False


def _settings(mode: str):
    import wandb

    wanted: dict[str, Any] = {
        "console": "off",
        "init_timeout": INIT_TIMEOUT_S,
        "save_code": False,
        "x_disable_stats": True,
        "x_disable_machine_info": True,
    }
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    else:
        wanted = {k: wanted[k] for k in ("console", "init_timeout")}
    return wandb.Settings(**wanted)


def configured_mode(cfg: Any) -> str:
    """``wandb.mode``, where ``auto`` defers to a ``WANDB_MODE`` the user exported (a compute node told to stay
    offline must not wait for an online init to time out) and otherwise stays ``auto``."""
    mode = str(OmegaConf.select(_as_config(cfg), "wandb.mode", default="auto") or "auto")
    if mode not in MODES:
        raise KVBenchError(f"wandb.mode must be one of {', '.join(MODES)}, got '{mode}'")
    exported = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode != "auto" or not exported:
        return mode
    if exported not in ENV_MODES:
        raise KVBenchError(f"WANDB_MODE={exported} is not a W&B mode: set it to online, offline or disabled, or unset it")
    return ENV_MODES[exported]


def configured_project(cfg: Any) -> str:
    """``wandb.project``, else the ``WANDB_PROJECT`` the user exported, else ``kvbench``."""
    project = OmegaConf.select(_as_config(cfg), "wandb.project", default=None)
    return str(project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT)


def run_id(run_dir: str | Path, identity: Mapping[str, Any] | None) -> str:
    """The W&B id of a result directory's run: the same for the same directory and identity, so a comparison
    written into ``metrics.json`` after the run was logged (its baseline finished later) reaches the same W&B run,
    and a rerun of the same run (``overwrite=true``) updates it instead of adding a twin."""
    key = json.dumps({"dir": str(Path(run_dir).resolve()), "identity": identity or {}}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def check_logger(cfg: Any) -> str:
    """The configured logger's name, checked before a run starts (a bad one must not cost a whole benchmark).

    Accepts the config group (``logger=wandb`` -> ``logger: {name: wandb}``) and a bare string (``logger: wandb``
    in a hand-written config).
    """
    conf = _as_config(cfg)
    logger = OmegaConf.select(conf, "logger", default=None)
    name = logger if isinstance(logger, str) or logger is None else OmegaConf.select(conf, "logger.name", default=None)
    name = "none" if name is None else str(name)
    if name not in LOGGERS:
        raise KVBenchError(f"unknown logger '{name}'; valid names: {', '.join(LOGGERS)}")
    if name == "wandb":
        configured_mode(conf)
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise KVBenchError("logger=wandb needs the wandb package: pip install wandb (or use logger=none)") from exc
    return name


def start_run(
    *,
    project: str,
    mode: str = "online",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    directory: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    run_id: str | None = None,
):
    """``wandb.init`` that degrades instead of failing; returns the run, or None when logging is impossible.
    With ``run_id`` the run is that W&B run, resumed when it exists.

    Auto -> online with credentials, else offline (silently); online without credentials -> offline (with a
    warning); online init failure (no network, server error) -> one retry offline; offline failure -> warning
    and None.
    """
    if mode not in MODES:
        raise KVBenchError(f"wandb.mode must be one of {', '.join(MODES)}, got '{mode}'")
    import wandb

    if mode == "auto":
        mode = "online" if has_credentials() else "offline"

    if directory is not None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("W&B: cannot use %s as the W&B directory (%s); continuing without W&B logging", directory, exc)
            return None
    if mode == "online" and not has_credentials():
        log.warning(
            "W&B: no API key (run `wandb login` or set WANDB_API_KEY); logging offline under %s, "
            "upload later with `wandb sync`",
            Path(directory or os.environ.get("WANDB_DIR", ".")) / "wandb",
        )
        mode = "offline"
    kwargs = dict(
        project=project,
        entity=entity or None,
        group=group or None,
        name=name,
        dir=str(directory) if directory is not None else None,
        config=dict(config or {}),
        job_type=job_type,
        tags=tags,
        settings=_settings(mode),
    )
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    for attempt in ((mode,) if mode != "online" else ("online", "offline")):
        try:
            return wandb.init(mode=attempt, **kwargs)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types (CommError, UsageError, timeouts)
            message = first_line(exc)
            if attempt == "online":
                log.warning("W&B: online init failed (%s); retrying offline", message)
                try:  # the failed init still holds its run id in wandb's service: a retry with that id needs a new one
                    wandb.teardown()
                except Exception:  # noqa: BLE001 - nothing to tear down
                    pass
            else:
                log.warning("W&B: could not start a %s run (%s); continuing without W&B logging", attempt, message)
    return None


def predictions_table(predictions: pd.DataFrame):
    """Predictions as a wandb.Table: without the prompt context, with every cell a scalar W&B accepts."""
    import wandb

    frame = predictions.drop(columns=[c for c in DROPPED_COLUMNS if c in predictions.columns]).copy()
    for column in frame.columns:
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            # Nullable pandas dtypes (Int64, boolean) hold pd.NA, which wandb's type checker rejects.
            if isinstance(series.dtype, pd.api.extensions.ExtensionDtype):
                frame[column] = series.astype(object).where(series.notna(), None)
        else:
            frame[column] = series.map(_cell)
    return wandb.Table(dataframe=frame.reset_index(drop=True))


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return value if len(value) <= MAX_CELL_CHARS else value[:MAX_CELL_CHARS] + "…"


def wandb_dir(cfg: Any, run_dir: str | Path) -> Path:
    """Where wandb writes its files: ``wandb.dir``, else $WANDB_DIR, else ``<output_dir>/wandb``."""
    conf = _as_config(cfg)
    explicit = OmegaConf.select(conf, "wandb.dir", default=None)
    if explicit:
        return Path(str(explicit))
    if os.environ.get("WANDB_DIR"):
        return Path(os.environ["WANDB_DIR"])
    output_dir = OmegaConf.select(conf, "output_dir", default=None)
    return (Path(str(output_dir)) if output_dir else Path(run_dir).parent) / "wandb"


def recorded_identity(run_dir: Path) -> dict | None:
    """A finished run's ``identity.json`` (dtype, device, versions: what its config leaves as ``auto``), or None."""
    try:
        return json.loads((Path(run_dir) / "identity.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def log_run(cfg: Any, metrics: dict, predictions: pd.DataFrame, run_dir: Path) -> None:
    """Log one finished run (config and identity, flattened metrics, predictions table, per-run figures) to W&B.

    ``cfg`` is the config the run recorded (``config.yaml``); the identity comes from the run's ``identity.json``.
    Never raises for W&B problems: the run's files on disk are the source of truth, W&B is a mirror.
    """
    conf = _as_config(cfg)
    mode = configured_mode(conf)
    if mode == "disabled":
        return
    run_dir = Path(run_dir)
    name = str(metrics.get("run_name") or run_dir.name)
    try:
        _log_run(conf, mode, name, metrics, predictions, run_dir, recorded_identity(run_dir))
    except Exception as exc:  # noqa: BLE001 - never lose a finished run (or the rest of a sweep) over W&B
        log.warning("W&B: logging %s failed (%s); results are still in %s", name, exc, run_dir)


def _result_run(conf: DictConfig, mode: str, run_dir: Path, identity: Mapping[str, Any] | None, **kwargs):
    """The W&B run of one result directory (its id follows from the directory and identity), with the W&B settings
    of the config it recorded."""
    return start_run(project=configured_project(conf), mode=mode, entity=OmegaConf.select(conf, "wandb.entity", default=None),
                     directory=wandb_dir(conf, run_dir), job_type="eval", run_id=run_id(run_dir, identity), **kwargs)


def _log_run(conf: DictConfig, mode: str, name: str, metrics: dict, predictions: pd.DataFrame, run_dir: Path,
             identity: Mapping[str, Any] | None) -> None:
    tags = [str(metrics[k]) for k in ("dataset", "model", "press") if metrics.get(k)]
    if metrics.get("query_aware"):
        tags.append("query-aware")
    config = resolved_config(conf)
    if identity is not None:
        config["identity"] = identity
    run = _result_run(conf, mode, run_dir, identity, name=name, config=config, tags=tags,
                      group=OmegaConf.select(conf, "wandb.group", default=None) or sweep_group())
    if run is None:
        return
    try:
        import wandb

        run.summary.update(flatten_metrics(metrics))
        payload: dict[str, Any] = {}
        if predictions is not None and len(predictions.columns):
            payload["predictions"] = predictions_table(predictions)
        # Per-run figures written by metric modules (e.g. the needle heatmap).
        for image in sorted(run_dir.glob("*.png")):
            payload[f"figures/{image.stem}"] = wandb.Image(str(image))
        if payload:
            run.log(payload)
    except Exception as exc:  # noqa: BLE001 - never lose a finished run over a logging problem
        log.warning("W&B: logging %s failed (%s); results are still in %s", name, exc, run_dir)
    finally:
        run.finish()


def log_added_metrics(run_dir: Path, added: Mapping[str, Any]) -> None:
    """Add metrics written into a finished run's ``metrics.json`` after it was logged (the comparison with a baseline
    that finished later) to that run's W&B summary, with the W&B settings the run itself recorded. A run that was
    not mirrored to W&B stays so."""
    run_dir = Path(run_dir)
    try:
        conf = OmegaConf.load(run_dir / "config.yaml")
        identity = recorded_identity(run_dir)
        if check_logger(conf) != "wandb":
            return
        mode = configured_mode(conf)
        if mode == "disabled":
            return
        # no group: the sweep running now is the baseline's, not the run's (a resumed run keeps its own)
        run = _result_run(conf, mode, run_dir, identity, name=run_dir.name)
        if run is None:
            return
        try:
            run.summary.update(flatten_metrics(dict(added)))
        finally:
            run.finish()
    except Exception as exc:  # noqa: BLE001 - metrics.json already holds the numbers; W&B is a mirror
        log.warning("W&B: updating %s failed (%s); its metrics.json is up to date", run_dir.name, exc)
