"""A compressed perplexity run relates itself to the uncompressed (no_press) run of the same windows.

The comparison lands in the compressed run's ``metrics.json`` (``no_press_perplexity``, ``delta``, ``ratio``)
whichever of the two finishes first: a compressed run finishing after its baseline reads it, and a baseline
finishing after compressed runs writes the comparison into theirs. Both happen under one lock per output
directory, dataset and model, so two runs finishing at once in different processes (a sweep's prefill group
split over GPUs, a press listed before no_press) cannot both miss each other.
"""

from __future__ import annotations

import glob
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig

from kvbench import atomic
from kvbench.results import EXECUTION_KEYS, RunDirectory, identity_apart_from, run_prefix

# What a run may differ in from the no_press run it is compared with: the press and how much it removes, and
# query-awareness (which means nothing without compression); and how the runs were executed (batch size, cache
# layout, decode timing: a perplexity moves by rounding only, under 1e-5 relative), a baseline run as this run was
# being preferred.
PRESS_KEYS = ("press", "compression_ratio", "budget", "query_aware")
BASELINE_FREE_KEYS = (*PRESS_KEYS, *EXECUTION_KEYS)
COMPARISON_KEY = "no_press_perplexity"


@contextmanager
def comparison_lock(cfg: DictConfig) -> Iterator[None]:
    """Held while a perplexity run of this dataset and model looks for its baseline and finalises, or while a
    baseline finalises and fills in the runs that finished before it. Never held while waiting for a run's own
    lock, so it cannot close a cycle with the per-run locks a sweep holds."""
    prefix = run_prefix(cfg.dataset.name, cfg.model.name)
    with atomic.lock_for(Path(cfg.output_dir), Path(cfg.output_dir) / ".locks" / f"{prefix}.comparisons.lock"):
        yield


def _runs(cfg: DictConfig, press: str = "") -> list[RunDirectory]:
    """The complete runs of this dataset and model in the output directory (of one press when ``press`` is given)."""
    head = f"{run_prefix(cfg.dataset.name, cfg.model.name)}__" + (f"{press}__" if press else "")
    runs = [RunDirectory(cfg.output_dir, path.name) for path in sorted(Path(cfg.output_dir).glob(glob.escape(head) + "*"))]
    return [run for run in runs if run.is_complete()]


def baseline_metrics(cfg: DictConfig, identity: dict) -> dict | None:
    """The finished no_press run of the same windows, found by its recorded identity, not by its name.

    A name carries the press' own parameters (``press.clustering=kmeans``) and may end in a digest, neither of which
    the baseline's name shares; and an equal name says nothing of the versions, dtype or device that computed it.
    So the baseline is any complete no_press run of this dataset and model whose identity equals this run's apart
    from ``BASELINE_FREE_KEYS``; none, and the run records no comparison rather than a wrong one.
    """
    wanted = identity_apart_from(identity, BASELINE_FREE_KEYS)
    exact = identity_apart_from(identity, PRESS_KEYS)
    found = None
    for candidate in _runs(cfg, "no_press"):
        recorded = candidate.recorded_identity()
        if recorded and identity_apart_from(recorded, BASELINE_FREE_KEYS) == wanted:
            if identity_apart_from(recorded, PRESS_KEYS) == exact:
                return candidate.metrics()  # run as this run was (same batch size, layout): preferred
            found = found or candidate
    return found.metrics() if found is not None else None


def fill_in_comparisons(cfg: DictConfig, identity: dict, baseline: dict,
                        compare: Callable[[dict, dict], dict]) -> list[tuple[RunDirectory, dict]]:
    """Write the comparison with a just-finished baseline into the complete compressed runs that lack one; each run
    filled in with the metrics added to it (for its W&B mirror). Each ``metrics.json`` is replaced whole (a reader
    sees the old one or the new)."""
    wanted = identity_apart_from(identity, BASELINE_FREE_KEYS)
    filled = []
    for run in _runs(cfg):
        recorded = run.recorded_identity()
        if not recorded or recorded.get("config", {}).get("press", {}).get("name") == "no_press":
            continue
        metrics = run.metrics()
        if COMPARISON_KEY in metrics or identity_apart_from(recorded, BASELINE_FREE_KEYS) != wanted:
            continue
        added = compare(metrics, baseline)
        run.add_metrics(added)
        filled.append((run, added))
    return filled


def mend_comparisons(cfg: DictConfig, run: RunDirectory,
                     compare: Callable[[dict, dict], dict]) -> list[tuple[RunDirectory, dict]]:
    """For a run found complete again: the comparisons a kill or a full disk between its publication and its
    comparison left unwritten, written now (each run filled in, with the metrics added). A no_press run fills in the
    compressed runs still lacking one; a compressed run lacking one looks for its baseline again. Without this, a
    rerun only said "already complete" and the comparison stayed missing for good. The caller holds the
    comparison lock."""
    identity, metrics = run.recorded_identity(), run.metrics()
    if identity is None:
        return []
    if cfg.press.name == "no_press":
        return fill_in_comparisons(cfg, identity, metrics, compare)
    if COMPARISON_KEY in metrics:
        return []
    reference = baseline_metrics(cfg, identity)
    if reference is None:
        return []
    added = compare(metrics, reference)
    run.add_metrics(added)
    return [(run, added)]
