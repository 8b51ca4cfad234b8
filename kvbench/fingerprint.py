"""Digests of what a run reads besides its config: kvbench's own source, data files, model files.

A result is reused only for an equal identity (``kvbench.results.run_identity``). The config and the library
versions do not say which LongBench files sat under ``dataset.path``, which books a local PG-19 folder held,
which weights a local model directory holds, or whether the code that ran had uncommitted edits, and any of
these changes the numbers. File contents are hashed once per process for each (path, size, mtime): a run
computes its identity several times (skip check, shared-prefill grouping, baseline lookup) and should read each
file once. Weight files (gigabytes) are hashed once per machine: their digest is kept in a store keyed by
(path, size, mtime, inode), so a sweep's jobs and later runs read it back, and a file rewritten in place (a
fine-tune saved over its directory) is hashed again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from collections.abc import Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
CHUNK = 1 << 20
LARGE_FILE = 1 << 30  # hashing past this size says so (a few seconds per GB)


def package_version(name: str) -> str | None:
    """An installed distribution's version, None when it is not installed (a later install changes the identity)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=4096)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _content_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def stored_file_digest(path: Path, store: Path) -> str:
    """``file_digest``, kept in ``store`` across processes (for files too large to read at every start)."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    entry = Path(store) / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        known = entry.read_text(encoding="ascii").strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    if stat.st_size > LARGE_FILE:
        print(f"[kvbench] hashing {path.name} ({stat.st_size / 1e9:.1f} GB) once, for the run's identity", flush=True)
    digest = file_digest(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        partial.write_text(digest, encoding="ascii")
        os.replace(partial, entry)  # a concurrent job writes the same digest: either copy is right
    except OSError:
        pass  # an unwritable store only costs hashing again next time
    return digest


def files_digest(paths: Iterable[Path], root: Path | None = None, store: Path | None = None) -> str | None:
    """One digest of several files, by their names (relative to ``root``) and contents (with ``store``: digests
    kept there across processes, see ``stored_file_digest``). None when no file is there, so that missing data is
    told apart from an empty digest and the loader's own error reports it."""
    entries = []
    for path in sorted(Path(p) for p in paths):
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix() if root is not None else path.name
        entries.append(f"{name}\0{stored_file_digest(path, store) if store is not None else file_digest(path)}")
    if not entries:
        return None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def folder_digest(folder: Path | str | None, pattern: str) -> str | None:
    """The files matching ``pattern`` in ``folder`` (not recursive), as :func:`files_digest`."""
    if folder is None:
        return None
    folder = Path(str(folder)).expanduser()
    return files_digest(folder.glob(pattern), folder) if folder.is_dir() else None


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """kvbench's own Python source as it runs: an uncommitted edit, or an install outside git, still changes the
    identity (the commit alone would not)."""
    return files_digest(PACKAGE_ROOT.rglob("*.py"), PACKAGE_ROOT) or ""
