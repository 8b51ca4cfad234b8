"""What the config files give a setting when the command line does not: an override that spells out that value
(``seed=42``, ``press.window_size=64``) is the same run as the plain command and must not name a second result
directory (which was then computed again, and listed twice on the leaderboard).

Read from the files themselves, as Hydra composes them: ``conf/config.yaml`` for top-level keys, the chosen
``conf/<group>/<choice>.yaml`` for ``<group>.<key>``. Where the files do not say plainly (a key they lack, an
interpolation, a group file from outside ``conf/``) the override is taken to change something.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "dataset", "press", "logger")
UNKNOWN = object()


@functools.lru_cache(maxsize=None)
def file_values(path: Path) -> dict | None:
    """A config file as written (interpolations unresolved), read once per process; None when there is none. Shared
    between callers: read it, never change it."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def default_of(key: str, choices: Mapping[str, str]) -> object:
    """The value the config files give ``key`` under these group choices (Hydra's ``runtime.choices``), plain
    Python; ``UNKNOWN`` where they do not say plainly."""
    group, _, leaf = key.partition(".")
    if group in GROUPS and leaf:
        path, parts = CONF_DIR / group / f"{choices.get(group)}.yaml", leaf.split(".")
    else:
        path, parts = CONF_DIR / "config.yaml", key.split(".")
    node = file_values(path)
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return UNKNOWN
        node = node[part]
    if "${" in json.dumps(node):  # an interpolation: its value depends on other settings
        return UNKNOWN
    return node


def spells_out_default(cfg: DictConfig, choices: Mapping[str, str], override: str) -> bool:
    """Whether ``override`` (``key=value`` as Hydra recorded it) leaves ``key`` at the config files' value. Compared
    as JSON, so ``true`` is not ``1`` and ``1`` is not ``1.0``."""
    if override.startswith("~"):
        return False
    key = override.lstrip("+").partition("=")[0]  # a key "+" appends is in no file: UNKNOWN below
    default = default_of(key, choices)
    if default is UNKNOWN:
        return False
    value = OmegaConf.select(cfg, key, default=UNKNOWN)
    if value is UNKNOWN:
        return False
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.dumps(value, sort_keys=True) == json.dumps(default, sort_keys=True)
