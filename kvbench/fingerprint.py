"""Digests of what a run reads besides its config: kvbench's own source, data files, model files.

A result is reused only for an equal identity (``kvbench.results.run_identity``). The config and the library
versions do not say which LongBench files sat under ``dataset.path``, which books a local PG-19 folder held,
or whether the code that ran had uncommitted edits, and any of these changes the numbers. File contents are
hashed once per process for each (path, size, mtime): a run computes its identity several times (skip check,
shared-prefill grouping, baseline lookup) and should read each file once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
CHUNK = 1 << 20


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


def files_digest(paths: Iterable[Path], root: Path | None = None, contents: bool = True) -> str | None:
    """One digest of several files, by their names (relative to ``root``) and contents (``contents=False``: sizes,
    for weight files too large to read at every start). None when no file is there, so that missing data is told
    apart from an empty digest and the loader's own error reports it."""
    entries = []
    for path in sorted(Path(p) for p in paths):
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix() if root is not None else path.name
        entries.append(f"{name}\0{file_digest(path) if contents else path.stat().st_size}")
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
