"""Hydra overrides anywhere on a benchmark script's command line.

argparse gives an option with ``nargs="+"`` every following word that does not start with ``-``, so
``--batch-sizes 1 4 dataset=pg19`` would read ``dataset=pg19`` as a batch size. Overrides are the words with an
``=`` that are not options: moved behind a ``--``, they always reach the positional ``overrides``.
"""

from __future__ import annotations


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def overrides_last(argv: list[str]) -> list[str]:
    if "--" in argv:  # the user already separated them
        return argv
    overrides = [a for a in argv if _is_override(a)]
    options = [a for a in argv if not _is_override(a)]
    return [*options, "--", *overrides] if overrides else options
