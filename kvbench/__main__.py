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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kvbench.results import variant_from_overrides
    from kvbench.runner import execute

    try:
        variant = variant_from_overrides(list(HydraConfig.get().overrides.task))
        return execute(cfg, variant).get("score")
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
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
