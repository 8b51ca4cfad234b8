"""LongBench's scoring functions, usable on their own (``from kvbench.metrics.longbench import qa_f1_score``).

Every per-answer metric returns a value in [0, 1] and follows LongBench's definitions so that a
kvbench number can sit next to a published LongBench(-E) number. Task scores are the mean over samples
times 100; LongBench-E additionally splits each task by the sample's context length (in words).
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from kvbench.errors import KVBenchError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_rouge_scorer = None


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation, so that "The Eiffel Tower." and "eiffel tower" count as the same answer."""
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


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F-measure (summarisation tasks), computed with Google's ``rouge-score`` package.

    LongBench used the ``rouge`` package; ``rouge-score`` is the maintained reference implementation. Both
    compute LCS-based ROUGE-L F on lower-cased words; ``rouge-score`` drops non-alphanumeric characters
    when tokenising, so values can differ from LongBench's in the second decimal on punctuation-heavy text.
    No stemming, as in LongBench.
    """
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    return float(_rouge_scorer.score(ground_truth, prediction)["rougeL"].fmeasure)


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """TREC label match: 1/k when the true label is among the k class names the prediction mentions.

    Class names that are substrings of the true label (e.g. a shorter label inside a longer one) are
    dropped so they do not dilute the score. LongBench removes them while iterating over the same list,
    which skips the element after each removal; that is kept on purpose so scores match LongBench's.
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


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction that equal the true paragraph number ("Paragraph N")."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise KVBenchError(f"retrieval_score expects references like 'Paragraph 7', got {ground_truth!r}")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == found[0] for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction that equal the true count, so hedging over several counts is penalised."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == str(ground_truth) for number in numbers) / len(numbers)


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench ran it: integer percent of ``difflib.SequenceMatcher``.

    LongBench installs ``fuzzywuzzy`` without ``python-Levenshtein``, in which case fuzzywuzzy falls back to
    difflib (default autojunk) and rounds 100 * ratio to an integer; equal strings give 100, an empty one 0.
    Using difflib rather than a Levenshtein ratio therefore reproduces LongBench's code scores exactly.
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


TASK_METRICS: dict[str, Callable[..., float]] = {
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "gov_report": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
# Few-shot tasks: the model tends to continue with the next made-up example, which must not be scored.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum"})
BUCKETS = ("0-4k", "4-8k", "8k+")


def score_task(task: str, prediction: str, answers: Sequence[str] | str, all_classes: Sequence[str] | None = None) -> float:
    """Score one sample in [0, 100] (as kvbench.metrics.ruler does): the best match over all references, with the task's metric."""
    if task not in TASK_METRICS:
        raise KVBenchError(f"no LongBench metric for task '{task}'; known tasks: {', '.join(TASK_METRICS)}")
    if isinstance(answers, str):
        answers = [answers]
    prediction = str(prediction or "")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = TASK_METRICS[task]
    classes = list(all_classes) if all_classes is not None else None
    best = 0.0
    for answer in answers:
        best = max(best, float(metric(prediction, str(answer), all_classes=classes)))
    return 100.0 * best


def length_bucket(length: int) -> str:
    """LongBench-E's buckets are in words of context (the data's ``length``), not tokens."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def _classes(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return [str(v) for v in value]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def compute(predictions: pd.DataFrame) -> dict:
    """Task scores (x100), their unweighted mean as ``score``, and LongBench-E's length-bucket breakdown.

    ``per_bucket`` averages, for each bucket, the task scores of the tasks that have samples in it, so
    every task weighs the same whatever its sample count. Empty buckets are left out rather than reported
    as NaN, which JSON cannot carry.
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
        value = score_task(task, record["prediction"], list(record["answers"]), _classes(record.get("all_classes")))
        per_sample.setdefault(task, []).append(value)
        if has_length:
            bucket = length_bucket(int(record["length"]))
            per_sample_bucket.setdefault(task, {}).setdefault(bucket, []).append(value)
    per_task = {task: _mean(values) for task, values in per_sample.items()}
    per_task_bucket = {
        task: {bucket: _mean(buckets[bucket]) for bucket in BUCKETS if bucket in buckets}
        for task, buckets in per_sample_bucket.items()
    }
    per_bucket = {}
    for bucket in BUCKETS:
        scores = [buckets[bucket] for buckets in per_task_bucket.values() if bucket in buckets]
        if scores:
            per_bucket[bucket] = _mean(scores)
    return {
        "score": _mean(list(per_task.values())),
        "per_task": per_task,
        "per_bucket": per_bucket,
        "per_task_bucket": per_task_bucket,
        "num_samples": int(len(predictions)),
    }
