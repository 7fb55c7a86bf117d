"""The scorer registry: ``score(name, prediction, answers, **extra) -> float in [0, 1]``.

Every scorer takes the whole answer list. Per-reference metrics (``qa_f1``, ``rouge_l``,
LongBench's) score against each answer and keep the best, as LongBench does; RULER's
``string_match_all`` needs every answer (the fraction found) and ``string_match_part`` any.

Extra keywords: ``all_classes`` (LongBench classification) and ``first_line=True``
(LongBench keeps only the first line of the prediction for trec, triviaqa, samsum, lsht).
:func:`score_row` reads both from a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.tasks import metrics

Scorer = Callable[..., float]
SCORERS: dict[str, Scorer] = {}


def register(name: str):
    def add(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return add


def _best_of(metric: Callable[..., float]) -> Scorer:
    def scorer(prediction: str, answers: Sequence[str], **extra) -> float:
        return max((metric(prediction, ref, **extra) for ref in answers), default=0.0)

    scorer.__doc__ = f"best {metric.__name__} over the answers"
    return scorer


@register("exact")
def exact(prediction: str, answers: Sequence[str], **_) -> float:
    """1 if the stripped prediction equals an answer, ignoring case."""
    pred = prediction.strip().casefold()
    return float(any(pred == ref.strip().casefold() for ref in answers))


@register("contains")
def contains(prediction: str, answers: Sequence[str], **_) -> float:
    """1 if an answer occurs in the prediction, ignoring case."""
    pred = prediction.casefold()
    return float(any(ref.casefold() in pred for ref in answers))


@register("string_match_all")
def string_match_all(prediction: str, answers: Sequence[str], **_) -> float:
    """RULER: the fraction of the answers found in the prediction, ignoring case."""
    if not answers:
        return 0.0
    pred = metrics.ruler_postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in answers) / len(answers)


@register("string_match_part")
def string_match_part(prediction: str, answers: Sequence[str], **_) -> float:
    """RULER: 1 if any answer is found in the prediction, ignoring case."""
    pred = metrics.ruler_postprocess(prediction).lower()
    return float(any(ref.lower() in pred for ref in answers))


for _name, _metric in {
    "qa_f1": metrics.qa_f1,
    "qa_f1_zh": metrics.qa_f1_zh,
    "rouge_l": metrics.rouge_l,
    "rouge": metrics.longbench_rouge,
    "rouge_zh": metrics.rouge_zh,
    "classification": metrics.classification,
    "retrieval": metrics.retrieval,
    "retrieval_zh": metrics.retrieval_zh,
    "count": metrics.count,
    "code_sim": metrics.code_sim,
}.items():
    register(_name)(_best_of(_metric))


def score(name: str, prediction: str, answers: Sequence[str] | str, **extra) -> float:
    """Score `prediction` against `answers` with the scorer `name`; a float in [0, 1]."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}") from None
    if isinstance(answers, str):
        answers = [answers]
    prediction = prediction or ""
    if extra.pop("first_line", False):
        prediction = prediction.lstrip("\n").split("\n")[0]
    value = float(scorer(prediction, list(answers or []), **extra))
    return min(max(value, 0.0), 1.0)


def score_row(row: dict, prediction: str) -> float:
    """Score a prediction for a row with the row's scorer, answers and scorer extras."""
    extra = {"first_line": bool(row.get("first_line"))}
    if row.get("all_classes"):
        extra["all_classes"] = list(row["all_classes"])
    return score(row["scorer"], prediction, row.get("answer") or [], **extra)
