"""LongBench's scoring, figure for figure (``from kvbench.metrics.longbench import qa_f1_score``).

A kvbench LongBench(-E) number is only worth reporting if it can sit next to a published one, so every
function here reproduces THUDM/LongBench's ``metrics.py`` and ``eval.py`` (revision 2e00731, January 2025)
exactly, including their quirks, rather than a "cleaner" variant:

- per-sample metrics return LongBench's value in [0, 1]; a sample's score is the max over its reference
  answers, starting from 0;
- trec, triviaqa, samsum and lsht predictions are cut at their first line before scoring (few-shot tasks:
  the model tends to continue with a made-up next example);
- a task score is ``round(100 * sum / n, 2)`` (``eval.py`` ``scorer``); a LongBench-E length bucket is
  ``round(100 * numpy.mean(scores), 2)`` (``scorer_e``), with numpy's rounding, as there;
- ROUGE-L is the PyPI ``rouge`` package 1.0.1, not Google's ``rouge-score``: see :func:`rouge_score`.

The tests hold figures computed with LongBench's own code on hand-written cases.
"""

from __future__ import annotations

import difflib
import math
import re
import string
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kvbench.errors import KVBenchError
from kvbench.metrics.answer_lists import text_list

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# LongBench's eval.py calls the rouge package from the third frame of the stack (script, scorer(_e),
# rouge_score), under CPython's default recursion limit of 1000. The package rebuilds each LCS recursively,
# so a long enough sentence pair overflows, LongBench's bare ``except`` turns that into 0.0, and where that
# happens depends on how much stack is left. kvbench leaves the rouge call that same headroom. Checked
# against eval.py itself on each interpreter: a one-sentence hypothesis against "w0 beta gamma" is scored up
# to 988 words and scores 0 from 989 on CPython 3.11-3.13 (987/988 on 3.10), in eval.py and here alike.
_LONGBENCH_RECURSION_LIMIT = 1000
_LONGBENCH_CALLER_FRAMES = 3
_rouge_lock = threading.Lock()

