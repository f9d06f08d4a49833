"""Metrics: ``(prediction, reference, **args) -> score in [0, 1]``, registered by name in ``METRICS``.

``prediction`` is an extractor's output (``None``: nothing extracted, scores 0); ``reference`` is the
dataset's answer (a string, a number, or a list of acceptable answers: the best match counts). A metric
marked ``reads_question`` also takes ``question=`` (the task's ``question`` field).

* ``numeric`` — the reference scorer's rule by default: 1 when both parse as numbers and
  ``abs(r - p) <= abs_tol`` evaluated in float64, ``abs_tol=1e-3`` (``cat_eval.py``'s
  ``abs(label - pred) <= 0.001``, PAL's GSM-Hard scorer too). ``rel_tol`` (default 0) adds
  ``|p - r| <= rel_tol·max(|p|, |r|)``; no GSM-Hard answer is near 2**53, so float rounding never needs
  it, and at 1e9 a relative 1e-9 accepts an integer off by one. Values beyond float64 (``1e400``) never
  crash: they compare as infinities, and an infinity matches only the same infinity.
* ``exact_match`` and ``token_f1`` — the SQuAD v1.1 definitions (https://arxiv.org/abs/1606.05250,
  official ``evaluate-v1.1.py``): lower-case, drop punctuation and the articles a/an/the, collapse
  whitespace; F1 over the bag of normalised tokens.
* ``novel_token_f1`` — SQuAD token F1 over the words the question does not contain: both the
  prediction and the reference lose every normalised token that occurs in the question, then F1 as
  above. Repeating the question scores 0, and a short answer that gives only what the question asks
  ("Etanercept" for "Etanercept is the most widely used anti-TNF drug.") scores 1. When the reference
  has no word outside the question ("... higher or lower than 40%?" → "higher"), the score is plain
  ``token_f1`` of the full texts, where an echo's precision is low (1 QABot item of 95).
* ``tfidf_cosine`` — the cosine of the TF-IDF vectors of prediction and reference (scikit-learn
  ``TfidfVectorizer`` defaults: lower-case, word tokens of 2+ characters, smoothed IDF, L2 norm). The
  vectoriser is fitted on the two texts being compared and nothing else (the corpus is the pair
  ``[prediction, reference]``), as the reference code's matcher does (``fit_transform([pred, label])``
  per pair). So a score never depends on the other examples (``--limit`` or a resumed run cannot
  change it), and IDF weighs words that only one of the two texts uses above the shared ones. The
  QA task counts an answer correct when this score is above 0.3, the reference's threshold; the
  question itself, used as the answer, passes that rule for most QABot items (docs/evaluation.md).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from lorasoup.registry import Registry

Metric = Callable[..., float]
"""``(prediction: str | None, reference: Any, **args) -> float`` in [0, 1]."""

METRICS: Registry[Metric] = Registry("metric")

_MAX_EXPONENT = 400  # 10**400 is exact as a Fraction; far larger exponents would take ages to build
_MAX_DIGITS = 4000  # below Python's int-parsing limit (4300 digits)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WRAPPED = re.compile(
    r"[A-Za-z_][\w.]*\(\s*(['\"]?)(?P<inner>[^()'\"]*)\1\s*\)"
)  # np.float64(3.5), Decimal('2')
_FRACTION_CALL = re.compile(r"Fraction\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def parse_number(value: Any) -> Fraction | float | None:
    """A number from a value or its text; ``None`` when it is not one.

    Accepts ints and floats, and text such as ``-1,234.5``, ``1.5e10``, ``3/4``, ``inf``, and the reprs of
    common numeric types (``np.float64(3.5)``, ``Decimal('3.5')``, ``Fraction(7, 2)``). Finite values come
    back as exact ``Fraction``s; ``inf``/``nan`` as floats. Booleans and containers are not numbers.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(value) if math.isfinite(value) else value
    if not isinstance(value, str):
        return None
    if (call := _FRACTION_CALL.fullmatch(value.strip())) is not None:
        denominator = int(call[2])
        return Fraction(int(call[1]), denominator) if denominator else None
    text = value.strip().replace(",", "").replace("−", "-").replace("_", "")
    if (wrapped := _WRAPPED.fullmatch(text)) is not None:
        text = wrapped["inner"].strip()
    return _parse_text(text)


