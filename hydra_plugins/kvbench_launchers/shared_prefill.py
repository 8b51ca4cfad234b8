"""``hydra/launcher=shared_prefill``: one prefill per sample for all the (press, ratio) jobs of a sweep.

Hidden states during prefill do not depend on the press, so jobs that differ only in ``press``,
``compression_ratio`` and ``budget`` can share one prefill per sample and only score, select and decode (or
teacher-force) per job. This launcher groups a sweep's jobs by ``kvbench.runner.prefill_group_key`` (everything
else) and hands each group to ``kvbench.runner.execute_many``, which writes every job's ordinary result
directory (its own identity, checkpoint and lock; finished ones are reused) exactly as a solo run would.

Each job still goes through Hydra's ``run_job`` (its job directory under the sweep dir, its callbacks, its
``JobReturn``): the first job of a group computes the whole group, the others return their cached result. A
failure of the group (a ``KVBenchError`` or any other exception) marks each of its jobs failed; other groups
still run, and Hydra reports the failure when the sweep ends, as with its basic launcher. A job refused on its
own (a finished directory of another setup) fails alone: the rest of its group is still computed. A worker
process that dies (killed by the system for memory, a crash in a kernel) is another matter: loky cannot say which
group it ran and ends every worker with it, so the sweep stops, with one line saying to rerun it (finished runs
are kept, interrupted ones resume from their checkpoints).

``max_jobs_per_prefill`` splits large groups (each job holds its own compressed cache during a sample);
``n_jobs > 1`` spreads groups over joblib/loky worker processes (``shared_prefill_gpus``: one per GPU, pinned by
the ``gpu_pool`` callback, which refuses jobs in the launching process, hence ``worker_processes``).
"""

# No `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations.
import copy
import functools
import logging
import os
import re
import sys
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class SharedPrefillLauncherConf:
    _target_: str = "hydra_plugins.kvbench_launchers.shared_prefill.SharedPrefillLauncher"
    # null: a whole group shares one prefill; n: at most n jobs per prefill (each holds a compressed cache at once)
    max_jobs_per_prefill: Optional[int] = None
    # 1: groups one after the other in this process; n > 1: groups spread over n joblib/loky worker processes
    n_jobs: int = 1
    # true: run groups in worker processes even when n_jobs is 1 (the gpu_pool callback pins worker processes)
    worker_processes: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="shared_prefill", node=SharedPrefillLauncherConf, provider="kvbench")


@dataclass
class SweepJob:
    """One job of the batch: its number in the sweep and its loaded sweep config (task part + ``hydra``)."""

    idx: int
    config: DictConfig


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without its ``hydra`` node: what ``run_job`` hands the task function."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def job_variant(config: DictConfig) -> str:
    """The result-directory suffix a solo run of this job computes (``kvbench.__main__``)."""
    from kvbench.results import run_variant

    return run_variant(task_config(config), list(config.hydra.overrides.task), config.hydra.runtime.choices)


def job_keys(config: DictConfig, idx: int) -> tuple[str, str]:
    """``(prefill group, result directory)``. Jobs with equal groups share a prefill; jobs with equal directories
    (no_press at several ratios) are one computation, kept in one chunk (split apart, the second chunk would wait
    on the first one's lock). A job that fails validation gets keys of its own, so its error (raised again by
    ``execute_many``, before anything is written) fails that job alone, not its group."""
    from kvbench.runner import check_budget_alone, prefill_group_key, result_directory, validate

    task = task_config(config)
    try:
        validate(task)
        check_budget_alone(task, list(config.hydra.overrides.task))
        return prefill_group_key(task), str(result_directory(task, job_variant(config)).path.resolve())
    except Exception:  # noqa: BLE001 - reported by the job's own run, where Hydra records it
        return f"invalid job {idx}", f"invalid job {idx}"


