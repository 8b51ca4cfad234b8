"""Settings the config files do not know are refused: Hydra takes ``+dataset.depth=[50]`` (a typo of ``depths``) or
``+seed_=1`` without a word, and the run would go through on the defaults under a name that claims the setting.

What a key may be is read from the config files themselves (``conf/config.yaml``, ``conf/dataset/<name>.yaml``,
every ``conf/model/*.yaml``), so a new setting needs no second list here. Press parameters have their own check
(``kvbench.presses.press_params``)."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from kvbench.config_defaults import file_values
from kvbench.errors import KVBenchError
from kvbench.results import CONF_DIR, TOP_LEVEL_KEYS


@functools.lru_cache(maxsize=None)
def declared_keys(*paths: Path) -> frozenset[str]:
    """The top-level keys the config files declare (their Hydra ``defaults`` list aside)."""
    keys: set[str] = set()
    for path in paths:
        keys |= {str(k) for k in (file_values(Path(path)) or {}) if k != "defaults"}
    return frozenset(keys)


def refuse_unknown(keys, known: frozenset[str], where: str, config_file: str) -> None:
    unknown = sorted(str(k) for k in keys if str(k) not in known)
    if unknown:
        raise KVBenchError(f"{where} has no setting {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                           f"(see {config_file})")


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a top-level, ``dataset.*`` or ``model.*`` key no config file declares."""
    refuse_unknown(cfg.keys(), TOP_LEVEL_KEYS, "kvbench", "conf/config.yaml")
    dataset_file = CONF_DIR / "dataset" / f"{cfg.dataset.name}.yaml"
    if dataset_file.is_file():
        refuse_unknown(cfg.dataset.keys(), declared_keys(dataset_file), f"dataset '{cfg.dataset.name}'",
                        f"conf/dataset/{cfg.dataset.name}.yaml")
    model_files = tuple(sorted((CONF_DIR / "model").glob("*.yaml")))
    if model_files and "model" in cfg:
        refuse_unknown(cfg.model.keys(), declared_keys(*model_files), "model", "conf/model/")