def _parse_text(text: str) -> Fraction | float | None:
    if text.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(text)
    numerator, slash, denominator = text.partition("/")
    if slash:
        top, bottom = _parse_text(numerator), _parse_text(denominator)
        if isinstance(top, Fraction) and isinstance(bottom, Fraction) and bottom != 0:
            return top / bottom
        return None
    if len(text) > _MAX_DIGITS or _PLAIN_NUMBER.fullmatch(text) is None:
        return None
    _, _, exponent = text.lower().partition("e")
    if exponent and abs(int(exponent)) > _MAX_EXPONENT:
        return float(text)  # inf or 0.0: beyond any answer a test set holds
    return Fraction(text)


def _references(reference: Any) -> list[Any]:
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


@METRICS.register("numeric")
def numeric(prediction: Any, reference: Any, *, abs_tol: float = 1e-3, rel_tol: float = 0.0) -> float:
    """1.0 when the prediction is within tolerance of a reference number (see the module doc)."""
    predicted = parse_number(prediction)
    if predicted is None:
        return 0.0
    return max(
        (_close(predicted, parse_number(r), abs_tol, rel_tol) for r in _references(reference)), default=0.0
    )


def _as_float(value: Fraction | float) -> float:
    try:
        return float(value)
    except OverflowError:  # a Fraction beyond float64: the reference's float() would give an infinity
        return math.inf if value > 0 else -math.inf


def _close(p: Fraction | float | None, r: Fraction | float | None, abs_tol: float, rel_tol: float) -> float:
    if p is None or r is None:
        return 0.0
    ours, theirs = _as_float(p), _as_float(r)
    if not (math.isfinite(ours) and math.isfinite(theirs)):  # an infinity or a nan on either side
        return float(ours == theirs)
    gap = abs(theirs - ours)  # float64, as the reference's abs(label - pred)
    return float(gap <= abs_tol or (rel_tol > 0 and gap <= rel_tol * max(abs(ours), abs(theirs))))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@METRICS.register("exact_match")
def exact_match(prediction: str | None, reference: Any) -> float:
    if prediction is None:
        return 0.0
    ours = normalize_answer(str(prediction))
    return max((float(ours == normalize_answer(str(r))) for r in _references(reference)), default=0.0)


@METRICS.register("exact_text")
def exact_text(prediction: str | None, reference: Any) -> float:
    """Equal after collapsing whitespace; case and punctuation count (``7 * 8`` is not ``7 + 8``),
    unlike ``exact_match``'s SQuAD normalisation, which drops operators."""
    if prediction is None:
        return 0.0
    ours = " ".join(str(prediction).split())
    return max((float(ours == " ".join(str(r).split())) for r in _references(reference)), default=0.0)


@METRICS.register("token_f1")
def token_f1(prediction: str | None, reference: Any) -> float:
    if prediction is None:
        return 0.0
    return max((_f1(str(prediction), str(r)) for r in _references(reference)), default=0.0)


def _f1(prediction: str, reference: str, drop: frozenset[str] = frozenset()) -> float:
    ours = [t for t in normalize_answer(prediction).split() if t not in drop]
    theirs = [t for t in normalize_answer(reference).split() if t not in drop]
    if drop and not theirs:  # the question holds every word of the reference ("higher or lower?")
        return _f1(prediction, reference)  # plain F1: an echo's precision is low, "higher" scores 1
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


@METRICS.register("novel_token_f1")
def novel_token_f1(prediction: str | None, reference: Any, *, question: str | None = None) -> float:
    """Token F1 over the words the question does not contain (see the module doc).

    Without a question it is ``token_f1``."""
    if prediction is None:
        return 0.0
    given = frozenset(normalize_answer(question).split()) if question else frozenset()
    return max((_f1(str(prediction), str(r), drop=given) for r in _references(reference)), default=0.0)


novel_token_f1.reads_question = True  # type: ignore[attr-defined]


def reads_question(metric: Metric) -> bool:
    """Whether ``metric`` takes the task's question (``question=``) besides prediction and reference."""
    return bool(getattr(metric, "reads_question", False))


@METRICS.register("tfidf_cosine")
def tfidf_cosine(prediction: str | None, reference: Any) -> float:
    if prediction is None:
        return 0.0
    return max((_tfidf_pair(str(prediction), str(r)) for r in _references(reference)), default=0.0)


def _tfidf_pair(prediction: str, reference: str) -> float:
    """Cosine of the two texts' TF-IDF vectors, the vectoriser fitted on exactly these two texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vectors = TfidfVectorizer().fit_transform([prediction, reference])  # (2, V), rows L2-normalised
    except ValueError:  # empty vocabulary: neither text has a word of 2+ characters
        return 0.0
    return float(min(1.0, (vectors[0] @ vectors[1].T).toarray()[0, 0]))
