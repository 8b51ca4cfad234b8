"""``python -m kvbench [overrides] [-m]``: the Hydra entry point."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kvbench.config_defaults import CONF_DIR
from kvbench.errors import KVBenchError

GROUP_HINTS = {
    "model": "or keep a preset and set model.name_or_path=<local dir or hub id> model.name=<short name>",
    "dataset": "",
    "press": "",
    "logger": "",
}


GROUP_KEYS_SAID = {"press": "parameter", "dataset": "setting", "model": "setting"}


def check_group_choices(argv: list[str]) -> None:
    """Unknown model/dataset/press/logger names: one line listing the valid ones (Hydra's own error is a page)."""
    for arg in argv:
        group, sep, value = arg.partition("=")
        if not sep or group not in GROUP_HINTS:
            continue
        valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice and choice not in valid and not choice.startswith(("choice(", "range(", "glob(")):
                hint = GROUP_HINTS[group]
                raise KVBenchError(f"unknown {group} '{choice}'; valid names: {', '.join(valid)}" + (f" ({hint})" if hint else ""))


def _chosen(argv: list[str], group: str) -> list[str]:
    """The config names of ``group`` a run or sweep uses: ``group=...`` on the command line, else the
    ``hydra/sweeper=<preset>``'s parameter, else the default of ``conf/config.yaml``; sweep syntax (``a,b``,
    ``choice(...)``, ``glob(...)``) expanded as Hydra expands it."""
    value = None
    for arg in argv:
        key, sep, given = arg.partition("=")
        if sep and key.lstrip("+") == group:
            value = given
        elif sep and key == "hydra/sweeper" and value is None:
            preset = CONF_DIR / "hydra" / "sweeper" / f"{given}.yaml"
            params = OmegaConf.load(preset).get("params", {}) if preset.is_file() else {}
            value = None if params.get(group) is None else str(params[group])
    if value is None:
        defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
        value = next((str(d[group]) for d in defaults if isinstance(d, Mapping) and group in d), "")
    return _expanded(group, value)


def _expanded(group: str, value: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    try:
        override = OverridesParser.create().parse_override(f"{group}={value}")
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return []
    if isinstance(override.value(), Glob):
        return override.value().filter(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
    if override.is_sweep_override():
        return [str(name) for name in override.sweep_string_iterator()]
    return [str(override.value())] if value else []


def check_group_keys(argv: list[str]) -> None:
    """``press.window_size=16`` for a press without that parameter (``dataset.*``, ``model.*`` alike): one line naming
    the valid ones. Hydra's own error is six lines, and its advice (``+press.window_size=16``) fails in turn."""
    for arg in argv:
        key, sep, _ = arg.partition("=")
        group, dot, leaf = key.partition(".")
        if not sep or not dot or group not in GROUP_KEYS_SAID:  # "+group.key" adds a key: refused after composing
            continue
        leaf, said = leaf.split(".")[0], GROUP_KEYS_SAID[group]
        known = {name: _declared(group, name) for name in _chosen(argv, group)}
        lacking = [name for name, keys in known.items() if keys is not None and leaf not in keys and leaf != "name"]
        if len(lacking) == 1:
            keys = known[lacking[0]]
            valid = f"valid: {', '.join(keys)}" if keys else f"it has no {said}s"
            raise KVBenchError(f"{group} '{lacking[0]}' has no {said} {leaf}; {valid} (see conf/{group}/{lacking[0]}.yaml)")
        if lacking:
            having = [name for name in known if name not in lacking]
            hint = f"; sweep those that have it: {group}={','.join(having)}" if having else ""
            raise KVBenchError(f"{group} {', '.join(lacking)} have no {said} {leaf} (see conf/{group}/){hint}")


def _declared(group: str, name: str) -> list[str] | None:
    """The keys ``conf/<group>/<name>.yaml`` declares (``name`` itself aside); None for a name it has no file for."""
    from kvbench.known_keys import declared_keys

    path = CONF_DIR / group / f"{name}.yaml"
    return sorted(declared_keys(path) - {"name"}) if path.is_file() else None


def check_top_level_keys(argv: list[str]) -> None:
    """``compresion_ratio=0.5``: one line naming the known settings. Hydra's own error is six lines, and its advice
    (``+compresion_ratio=0.5``) is refused in turn, after composing."""
    from kvbench.known_keys import declared_keys, refuse_unknown

    known = declared_keys(CONF_DIR / "config.yaml") | set(GROUP_HINTS)
    for arg in argv:
        key, sep, _ = arg.partition("=")
        top = key.split(".")[0]
        if sep and not key.startswith(("+", "~", "-")) and "/" not in key and top != "hydra":
            refuse_unknown([top], known, "kvbench", "conf/config.yaml")


def check_launcher(argv: list[str]) -> None:
    """What a launcher needs before Hydra starts it: the GPU launchers' resolver (``--cfg hydra --resolve`` reads it
    without creating the callbacks that import it), and for SLURM a machine with ``srun`` (submitit's own error is a
    page of traceback, in every job)."""
    launchers = {value for arg in argv for key, sep, value in [arg.partition("=")] if sep and key == "hydra/launcher"}
    if launchers & {"joblib_gpus", "shared_prefill_gpus"}:
        import kvbench.gpu_pool  # noqa: F401 - registers ${kvbench.gpu_count:...}
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    if "slurm" in launchers and multirun and shutil.which("srun") is None:
        raise KVBenchError("hydra/launcher=slurm submits through SLURM, and this machine has no srun: run the sweep on "
                           "a SLURM login node, or use hydra/launcher=slurm_local to run its jobs here")


def check_output_dir(argv: list[str]) -> None:
    """An ``output_dir`` that cannot be created: one line (Hydra creates its run directory inside it before kvbench
    runs, and its own error is a traceback)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "output_dir" and value and "," not in value:
            from kvbench.results import create_output_dir

            create_output_dir(value)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kvbench.results import run_variant
    from kvbench.runner import check_budget_alone, execute, exit_interrupted

    try:
        overrides = list(HydraConfig.get().overrides.task)
        check_budget_alone(cfg, overrides)
        variant = run_variant(cfg, overrides, HydraConfig.get().runtime.choices)
        return execute(cfg, variant).get("score")
    except KeyboardInterrupt:
        exit_interrupted(cfg.output_dir)
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # sys.exit would end the whole sweep (Hydra only catches Exception): raising marks this job failed,
            # the launcher still runs the others, and Hydra reports the failure when the sweep ends.
            raise
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_top_level_keys(sys.argv[1:])
        check_group_choices(sys.argv[1:])
        check_group_keys(sys.argv[1:])
        check_launcher(sys.argv[1:])
        check_output_dir(sys.argv[1:])
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
