"""Hydra overrides anywhere on a benchmark script's command line.

argparse gives an option with ``nargs="+"`` every following word that does not start with ``-``, so
``--batch-sizes 1 4 dataset=pg19`` would read ``dataset=pg19`` as a batch size. Overrides are the words with an
``=`` that are not options: moved behind a ``--``, they always reach the positional ``overrides``.
"""

from __future__ import annotations


def overrides_last(argv: list[str]) -> list[str]:
    if "--" in argv:  # the user already separated them
        return argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    options = [a for a in argv if not ("=" in a and not a.startswith("-"))]
    return [*options, "--", *overrides] if overrides else options
