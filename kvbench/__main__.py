"""``python -m kvbench [overrides] [-m]``: the Hydra entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kvbench.errors import KVBenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUP_HINTS = {
    "model": "or keep a preset and set model.name_or_path=<local dir or hub id> model.name=<short name>",
    "dataset": "",
    "press": "",
    "logger": "",
}


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


def check_output_dir(argv: list[str]) -> None:
    """An ``output_dir`` that cannot be created: one line (Hydra creates its run directory inside it before kvbench
    runs, and its own error is a traceback)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "output_dir" and value and "," not in value:
            from kvbench.results import create_output_dir

            create_output_dir(value)


def check_budget_alone(cfg: DictConfig, overrides: list[str]) -> None:
    """``budget`` keeps N tokens per head whatever the ratio says: a ratio given beside it would name and record a run
    that does not use it (and a sweep over ratios would compute one run under several names)."""
    if cfg.get("budget") is None:
        return
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "compression_ratio":
            raise KVBenchError(f"budget={cfg.budget} keeps {cfg.budget} tokens per head whatever compression_ratio says; "
                               f"drop compression_ratio={value} (or budget)")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kvbench.results import variant_from_overrides
    from kvbench.runner import execute

    try:
        overrides = list(HydraConfig.get().overrides.task)
        check_budget_alone(cfg, overrides)
        variant = variant_from_overrides(overrides)
        return execute(cfg, variant).get("score")
    except KeyboardInterrupt:
        # every finished sample is already in the run's checkpoint (<output_dir>/.partial/<run>/)
        print(f"interrupted: the samples finished so far are kept under {cfg.output_dir}/.partial; rerun the same "
              "command to resume from them", file=sys.stderr)
        sys.exit(130)
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # sys.exit would end the whole sweep (Hydra only catches Exception): raising marks this job failed,
            # the launcher still runs the others, and Hydra reports the failure when the sweep ends.
            raise
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
        check_output_dir(sys.argv[1:])
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
