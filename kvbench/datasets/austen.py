"""Jane Austen's six novels as an offline long-text corpus (perplexity default, needle haystack option).

They come from Debian's ``r-cran-janeaustenr`` package, which any Debian/Ubuntu apt mirror serves, so a
machine without Hugging Face access can still evaluate on book-length, public-domain English. The
package stores the novels in an R lazy-load database; it is decoded here with ``rdata`` (no R needed)
and cached as plain .txt files.

Run ``python -m kvbench.datasets.austen`` once (``make setup`` does) to fetch and cache them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from kvbench import atomic
from kvbench.errors import KVBenchError
from kvbench.fingerprint import files_digest
from kvbench.models import cache_root

DEB_PACKAGE = "r-cran-janeaustenr"
ENV_DEB = "KVBENCH_AUSTEN_DEB"
# R object name in janeaustenr -> book id used as the row id and .txt file name.
BOOKS: dict[str, str] = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}
BOOK_IDS: tuple[str, ...] = tuple(BOOKS.values())
_DATA_DIR = PurePosixPath("usr/lib/R/site-library/janeaustenr/data")
_FETCH_HINT = (
    f"run `apt-get update && apt-get download {DEB_PACKAGE}` (root for the update), then "
    f"`{ENV_DEB}=/path/to/{DEB_PACKAGE}_<version>_all.deb python -m kvbench.datasets.austen`; "
    f"or use dataset.source=local dataset.path=<folder of .txt books>"
)


def austen_dir() -> Path:
    """Cache folder holding one ``<book_id>.txt`` per novel."""
    return cache_root() / "data" / "austen"


def _is_complete(folder: Path) -> bool:
    return all((folder / f"{book}.txt").is_file() for book in BOOK_IDS)


def _inflate(blob: bytes, compression: int) -> bytes:
    """Undo R's lazy-load compression: a 4-byte big-endian length, then a zlib stream."""
    if compression == 0:
        return blob
    if compression != 1:
        raise KVBenchError(
            f"the {DEB_PACKAGE} database uses R compression type {compression}, which kvbench cannot read; "
            f"use dataset.source=local with the novels as .txt files"
        )
    size = int.from_bytes(blob[:4], "big")
    data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise KVBenchError(f"the {DEB_PACKAGE} database is corrupt (length mismatch); delete the .deb and fetch it again")
    return data


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, object]:
    """Decode every object of an R lazy-load database (``.rdb`` payload plus its ``.rdx`` index)."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(rdx, extension=".rds"))
    # TRUE (1) is zlib; R writes 2 or 3 for bzip2/xz databases, which _inflate rejects with advice.
    compression = int(index["compressed"][0]) if "compressed" in index else 1
    objects: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        serialized = _inflate(rdb[int(offset) : int(offset) + int(length)], compression)
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))
    return objects


def _members_with_dpkg(deb: Path, wanted: list[PurePosixPath]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="kvbench-deb-") as tmp:
        result = subprocess.run(["dpkg", "-x", str(deb), tmp], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise KVBenchError(f"`dpkg -x {deb}` failed ({result.stderr.strip()[-200:]}); {_FETCH_HINT}")
        return {member.name: (Path(tmp) / member).read_bytes() for member in wanted if (Path(tmp) / member).is_file()}


def _members_with_python(deb: Path, wanted: list[PurePosixPath]) -> dict[str, bytes]:
    """Read files out of a .deb without dpkg (e.g. on macOS): an ``ar`` archive holding ``data.tar.*``."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise KVBenchError(f"{deb} is not a Debian package; {_FETCH_HINT}")
    position = 8
    payload = None
    while position + 60 <= len(raw):
        header = raw[position : position + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[position + 60 : position + 60 + size]
        if name.startswith("data.tar"):
            payload = body
            break
        position += 60 + size + (size % 2)
    if payload is None:
        raise KVBenchError(f"{deb} has no data archive; {_FETCH_HINT}")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    except tarfile.ReadError as exc:
        raise KVBenchError(f"cannot read the data archive of {deb} ({exc}); install dpkg, or {_FETCH_HINT}") from exc
    found: dict[str, bytes] = {}
    with archive:
        for info in archive.getmembers():
            path = PurePosixPath(info.name.removeprefix("./"))
            if path in wanted and info.isfile():
                found[path.name] = archive.extractfile(info).read()
    return found


def books_from_deb(deb: Path, use_dpkg: bool | None = None) -> dict[str, str]:
    """Return ``{book_id: text}`` from a ``r-cran-janeaustenr`` .deb; lines are joined with newlines."""
    wanted = [_DATA_DIR / "Rdata.rdb", _DATA_DIR / "Rdata.rdx"]
    if use_dpkg is None:
        use_dpkg = shutil.which("dpkg") is not None
    members = _members_with_dpkg(deb, wanted) if use_dpkg else _members_with_python(deb, wanted)
    if set(members) != {"Rdata.rdb", "Rdata.rdx"}:
        raise KVBenchError(f"{deb} does not contain janeaustenr's data/Rdata.rdb and Rdata.rdx; {_FETCH_HINT}")
    objects = read_lazyload_db(members["Rdata.rdb"], members["Rdata.rdx"])
    books = {}
    for r_name, book_id in BOOKS.items():
        if r_name not in objects:
            raise KVBenchError(f"{deb} lacks the novel '{r_name}'; {_FETCH_HINT}")
        books[book_id] = "\n".join("" if line is None else str(line) for line in objects[r_name])
    return books


def _run(command: list[str], folder: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KVBenchError(f"`{' '.join(command)}` failed ({exc}); {_FETCH_HINT}") from exc


def _download_deb(folder: Path) -> Path:
    """``apt-get download`` needs no root; a fresh container has empty apt lists, hence one update and a retry."""
    if shutil.which("apt-get") is None:
        raise KVBenchError(f"the Jane Austen novels are not cached and apt-get is not available here; {_FETCH_HINT}")
    result = _run(["apt-get", "download", DEB_PACKAGE], folder)
    if result.returncode != 0:
        _run(["apt-get", "update"], folder)
        result = _run(["apt-get", "download", DEB_PACKAGE], folder)
    debs = sorted(folder.glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no .deb produced"]
        raise KVBenchError(f"could not download {DEB_PACKAGE} ({detail[0]}); {_FETCH_HINT}")
    return debs[-1]


def _given_deb() -> Path | None:
    """``KVBENCH_AUSTEN_DEB`` as a path, checked to exist (None when unset)."""
    given = os.environ.get(ENV_DEB)
    if not given:
        return None
    deb = Path(given).expanduser()
    if not deb.is_file():
        raise KVBenchError(f"{ENV_DEB}={given} does not exist; {_FETCH_HINT}")
    return deb


def _fetch_books() -> dict[str, str]:
    """The six novels from ``KVBENCH_AUSTEN_DEB`` if set, else from a freshly downloaded Debian package."""
    deb = _given_deb()
    if deb is not None:
        return books_from_deb(deb)
    with tempfile.TemporaryDirectory(prefix="kvbench-austen-") as tmp:
        return books_from_deb(_download_deb(Path(tmp)))


def _extract(staging: Path) -> None:
    for book_id, text in _fetch_books().items():
        (staging / f"{book_id}.txt").write_text(text, encoding="utf-8")


def ensure_austen() -> Path:
    """Return the folder with the six novels as .txt, fetching and decoding the Debian package on first use.

    ``KVBENCH_AUSTEN_DEB`` may point at an already downloaded .deb (offline machines, CI caches). Written
    through ``kvbench.atomic.ensure_dir``: concurrent first uses extract once, and never half a folder.
    """
    target = austen_dir()
    if not _is_complete(target):
        _given_deb()  # a wrong path is refused before anything is written
    return atomic.ensure_dir(target, _extract, _is_complete)


def books_digest() -> str | None:
    """The extracted novels' digest (a run's identity), extracting them first as loading would."""
    folder = ensure_austen()
    return files_digest([folder / f"{book}.txt" for book in BOOK_IDS], folder)


def load_books() -> dict[str, str]:
    """``{book_id: text}`` for the six novels, in publication order."""
    folder = ensure_austen()
    return {book: (folder / f"{book}.txt").read_text(encoding="utf-8") for book in BOOK_IDS}


def main(argv: list[str] | None = None) -> int:
    try:
        folder = ensure_austen()
    except KVBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for book in BOOK_IDS:
        path = folder / f"{book}.txt"
        print(f"{path}\t{path.stat().st_size} bytes")
    print(f"Jane Austen novels ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
