"""The one way kvbench writes something others may read at the same time: build it in a temporary sibling,
then ``os.replace`` it into place while holding a ``filelock`` lock.

Readers never see half a file or half a directory, and two processes producing the same thing at once (two
sweeps over one ``output_dir``, a joblib sweep on a fresh machine converting the packaged model) do not
trip over each other: the second waits for the lock, then finds the finished result and keeps it.
Used by result finalisation (``kvbench.results``), the packaged-model conversion (``kvbench.models``) and
the Austen novels' extraction (``kvbench.datasets.austen``).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock


def lock_for(target: Path, lock_path: Path | None = None) -> FileLock:
    """The lock guarding ``target``: a hidden ``.<name>.lock`` beside it unless ``lock_path`` says otherwise."""
    path = Path(lock_path) if lock_path is not None else target.parent / f".{target.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _aside_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def staging_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to build into (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; results and caches are meant to be shared
    return staging


def write_text(path: Path, text: str) -> None:
    """Write a whole text file or nothing: readers see the old content or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(path):
        replace_file(path, text)


def replace_file(path: Path, text: str) -> None:
    """``write_text`` for a caller that already holds a lock covering ``path`` (no lock file of its own beside it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` directory to ``target``, replacing whatever is there.

    The caller holds ``target``'s lock. A directory cannot be renamed onto a non-empty one, so an old
    ``target`` is first renamed aside (atomic) and deleted after the new one is in place.
    """
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=_aside_prefix(target), dir=target.parent))
        os.replace(target, trash / target.name)
    os.replace(staging, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(target: Path) -> None:
    """Delete what a killed build of ``target`` left beside it (its staging and renamed-aside directories: a
    SIGKILL skips every ``finally``). Only called under ``target``'s lock, which every builder holds."""
    for prefix in (_staging_prefix(target), _aside_prefix(target)):
        for leftover in target.parent.glob(glob.escape(prefix) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so the rename that publishes it never outlives its content
    (after a power loss, a published directory with truncated files would look complete)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def ensure_dir(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool],
               lock_path: Path | None = None) -> Path:
    """Return ``target`` once complete, building it with ``build(staging_dir)`` if no process has yet.

    Complete already: returned without locking (the fast path of every later run). Otherwise the lock is
    taken, completeness checked again (another process may have just finished), and only then built.
    """
    target = Path(target)
    if is_complete(target):
        return target
    with lock_for(target, lock_path):
        if is_complete(target):
            return target
        remove_leftovers(target)
        staging = staging_dir(target)
        try:
            build(staging)
            sync_tree(staging)
            replace_dir(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
