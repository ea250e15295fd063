"""Label-free accuracy estimates for a site's unlabelled images, from logits alone.

Every estimator here is calibrated on the run's SOURCE validation images (where labels exist) and
then sees only the site's logits: no function takes the site's labels, because a site has none.

    ATC   Garg et al., ICLR 2022: a threshold t on a confidence score is fit on source validation so
          that the share of source images scoring below t equals the source error; the estimate is
          the share of site images scoring at or above t. The score is the negative entropy of the
          softmax (the paper's better variant, ATC-NE).
    DoC   difference of confidences (Guillory et al., 2021): source accuracy minus the drop in mean
          max-softmax confidence from source to site.
    agreement
          with a teacher that is right with probability 1 - e: |acc(student) - agree(student,
          teacher)| <= e. The site's e is unknown; the teacher's error on source validation stands
          in for it, so the bound is only as good as the teacher is on the site (weak where the
          teacher is weak).

Uncertainty: a seeded bootstrap over both the source images and the site images (the threshold is
refit in every resample), 95 % percentile interval. It covers sampling noise only, not the
estimator's own bias under shift, which is what benchmarks/results/site_estimates measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP = 200      # resamples for the intervals
KS_ALPHA_C = 1.63    # two-sample Kolmogorov-Smirnov critical coefficient at alpha = 0.01


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities (float64, max-subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def max_confidence(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) the largest softmax probability."""
    return softmax(logits).max(axis=1)


def negative_entropy(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) sum p log p (0 for a one-hot prediction, -log C for a uniform one)."""
    p = softmax(logits)
    return (p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)


def atc_threshold(source_scores: np.ndarray, source_correct: np.ndarray) -> float:
    """t with share(source_scores < t) = source error: the (error)-quantile of the scores."""
    error = 1.0 - float(np.mean(source_correct))
    return float(np.quantile(source_scores, error, method="inverted_cdf")) if error > 0 else \
        float(np.min(source_scores))


def atc(source_scores: np.ndarray, source_correct: np.ndarray, site_scores: np.ndarray) -> float:
    """ATC's accuracy estimate (a share, 0..1) for the site."""
    t = atc_threshold(source_scores, source_correct)
    return float(np.mean(site_scores >= t))


def doc(source_confidence: np.ndarray, source_correct: np.ndarray,
        site_confidence: np.ndarray) -> float:
    """Difference of confidences: source accuracy - (mean source conf - mean site conf), in 0..1."""
    value = float(np.mean(source_correct)) - (float(np.mean(source_confidence))
                                              - float(np.mean(site_confidence)))
    return min(1.0, max(0.0, value))


def _bootstrap(estimate: Any, source: Sequence[np.ndarray], site: Sequence[np.ndarray],
               seed: int, resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """95 % percentile interval of `estimate(*source, *site)` over joint resamples of both sets."""
    rng = np.random.default_rng(seed)
    n, m = len(source[0]), len(site[0])
    values = []
    for _ in range(resamples):
        i, j = rng.integers(0, n, n), rng.integers(0, m, m)
        values.append(estimate(*(a[i] for a in source), *(b[j] for b in site)))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class Calibration:
    """What the estimators know of the sources: per source validation image, its scores and whether
    the model was right (the only labels any estimator uses)."""

    negative_entropy: np.ndarray  # (N,)
    confidence: np.ndarray        # (N,)
    correct: np.ndarray           # (N,) bool
    domain: np.ndarray            # (N,) the source domain's name

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray, domains: Sequence[str]
                    ) -> Calibration:
        return cls(negative_entropy(logits), max_confidence(logits),
                   np.asarray(logits).argmax(axis=1) == np.asarray(labels), np.asarray(domains))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def _entry(method: str, value: float, interval: tuple[float, float], how: str,
           **extra: Any) -> dict[str, Any]:
    return {"method": method, "estimate": round(100 * value, 2),
            "interval": [round(100 * interval[0], 2), round(100 * interval[1], 2)],
            "how": how, **extra}


