"""Book-length texts for perplexity under KV-cache compression (PG-19 style).

A perplexity benchmark needs long, coherent, unseen-by-the-press text; which books is secondary. The
offline default is Jane Austen's six novels (see :mod:`kvbench.datasets.austen`); the PG-19 test books
from the hub and any folder of .txt files are the alternatives. Rows are whole books (``id``, ``text``);
the harness cuts token windows from them using the ``context_length``/``eval_length``/``stride``/
``max_windows_per_book`` keys of the dataset config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.errors import KVBenchError

SOURCES = ("austen", "hub", "local")
DEFAULT_HUB_ID = "emozilla/pg19-test"


def _slug(title: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", title.lower()).strip("_") or "book"


def _limit(cfg: Mapping[str, Any]) -> int | None:
    value = cfg.get("num_books", None)
    if value is None:
        return None
    if int(value) < 1:
        raise KVBenchError(f"dataset.num_books must be a positive integer or null, got {value}")
    return int(value)


def _austen_books() -> list[tuple[str, str]]:
    from kvbench.datasets.austen import load_books

    return list(load_books().items())


def _local_books(path: Any) -> list[tuple[str, str]]:
    if path is None:
        raise KVBenchError("dataset.source=local needs dataset.path=<folder of .txt books>")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise KVBenchError(f"dataset.path={path} is not a directory; point it at a folder of .txt books")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KVBenchError(f"no .txt files in {folder}; put one book per .txt file there")
    return [(file.stem, file.read_text(encoding="utf-8", errors="replace")) for file in files]


def _hub_books(hub_id: str, split: str, limit: int | None) -> list[tuple[str, str]]:
    """Stream the split so that ``deepmind/pg19`` does not pull its 11 GB train split to read 100 test books."""
    import datasets

    try:
        stream: Iterable[Mapping[str, Any]] = datasets.load_dataset(hub_id, split=split, streaming=True)
        books = []
        seen: dict[str, int] = {}
        for index, record in enumerate(stream):
            if limit is not None and len(books) >= limit:
                break
            title = record.get("short_book_title") or record.get("title") or record.get("id") or f"book_{index}"
            book_id = _slug(str(title))
            seen[book_id] = seen.get(book_id, 0) + 1
            if seen[book_id] > 1:
                book_id = f"{book_id}_{seen[book_id]}"
            books.append((book_id, str(record["text"])))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, missing column: all need the same advice
        raise KVBenchError(
            f"could not read PG-19 books from the hub '{hub_id}' split '{split}' ({type(exc).__name__}: {str(exc)[:120]}); "
            f"use the offline default dataset.source=austen, or dataset.source=local dataset.path=<folder of .txt books>"
        ) from exc
    return books


def load(cfg: Mapping[str, Any], tokenizer: Any = None) -> pd.DataFrame:
    """Return one row per book; the tokenizer is unused because the harness slices windows itself."""
    source = str(cfg.get("source", "austen") or "austen")
    limit = _limit(cfg)
    if source == "austen":
        books = _austen_books()
    elif source == "local":
        books = _local_books(cfg.get("path", None))
    elif source == "hub":
        books = _hub_books(str(cfg.get("hub_id", None) or DEFAULT_HUB_ID), str(cfg.get("split", None) or "test"), limit)
    else:
        raise KVBenchError(f"unknown dataset.source '{source}'; use one of {', '.join(SOURCES)}")
    if limit is not None:
        books = books[:limit]
    books = [(book_id, text) for book_id, text in books if text.strip()]
    if not books:
        raise KVBenchError(f"the {source} source yielded no non-empty books; check dataset.path / dataset.hub_id")
    return pd.DataFrame({"id": [b[0] for b in books], "text": [b[1] for b in books]})
