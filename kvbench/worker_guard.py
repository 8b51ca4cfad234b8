"""Worker processes end with the sweep that started them.

A loky worker whose launching process is killed (``kill -9``, a closed terminal, a SLURM allocation ending on
the launcher's node) is re-parented and, untold, would go on computing its group: writing results of a sweep its
user stopped, and holding its GPU's lock, so a relaunched sweep would wait for that GPU or give up on it. A
daemon thread in each worker notices that its parent changed and ends the worker. What it had finished is kept;
a sample in progress is computed again on resume (a torn checkpoint line is dropped then).
"""

from __future__ import annotations

import os
import sys
import threading
import time

POLL_SECONDS = 1.0
_watching: int | None = None  # the launcher this process watches (one thread per process)


def exit_with(launcher_pid: int) -> None:
    """End this process soon after ``launcher_pid``, its parent, is gone. Called in the worker, once per job;
    a no-op outside a child of ``launcher_pid`` (the launching process itself, or a job run in it)."""
    global _watching
    if _watching == launcher_pid or os.getppid() != launcher_pid:
        return
    _watching = launcher_pid
    threading.Thread(target=_watch, args=(launcher_pid,), name="kvbench-worker-guard", daemon=True).start()


def _watch(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(POLL_SECONDS)
    print(f"[kvbench] worker {os.getpid()}: the sweep's launching process {launcher_pid} is gone; stopping",
          file=sys.stderr, flush=True)
    os._exit(1)
