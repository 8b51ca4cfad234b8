"""One GPU per joblib worker, for ``hydra/launcher=joblib_gpus``.

Joblib hands each queued job to whichever worker is idle, so a GPU derived from the job number
(``hydra.job.num % n_gpus``) puts two running jobs on one GPU as soon as jobs take different times. Instead
:class:`GpuPool`, a Hydra callback, pins the worker *process*: the first time a worker starts a job it takes an
exclusive ``flock`` on the lock file of one free GPU of the pool and keeps it for the rest of its life (loky
reuses workers; the kernel drops the lock when the process exits, even on a crash). It then sets
``CUDA_VISIBLE_DEVICES`` before the job touches CUDA, so the job sees that GPU alone as ``cuda:0``:
``device=auto`` needs no change and peak-memory statistics are that GPU's. With no more workers than GPUs a
free one always exists; a worker that finds none (another sweep on this machine holds them) waits
``wait_seconds`` and then stops the sweep with a message saying so.

Hydra turns an exception raised by a callback into a warning and goes on, which here would run the job
unpinned on the wrong GPU; conditions that must stop the sweep therefore print one ``error:`` line and exit.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kvbench.results import slug
from kvbench.worker_guard import exit_with

log = logging.getLogger(__name__)
# (GPU id, open lock file) of this process: the open file is what holds the lock, so it must stay referenced.
_held: tuple[str, IO[str]] | None = None


def pool_gpus(gpus: Any = None) -> list[str]:
    """GPU ids of the pool: ``gpus`` ("0,1" or [0, 1]), else CUDA_VISIBLE_DEVICES, else every GPU torch sees.

    Called in the launching process only: counting GPUs through torch initialises CUDA, after which a change
    of CUDA_VISIBLE_DEVICES has no effect in that process.
    """
    if gpus is None:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    items = str(gpus).split(",") if isinstance(gpus, (str, int)) else list(gpus)
    return [str(item).strip() for item in items if str(item).strip()]


# What a sweep asking for a GPU launcher runs on a machine without GPUs.
CPU_COUNTERPART = {
    "joblib_gpus": "hydra/launcher=joblib hydra.launcher.n_jobs=<n>",
    "shared_prefill_gpus": "hydra/launcher=shared_prefill (leaderboard.sh: leave out --launcher)",
}


def gpu_count(gpus: Any = None, launcher: str = "joblib_gpus") -> int:
    """``${kvbench.gpu_count:<gpus>,<launcher>}``: the launcher's n_jobs, one worker per GPU of the pool.

    With no GPU the sweep stops with one line naming the launcher's CPU counterpart: a resolver's exception would
    reach the user as two pages of OmegaConf traceback."""
    pool = pool_gpus(gpus)
    if not pool:
        _fail(f"hydra/launcher={launcher} found no GPU (CUDA_VISIBLE_DEVICES is empty or torch sees no CUDA device); "
              f"on a CPU machine use {CPU_COUNTERPART.get(launcher, 'another launcher')}")
    return len(pool)


OmegaConf.register_new_resolver("kvbench.gpu_count", gpu_count, replace=True)


def claim(pool: list[str], lock_dir: str | Path, wait_seconds: float) -> str:
    """Lock one free GPU of ``pool`` for the life of this process and return its id (the same id on every call)."""
    global _held
    if _held is not None:
        return _held[0]
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        for gpu in pool:
            handle = open(folder / f"gpu-{slug(gpu)}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")  # who holds it, for a human looking at a stuck sweep
            handle.flush()
            _held = (gpu, handle)
            return gpu
        if time.monotonic() >= deadline:
            _fail(f"no free GPU among {','.join(pool)} after {wait_seconds:.0f}s: other kvbench workers hold them "
                  f"(lock files in {folder}); wait for that sweep or lower hydra.launcher.n_jobs")
        time.sleep(1.0)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class GpuPool(Callback):
    """Hydra callback: pin each joblib worker process to its own GPU of the pool (see the module docstring)."""

    def __init__(self, gpus: Any = None, lock_dir: str | None = None, wait_seconds: float = 600.0) -> None:
        # Built in the launching process and pickled to the workers, which must not count GPUs themselves.
        self.pool = pool_gpus(OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus)
        self.lock_dir = str(lock_dir or Path(tempfile.gettempdir()) / f"kvbench-gpus-{os.getuid()}")
        self.wait_seconds = float(wait_seconds)
        self.launching_pid = os.getpid()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        n_jobs = int(config.hydra.launcher.n_jobs)
        if not 0 < n_jobs <= len(self.pool):
            # More workers than GPUs would leave the extra ones waiting for a GPU no live worker ever releases.
            _fail(f"hydra.launcher.n_jobs={n_jobs} but the GPU pool is {','.join(self.pool) or 'empty'}; "
                  f"use at most {len(self.pool)} workers")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.getpid() == self.launching_pid:
            _fail("the gpu_pool callback pins worker processes, but this job runs in the launching process: use it "
                  "with hydra/launcher=joblib_gpus, or shared_prefill_gpus with hydra.launcher.worker_processes=true")
        exit_with(self.launching_pid)  # a worker outliving a killed sweep would keep its GPU's lock
        gpu = claim(self.pool, self.lock_dir, self.wait_seconds)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("worker %d runs on GPU %s", os.getpid(), gpu)
