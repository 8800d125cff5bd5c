"""Answer metrics and the statistics around them: pure functions on strings and numbers, no model.

Every per-example metric takes (prediction, reference) and returns a bool or a score in [0, 1], so
the same paired bootstrap gives an interval for any of them. ROUGE-L (`rouge-score`) and chrF
(`sacrebleu`) run offline; `evaluate.load` would fetch them from the Hub.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any, Callable, Sequence

# ---------------------------------------------------------------------------------------------
# Matching


def normalize_text(text: str) -> str:
    """Case, punctuation and spacing do not count: NFKC, lower case, punctuation -> space, one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def normalize_spaces(text: str) -> str:
    """Case and spacing do not count, punctuation does (used by the leak check)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def normalized_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised prediction as whole words (for short facts
    answered in a sentence: 'Paris' in 'The capital of France is Paris.')."""
    ref = normalize_text(reference)
    return bool(ref) and f" {ref} " in f" {normalize_text(prediction)} "


def json_match(prediction: str, reference: str) -> bool:
    """Valid JSON object with exactly the reference's keys (the format is right, values aside)."""
    try:
        got = json.loads(prediction.strip())
    except json.JSONDecodeError:
        return False
    try:
        want = json.loads(reference)
    except json.JSONDecodeError:
        return isinstance(got, dict)
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want)
    return type(got) is type(want)


class _WordTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9] and so scores every non-Latin answer 0;
    this one keeps Unicode words and splits CJK text per character (it has no spaces)."""

    _cjk = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
    _pattern = re.compile(rf"[{_cjk}]|[^\W{_cjk}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(normalize_text(text))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), 0..1."""
    if not reference.strip() and not prediction.strip():
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (character n-gram F-score, sacrebleu defaults), scaled to 0..1."""
    return float(_chrf().sentence_score(prediction, [reference]).score) / 100.0


# ---------------------------------------------------------------------------------------------
# Format accuracy: does the answer have the shape the application parses?


class FormatChecker:
    """JSON validity, a JSON Schema, or a regex the whole answer must match."""

    def __init__(self, kind: str, schema: dict | None = None, regex: str | None = None):
        self.kind = kind
        self.regex = re.compile(regex, re.DOTALL) if regex is not None else None
        self.validator = None
        if kind == "json_schema":
            import jsonschema

            if schema is None:
                raise ValueError("format 'json_schema' needs a schema")
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)  # a broken schema is a config error, not a 0% score
            self.validator = cls(schema)
        elif kind == "regex" and self.regex is None:
            raise ValueError("format 'regex' needs a regex")
        elif kind not in ("json", "json_schema", "regex"):
            raise ValueError(f"unknown format {kind!r}")

    @property
    def name(self) -> str:
        return f"format_{self.kind}"

    def __call__(self, prediction: str) -> bool:
        if self.kind == "regex":
            return self.regex.fullmatch(prediction.strip()) is not None
        try:
            value = json.loads(prediction.strip())
        except json.JSONDecodeError:
            return False
        return self.validator is None or self.validator.is_valid(value)


# ---------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; well behaved at 0 and n, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (for scores such as chrF, where Wilson does not apply)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return (float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2)))


def paired_bootstrap(before: Sequence[float], after: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(after) - mean(before) over the same examples, resampling examples (paired):
    the per-example differences carry the correlation, so a gain that every example shares is tight."""
    if len(before) != len(after):
        raise ValueError(f"paired samples differ in size: {len(before)} vs {len(after)}")
    if not before:
        return (-1.0, 1.0)
    diffs = [float(b) - float(a) for a, b in zip(before, after)]
    return bootstrap_mean_interval(diffs, resamples, seed, level)


def token_weighted_difference(before_sums: Sequence[float], after_sums: Sequence[float], tokens: Sequence[int],
                              resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Difference of two token-weighted mean losses on the same examples (same supervised tokens),
    with a paired bootstrap over examples: each resample is sum(after - before) / sum(tokens)."""
    import numpy as np

    a, b, c = (np.asarray(x, dtype=float) for x in (before_sums, after_sums, tokens))
    n = len(c)
    value = float((b - a).sum() / max(c.sum(), 1))
    if n == 0:
        return {"value": 0.0, "n": 0, "ci95": [-math.inf, math.inf], "significant": False}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = (b - a)[idx].sum(axis=1) / np.maximum(c[idx].sum(axis=1), 1)
    lo, hi = float(np.quantile(stats, (1 - level) / 2)), float(np.quantile(stats, (1 + level) / 2))
    return {"value": value, "n": n, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}


def rate(hits: Sequence[bool]) -> dict[str, Any]:
    """A proportion with its sample size and 95% Wilson interval."""
    k, n = sum(bool(h) for h in hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else 0.0, "k": k, "n": n, "ci95": [lo, hi], "kind": "rate"}


def mean_score(values: Sequence[float]) -> dict[str, Any]:
    """A mean score in [0, 1] with its sample size and 95% bootstrap interval."""
    n = len(values)
    lo, hi = bootstrap_mean_interval(values)
    return {"value": sum(values) / n if n else 0.0, "n": n, "ci95": [lo, hi], "kind": "mean"}


def difference(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    lo, hi = paired_bootstrap(before, after)
    n = len(before)
    d = (sum(map(float, after)) - sum(map(float, before))) / n if n else 0.0
    return {"value": d, "n": n, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Summary of a length distribution (the full list stays in the report for histograms)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(ordered), "mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "min": ordered[0], "max": ordered[-1]}


def agreement(samples: Sequence[str]) -> float:
    """Consistency of k sampled answers to one prompt: the share of them equal (after normalising) to
    the most common one. 1.0 = all agree; 1/k = all differ."""
    if not samples:
        return 0.0
    counts = Counter(normalize_text(s) for s in samples)
    return counts.most_common(1)[0][1] / len(samples)


# Per-example metrics computed for every evaluated model; the config's `eval.metric` picks the headline.
TEXT_METRICS: dict[str, Callable[[str, str], float | bool]] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "contains": contains_match,
    "json": json_match,
    "rougeL": rouge_l,
    "chrf": chrf,
}
BOOLEAN_METRICS = {"exact_match", "normalized_match", "contains", "json"}
