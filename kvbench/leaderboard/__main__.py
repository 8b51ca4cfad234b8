"""``python -m kvbench.leaderboard [results_dir] [--out DIR] [--wandb]``: rebuild the leaderboard files."""

from __future__ import annotations

import argparse
import logging
import sys

from kvbench.errors import KVBenchError
from kvbench.leaderboard import build_leaderboard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI flags; kept separate so tests and wrappers can inspect defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.leaderboard",
        description="Collect finished kvbench runs into CSV/Markdown tables, PNG plots and one HTML page.",
    )
    parser.add_argument("results_dir", nargs="?", default="results", help="directory holding run dirs (default: results)")
    parser.add_argument("--out", default=None, help="output directory (default: <results_dir>/leaderboard)")
    parser.add_argument("--wandb", action="store_true", help="also push the table and plots to one W&B run")
    parser.add_argument("--wandb-project", default="kvbench", help="W&B project (default: kvbench)")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (default: your default entity)")
    parser.add_argument(
        "--wandb-mode",
        default="online",
        choices=("online", "offline", "disabled"),
        help="W&B mode; online without an API key falls back to offline (default: online)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes become one 'error:' line and exit status 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        board = build_leaderboard(
            args.results_dir,
            args.out,
            push_wandb=args.wandb,
            wandb_project=args.wandb_project,
            wandb_mode=args.wandb_mode,
            wandb_entity=args.wandb_entity,
        )
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(board.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