def estimate_accuracy(calibration: Calibration, site_logits: np.ndarray, *, seed: int = 0,
                      teacher: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every estimate for one model on one site, in points, each with its interval and method.

    `site_logits` (M, C): the model's logits on the site's images, nothing else of them. `teacher`,
    when the run has one: {"site_predictions": (M,) the teacher's classes on the same images,
    "source_error": its error (0..1) on the source validation images}."""
    site_ne, site_conf = negative_entropy(site_logits), max_confidence(site_logits)
    src = (calibration.negative_entropy, calibration.correct)
    found = [
        _entry("ATC", atc(*src, site_ne), _bootstrap(atc, src, (site_ne,), seed),
               "share of site images whose softmax negative entropy reaches the threshold that "
               "source validation's error sets (Garg et al. 2022)",
               threshold=round(atc_threshold(*src), 6)),
        _entry("DoC", doc(calibration.confidence, calibration.correct, site_conf),
               _bootstrap(doc, (calibration.confidence, calibration.correct), (site_conf,), seed),
               "source validation accuracy minus the fall in mean max-softmax confidence"),
    ]
    if teacher is not None:
        student = np.asarray(site_logits).argmax(axis=1)
        agree_each = student == np.asarray(teacher["site_predictions"])
        agree, error = float(np.mean(agree_each)), float(teacher["source_error"])
        rng = np.random.default_rng(seed)
        m = len(agree_each)
        spread = np.percentile([np.mean(agree_each[rng.integers(0, m, m)])
                                for _ in range(BOOTSTRAP)], [2.5, 97.5])
        found.append(_entry(
            "teacher agreement", agree,
            (max(0.0, float(spread[0]) - error), min(1.0, float(spread[1]) + error)),
            "share of site images where the student and the teacher's zero-shot class agree; the "
            "accuracy lies within the teacher's error of it (the teacher's source-validation error "
            f"{100 * error:.1f} % stands in for its unknown error on the site)",
            teacher_source_error=round(100 * error, 2)))
    return found


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


def shift_check(calibration: Calibration, site_logits: np.ndarray) -> dict[str, Any]:
    """Does the site look unlike every source domain? Compared on the confidence score (negative
    entropy), the only view of an image every artefact gives: the site is flagged when its
    Kolmogorov-Smirnov distance to EVERY source domain exceeds both the largest distance between
    two source domains (how far the sources already differ) and the alpha = 0.01 critical value for
    the sample sizes (so that small sites are not flagged on noise alone)."""
    site = negative_entropy(site_logits)
    names = list(dict.fromkeys(calibration.domain.tolist()))
    per = {d: calibration.negative_entropy[calibration.domain == d] for d in names}
    to_site = {d: ks_statistic(site, s) for d, s in per.items()}
    between = [ks_statistic(per[a], per[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    critical = {d: KS_ALPHA_C * np.sqrt((len(site) + len(s)) / (len(site) * len(s)))
                for d, s in per.items()}
    limit = {d: max(max(between, default=0.0), critical[d]) for d in names}
    unlike = all(to_site[d] > limit[d] for d in names)
    return {"unlike_every_source": bool(unlike),
            "ks_to_source": {d: round(v, 4) for d, v in to_site.items()},
            "ks_between_sources_max": round(max(between, default=0.0), 4),
            "rule": "flagged when the site's KS distance (negative entropy of the softmax) to every "
                    "source domain exceeds the largest distance between two source domains and the "
                    "alpha=0.01 critical value"}


def describe_predictions(site_logits: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The predicted class distribution and confidence statistics of a model on the site."""
    predicted = np.asarray(site_logits).argmax(axis=1)
    conf = max_confidence(site_logits)
    counts = np.bincount(predicted, minlength=len(classes))
    share = counts / max(1, len(predicted))
    return {"predicted_classes": {c: {"images": int(n), "share": round(float(s), 4)}
                                  for c, n, s in zip(classes, counts, share)},
            "confidence": {"mean": round(float(conf.mean()), 4),
                           "median": round(float(np.median(conf)), 4),
                           "p10": round(float(np.percentile(conf, 10)), 4),
                           "p90": round(float(np.percentile(conf, 90)), 4),
                           "share_below_0_5": round(float(np.mean(conf < 0.5)), 4)}}
