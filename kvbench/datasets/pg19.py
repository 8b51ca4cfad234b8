"""Book-length texts for perplexity under KV-cache compression (PG-19 style).

A perplexity benchmark needs long, coherent, unseen-by-the-press text; which books is secondary. The
offline default is Jane Austen's six novels (see :mod:`kvbench.datasets.austen`); the PG-19 test books
from the hub and any folder of .txt files are the alternatives.

Rows are token windows, cut here with the model's tokenizer (which only measures and cuts the text): each
holds ``context_length`` tokens of context (prefilled and compressed) then ``eval_length`` scored tokens.
A book is split into ``max_windows_per_book`` equal segments and one window sits in the middle of each,
so the scored tokens sample the whole book (its opening chapters, its middle and its end) rather than its
first pages; a book too short for that many non-overlapping windows gets as many as fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench import hub
from kvbench.errors import KVBenchError
from kvbench.datasets.options import positive_int
from kvbench.datasets.unique_ids import UniqueIds
from kvbench.fingerprint import folder_digest

KIND = "perplexity"  # windows scored by teacher forcing, no question
HIGHER_IS_BETTER = False  # perplexity
METRICS = "perplexity"  # scored by kvbench.metrics.perplexity
SOURCES = ("austen", "hub", "local")
DEFAULT_HUB_ID = "emozilla/pg19-test"
# What the run tests is a window of this many tokens: the runner refuses one longer than max_context_length.
LENGTH_KEYS = (("context_length", "eval_length"),)


def _slug(title: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", title.lower()).strip("_") or "book"


def _limit(cfg: Mapping[str, Any]) -> int | None:
    return positive_int(cfg, "num_books", None, nullable=True)


def _austen_books() -> list[tuple[str, str]]:
    from kvbench.datasets.austen import load_books

    return list(load_books().items())


def data_inputs(cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """The books' digest for the offline sources; for the hub, the commit its revision resolves to."""
    source = str(cfg.get("source", "austen") or "austen")
    if source == "austen":
        from kvbench.datasets.austen import books_digest

        return {"austen_books": books_digest()}
    if source == "local":
        return {"local_books": folder_digest(cfg.get("path", None), "*.txt")}
    return {"hub_commit": hub.commit(str(cfg.get("hub_id", None) or DEFAULT_HUB_ID), cfg.get("revision", None), "dataset")}


def _local_books(path: Any) -> list[tuple[str, str]]:
    return [(file.stem, file.read_text(encoding="utf-8", errors="replace")) for file in _book_files(path)]


def _book_files(path: Any) -> list[Path]:
    if path is None:
        raise KVBenchError("dataset.source=local needs dataset.path=<folder of .txt books>")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise KVBenchError(f"dataset.path={path} is not a directory; point it at a folder of .txt books")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KVBenchError(f"no .txt files in {folder}; put one book per .txt file there")
    return files


def _hub_books(hub_id: str, split: str, limit: int | None, revision: str | None) -> list[tuple[str, str]]:
    """Stream the split: a hub copy of all of PG-19 would otherwise pull its 11 GB train split to read 100 test books."""
    import datasets

    try:
        stream: Iterable[Mapping[str, Any]] = datasets.load_dataset(
            hub_id, split=split, streaming=True, revision=hub.load_revision(hub_id, revision, "dataset"))
        books = []
        unique = UniqueIds()
        for index, record in enumerate(stream):
            if limit is not None and len(books) >= limit:
                break
            title = record.get("short_book_title") or record.get("title") or record.get("id") or f"book_{index}"
            book_id = unique(_slug(str(title)))
            books.append((book_id, str(record["text"])))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, missing column: all need the same advice
        if "scripts are no longer supported" in str(exc):
            raise KVBenchError(f"the hub dataset '{hub_id}' is a loading script, which datasets {datasets.__version__} no longer "
                               f"runs; use dataset.hub_id={DEFAULT_HUB_ID} (PG-19's test books as parquet)") from exc
        raise KVBenchError(
            f"could not read PG-19 books from the hub '{hub_id}' split '{split}' ({type(exc).__name__}: {str(exc)[:120]}); "
            f"use the offline default dataset.source=austen, or dataset.source=local dataset.path=<folder of .txt books>"
        ) from exc
    return books


def books(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per book (``id``, ``text``) from the configured source."""
    source = str(cfg.get("source", "austen") or "austen")
    limit = _limit(cfg)
    if source == "austen":
        found = _austen_books()
    elif source == "local":
        found = _local_books(cfg.get("path", None))
    elif source == "hub":
        found = _hub_books(str(cfg.get("hub_id", None) or DEFAULT_HUB_ID), str(cfg.get("split", None) or "test"), limit,
                           cfg.get("revision", None))
    else:
        raise KVBenchError(f"unknown dataset.source '{source}'; use one of {', '.join(SOURCES)}")
    if limit is not None:
        found = found[:limit]
    found = [(book_id, text) for book_id, text in found if text.strip()]
    if not found:
        raise KVBenchError(f"the {source} source yielded no non-empty books; check dataset.path / dataset.hub_id")
    return pd.DataFrame({"id": [b[0] for b in found], "text": [b[1] for b in found]})


def _windows(cfg: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """``context_length``, ``eval_length`` and ``max_windows_per_book`` as configured (the defaults for null)."""
    return (positive_int(cfg, "context_length", 1024), positive_int(cfg, "eval_length", 128),
            positive_int(cfg, "max_windows_per_book", None, nullable=True))


def check(cfg: Mapping[str, Any]) -> None:
    """Window sizes, book count and source, checked before the model loads."""
    _windows(cfg)
    _limit(cfg)
    source = str(cfg.get("source", "austen") or "austen")
    if source not in SOURCES:
        raise KVBenchError(f"unknown dataset.source '{source}'; use one of {', '.join(SOURCES)}")
    if source == "local":
        _book_files(cfg.get("path", None))


def window_starts(num_tokens: int, window: int, count: int | None) -> list[int]:
    """Starts of ``count`` non-overlapping windows spread evenly over ``num_tokens`` tokens.

    The book is split into equal segments, one per window, and each window is centred in its segment:
    deterministic, no overlap, and the first and last windows' centres sit half a segment in from the ends.
    ``count=None`` or a book too short for ``count`` windows gives as many as fit.
    """
    fit = num_tokens // window
    n = fit if count is None else min(count, fit)
    return [(2 * i * num_tokens + num_tokens - n * window) // (2 * n) for i in range(n)]


def load(cfg: Mapping[str, Any], tokenizer: Any) -> pd.DataFrame:
    """One row per window: ``sample_id``, book ``id``, ``window``, ``start``, ``book_tokens``,
    ``input_ids`` (context then scored tokens) and ``context_tokens`` (how many of them are context)."""
    if tokenizer is None:
        raise KVBenchError("perplexity windows are cut in tokens of the model's tokenizer; pass one")
    context_length, eval_length, per_book = _windows(cfg)
    window = context_length + eval_length
    rows = []
    for book in books(cfg).itertuples():
        ids = tokenizer(book.text, add_special_tokens=False, verbose=False)["input_ids"]
        for number, start in enumerate(window_starts(len(ids), window, per_book)):
            rows.append({"sample_id": f"{book.id}-{number:03d}", "id": book.id, "window": number, "start": start,
                         "book_tokens": len(ids), "context_tokens": context_length, "input_ids": ids[start : start + window]})
    if not rows:
        raise KVBenchError(f"no book is longer than context_length + eval_length = {window} tokens; lower dataset.context_length")
    return pd.DataFrame(rows)