# LongBench's first-line cut (eval.py): few-shot tasks whose model output tends to run on into another example.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
BUCKETS = ("0-4k words", "4-8k words", "8k+ words")  # eval.py says "0-4k"...; the unit is said here, as counted


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation, so that "The Eiffel Tower." and "eiffel tower" count as the same answer.

    Order as in LongBench: lower-case, drop ASCII punctuation (so "U.S.A." -> "usa", "Anne-Marie" ->
    "annemarie"), blank out the articles a/an/the, collapse whitespace.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1: rewards partial answers, which exact match would score as plain failures."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after :func:`normalize_answer` (QA and TriviaQA tasks)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _rouge_l_f(prediction: str, ground_truth: str, result: list[float]) -> None:
    """The ``rouge`` package's summary-level ROUGE-L F, or 0.0 wherever it raises, as LongBench's wrapper does.

    This frame stands where LongBench's ``rouge_score`` stands in eval.py (the caller of ``get_scores``, third
    frame from the top); the recursion limit is set, for this call only, so that the same number of frames is
    left below it as there, whatever ran before (pytest, Hydra, a notebook). Run it in a fresh thread (see
    :func:`rouge_score`): its stack is short and the same on every call.
    """
    from rouge import Rouge

    limit = sys.getrecursionlimit()
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    sys.setrecursionlimit(depth + _LONGBENCH_RECURSION_LIMIT - _LONGBENCH_CALLER_FRAMES)
    try:
        result.append(float(Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]))
    except Exception:  # noqa: BLE001 - LongBench scores any failure (empty text, RecursionError) as 0.0
        result.append(0.0)
    finally:
        sys.setrecursionlimit(limit)


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F as LongBench scores summaries: ``rouge`` 1.0.1, ``get_scores([p], [g], avg=True)["rouge-l"]["f"]``.

    This is not the textbook ROUGE-L that Google's ``rouge-score`` computes: texts are split into sentences
    at every "." (decimals included), words are whitespace tokens with case and punctuation kept, the LCS is
    the summary-level union LCS, counted over *distinct* words, and F carries a 1e-8 in its denominator
    (identical texts give 0.99999999..., not 1). An empty prediction or reference (nothing but dots or
    nothing at all) and a sentence pair too long for the package's recursive LCS both score 0.0, as in
    LongBench, where a bare ``except`` maps every error to 0.
    """
    result: list[float] = []
    with _rouge_lock:  # the recursion limit is process-wide: one scoring thread at a time
        worker = threading.Thread(target=_rouge_l_f, args=(str(prediction), str(ground_truth), result), name="kvbench-rouge")
        worker.start()
        worker.join()
    return result[0]


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """TREC / LSHT label match: 1/k when the true label is among the k class names the prediction contains.

    Case-sensitive substring tests. Class names that are substrings of the true label (a shorter label inside
    a longer one) are dropped so they do not dilute the score; LongBench removes them while iterating over
    the same list, which skips the element after each removal, and that is kept so scores match LongBench's.
    """
    all_classes = kwargs.get("all_classes")
    if not all_classes:
        raise KVBenchError("classification_score needs all_classes=[...] (the task's label set, from the data's all_classes)")
    matches = [name for name in all_classes if name in prediction]
    for name in matches:  # mutating while iterating: LongBench parity, see docstring
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _share_equal(prediction: str, target: str) -> float:
    """Share of the digit runs in the prediction equal to ``target``, so hedging over several numbers is penalised."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_retrieval_en: share of the numbers in the prediction equal to N of the reference "Paragraph N"."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise KVBenchError(f"retrieval_score expects references like 'Paragraph 7', got {ground_truth!r}")
    return _share_equal(prediction, found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_retrieval_zh: as :func:`retrieval_score`, with references like "段落7"."""
    found = re.findall(r"段落(\d+)", ground_truth)
    if not found:
        raise KVBenchError(f"retrieval_zh_score expects references like '段落7', got {ground_truth!r}")
    return _share_equal(prediction, found[0])


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_count: share of the numbers in the prediction equal to the true count ("17" does not count as "7")."""
    return _share_equal(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench ran it: integer percent of ``difflib.SequenceMatcher``.

    LongBench installs ``fuzzywuzzy`` without ``python-Levenshtein``, in which case fuzzywuzzy falls back to
    difflib (default autojunk) and rounds 100 * ratio with Python's half-to-even ``round`` (12.5 -> 12,
    87.5 -> 88); equal strings give 100 (two empty ones included), one empty string 0.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def first_code_line(prediction: str) -> str:
    """The first line that looks like code (no markdown fence, no comment), as LongBench picks it."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Edit similarity (:func:`fuzz_ratio` / 100) between the first code-looking line and the true next line."""
    return fuzz_ratio(first_code_line(prediction), ground_truth) / 100


# LongBench's dataset2metric for every task whose metric needs no Chinese word segmentation (jieba):
# the 13 LongBench-E tasks kvbench loads, plus the rest of LongBench for scoring predictions made elsewhere.
TASK_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
_NEEDS_JIEBA = ("multifieldqa_zh", "dureader", "vcsum")


def _prediction_text(value: Any) -> str:
    """A prediction as text; a missing one (None, or NaN after a CSV round trip) is the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def sample_score(task: str, prediction: Any, answers: Sequence[str] | str, all_classes: Sequence[str] | None = None) -> float:
    """One sample's LongBench score in [0, 1]: the task's metric, maxed over the reference answers.

    As eval.py: first-line cut for :data:`FIRST_LINE_TASKS`, then ``max(0, metric(answer) for each answer)``.
    """
    if task not in TASK_METRICS:
        hint = " (Chinese tasks scored with jieba are not included)" if task in _NEEDS_JIEBA else ""
        raise KVBenchError(f"no LongBench metric for task '{task}'{hint}; known tasks: {', '.join(TASK_METRICS)}")
    if isinstance(answers, str):
        answers = [answers]
    text = _prediction_text(prediction)
    if task in FIRST_LINE_TASKS:
        text = text.lstrip("\n").split("\n")[0]
    metric = TASK_METRICS[task]
    classes = list(all_classes) if all_classes is not None else None
    best = 0.0
    for answer in answers:
        best = max(best, metric(text, str(answer), all_classes=classes))
    return float(best)


def task_score(scores: Sequence[float]) -> float:
    """eval.py ``scorer``: ``round(100 * total / n, 2)``, the total summed in order, Python's rounding."""
    if not scores:
        raise KVBenchError("a LongBench task score needs at least one sample")
    total = 0.0
    for value in scores:
        total += value
    return round(100 * total / len(scores), 2)


def bucket_score(scores: Sequence[float]) -> float:
    """eval.py ``scorer_e``: ``round(100 * numpy.mean(scores), 2)``.

    numpy's pairwise mean and numpy's rounding (the value is a numpy float there), which can differ from
    :func:`task_score`'s arithmetic in the last digit; eval.py reports NaN for an empty bucket, kvbench
    leaves such a bucket out (JSON has no NaN), so this refuses an empty list.
    """
    if not scores:
        raise KVBenchError("a LongBench-E bucket score needs at least one sample")
    return float(round(100 * np.mean(np.asarray(scores, dtype=np.float64)), 2))


def length_bucket(length: int) -> str:
    """LongBench-E's buckets are in words of context (the data's ``length``), not tokens."""
    if length < 4000:
        return BUCKETS[0]
    if length < 8000:
        return BUCKETS[1]
    return BUCKETS[2]


def _classes(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return text_list(value)


def _answers(value: Any) -> list[str]:
    return text_list(value)


def compute(predictions: pd.DataFrame) -> dict:
    """Task scores and LongBench-E bucket scores as eval.py reports them, plus kvbench's averages.

    ``per_task[task]`` is eval.py's (non ``--e``) task figure and ``per_task_bucket[task][bucket]`` its
    ``--e`` figure. ``score`` is the unweighted mean of the task figures (LongBench's "Avg"), and
    ``per_bucket`` averages, for each bucket, the figures of the tasks that have samples in it, so every task
    weighs the same whatever its sample count. Empty buckets are left out rather than reported as NaN.
    """
    missing = {"task", "prediction", "answers"} - set(predictions.columns)
    if missing:
        raise KVBenchError(
            f"LongBench predictions lack column(s) {', '.join(sorted(missing))}; score the output of the longbench_e dataset"
        )
    if predictions.empty:
        raise KVBenchError("no LongBench predictions to score; check that the run produced outputs")
    has_length = "length" in predictions.columns
    per_sample: dict[str, list[float]] = {}
    per_sample_bucket: dict[str, dict[str, list[float]]] = {}
    for record in predictions.to_dict("records"):
        task = str(record["task"])
        value = sample_score(task, record["prediction"], _answers(record["answers"]), _classes(record.get("all_classes")))
        per_sample.setdefault(task, []).append(value)
        if has_length:
            bucket = length_bucket(int(record["length"]))
            per_sample_bucket.setdefault(task, {}).setdefault(bucket, []).append(value)
    per_task = {task: task_score(values) for task, values in per_sample.items()}
    per_task_bucket = {
        task: {bucket: bucket_score(buckets[bucket]) for bucket in BUCKETS if bucket in buckets}
        for task, buckets in per_sample_bucket.items()
    }
    per_bucket = {}
    for bucket in BUCKETS:
        figures = [buckets[bucket] for buckets in per_task_bucket.values() if bucket in buckets]
        if figures:
            per_bucket[bucket] = float(sum(figures) / len(figures))
    return {
        "score": float(sum(per_task.values()) / len(per_task)),
        "per_task": per_task,
        "per_bucket": per_bucket,
        "per_task_bucket": per_task_bucket,
        "num_samples": int(len(predictions)),
    }