def plan(jobs: list[SweepJob], max_jobs_per_prefill: int | None = None, workers: int = 1) -> list[list[SweepJob]]:
    """Prefill groups in order of their first job, each cut into chunks of at most ``max_jobs_per_prefill``
    result directories (jobs writing one directory are one computation and stay together).

    With several workers and fewer chunks than workers, the largest chunks are split further until every
    worker has one (or every chunk is a single directory): a sweep of one group would otherwise keep one GPU busy
    and leave the others idle. Each extra chunk costs one more prefill per sample, never a different result.
    """
    groups: dict[str, dict[str, list[SweepJob]]] = {}
    for job in jobs:
        group, directory = job_keys(job.config, job.idx)
        groups.setdefault(group, {}).setdefault(directory, []).append(job)
    members = [list(units.values()) for units in groups.values()]
    pieces = [-(-len(group) // max_jobs_per_prefill) if max_jobs_per_prefill else 1 for group in members]
    while sum(pieces) < workers:
        size, index = max((-(-len(group) // n), i) for i, (group, n) in enumerate(zip(members, pieces)))
        if size <= 1:
            break
        pieces[index] += 1
    return [[job for unit in chunk for job in unit] for group, n in zip(members, pieces) for chunk in split(group, n)]


def split(items: list, pieces: int) -> list[list]:
    """``items`` in ``pieces`` contiguous chunks whose sizes differ by at most one, larger ones first."""
    size, extra = divmod(len(items), pieces)
    bounds = [0]
    for i in range(pieces):
        bounds.append(bounds[-1] + size + (1 if i < extra else 0))
    return [items[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


class PrefillGroup:
    """The task function of one chunk's jobs: the first call runs ``execute_many`` for all of them and keeps
    each job's outcome (its metrics, or the error that refused it alone, or the group's exception); every call
    returns its own job's score or raises its own job's error."""

    def __init__(self, configs: list[tuple[DictConfig, str]], overrides: list[list[str]]) -> None:
        self.configs = configs
        self.overrides = overrides  # each job's command-line overrides, for the checks the entry point makes
        self.outcome: list | BaseException | None = None

    def run(self, position: int, cfg: DictConfig) -> float | None:
        from kvbench.errors import KVBenchError

        if self.outcome is None:
            from kvbench.runner import check_budget_alone, execute_many

            try:
                for (task, _), overrides in zip(self.configs, self.overrides):
                    check_budget_alone(task, overrides)  # a refused job has a group of its own (job_keys)
                self.outcome = execute_many(self.configs)
            except Exception as exc:  # noqa: BLE001 - every job of the group failed with it; Hydra reports it
                self.outcome = exc
                if isinstance(exc, KVBenchError):
                    print(f"error: {exc}", file=sys.stderr)
        mine = self.outcome if isinstance(self.outcome, BaseException) else self.outcome[position]
        if isinstance(mine, BaseException):
            if mine is not self.outcome and isinstance(mine, KVBenchError):
                print(f"error: {mine}", file=sys.stderr)
            raise mine
        return mine.get("score")


def run_chunk(hydra_context: HydraContext, chunk: list[SweepJob], logging_config: tuple[Any, Any],
              singleton_state: dict | None = None, launcher_pid: int | None = None) -> list[tuple[int, JobReturn]]:
    """Run one chunk's jobs through Hydra's ``run_job``, sharing one prefill. In a worker process,
    ``singleton_state`` carries the launching process' Hydra state (as Hydra's joblib launcher does), and the
    worker ends if ``launcher_pid`` dies (``kvbench.worker_guard``)."""
    if singleton_state is not None:
        setup_globals()
        Singleton.set_state(singleton_state)
    if launcher_pid is not None:
        from kvbench.worker_guard import exit_with

        exit_with(launcher_pid)
    group = PrefillGroup([(task_config(job.config), job_variant(job.config)) for job in chunk],
                         [list(job.config.hydra.overrides.task) for job in chunk])
    returns = []
    for position, job in enumerate(chunk):
        ret = run_job(hydra_context=hydra_context, task_function=functools.partial(group.run, position), config=job.config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        returns.append((job.idx, ret))
        configure_log(*logging_config)
    return returns


def in_workers(calls: list[tuple], workers: int) -> list[list[tuple[int, JobReturn]]]:
    """``run_chunk(*call)`` for each call in loky worker processes. Joblib runs a single worker in the calling
    process, so one worker is a reusable loky executor of size 1 instead."""
    if workers > 1:
        from joblib import Parallel, delayed

        # batch_size=1: each chunk is minutes of work, hand them out one at a time to whichever worker is idle.
        return Parallel(n_jobs=workers, backend="loky", batch_size=1)(delayed(run_chunk)(*call) for call in calls)
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=1)
    return [future.result() for future in [executor.submit(run_chunk, *call) for call in calls]]


def worker_died(exc: BrokenExecutor) -> NoReturn:
    """Stop the sweep with one line (loky's own message is a page, and its traceback another)."""
    codes = re.search(r"exit codes of the workers are \{([^}]*)\}", str(exc))
    print(f"error: a worker process died{f' (exit {codes.group(1)})' if codes else ''}, most likely killed by the "
          "system for running out of memory, and the sweep's unfinished groups stopped with it; finished runs are kept "
          "and interrupted ones resume from their checkpoints: rerun the same command, with "
          "hydra.launcher.max_jobs_per_prefill=<n> (fewer compressed caches at once) if memory ran out",
          file=sys.stderr, flush=True)
    sys.exit(1)


class SharedPrefillLauncher(Launcher):
    """Hydra launcher: one prefill per sample for each group of a sweep's jobs (see the module docstring)."""

    def __init__(self, max_jobs_per_prefill: int | None = None, n_jobs: int = 1, worker_processes: bool = False) -> None:
        super().__init__()
        if max_jobs_per_prefill is not None and int(max_jobs_per_prefill) < 1:
            raise ValueError(f"hydra.launcher.max_jobs_per_prefill must be null or a positive integer, got {max_jobs_per_prefill}")
        if int(n_jobs) < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be a positive integer, got {n_jobs}")
        self.max_jobs_per_prefill = None if max_jobs_per_prefill is None else int(max_jobs_per_prefill)
        self.n_jobs = int(n_jobs)
        self.worker_processes = bool(worker_processes)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function  # unused: each group runs kvbench.runner.execute_many itself

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        logging_config = (self.config.hydra.hydra_logging, self.config.hydra.verbose)
        configure_log(*logging_config)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._load(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        spread = self.n_jobs > 1 or self.worker_processes
        chunks = plan(jobs, self.max_jobs_per_prefill, self.n_jobs if spread else 1)
        workers = min(self.n_jobs, len(chunks)) if spread else 0
        where = f"{workers} worker process{'es' if workers > 1 else ''}" if workers else "this process"
        log.info(f"Launching {len(jobs)} jobs in {len(chunks)} shared-prefill group{'s' if len(chunks) != 1 else ''} "
                 f"({where})")
        for number, chunk in enumerate(chunks):
            for job in chunk:
                log.info(f"\t#{job.idx} (group {number}) : {' '.join(filter_overrides(job.config.hydra.overrides.task))}")
        try:
            done = self._run(chunks, workers, logging_config)
        except KeyboardInterrupt:  # as the entry point does: Hydra's job runner is not around this launcher's loop
            from kvbench.runner import exit_interrupted

            exit_interrupted(str(self.config.output_dir))
        returns = dict(pair for chunk in done for pair in chunk)
        return [returns[job.idx] for job in jobs]

    def _run(self, chunks: list[list[SweepJob]], workers: int, logging_config: tuple[Any, Any]) -> list[list[tuple[int, JobReturn]]]:
        assert self.hydra_context is not None
        if workers:
            state = Singleton.get_state()
            try:
                done = in_workers([(self.hydra_context, chunk, logging_config, state, os.getpid()) for chunk in chunks],
                                  workers)
            except BrokenExecutor as exc:  # loky's TerminatedWorkerError: a worker process died
                worker_died(exc)
        else:
            done = [run_chunk(self.hydra_context, chunk, logging_config) for chunk in chunks]
        return done

    def _load(self, idx: int, overrides: Sequence[str]) -> SweepJob:
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        return SweepJob(idx, config)
