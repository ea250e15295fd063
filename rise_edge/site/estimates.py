"""Label-free accuracy estimates for a site's unlabelled images, from logits alone.

Every estimator here is calibrated on the run's SOURCE validation images (where labels exist) and
then sees only the site's logits: no function takes the site's labels, because a site has none.

    ATC   Garg et al., ICLR 2022: a threshold t on a confidence score is fit on source validation so
          that the share of source images scoring below t equals the source error; the estimate is
          the share of site images scoring at or above t. The score is the negative entropy of the
          softmax (the paper's better variant, ATC-NE), on the raw logits.
    ATC-TS
          the same on logits divided by a temperature T fit first on source validation (one scalar,
          minimising the negative log-likelihood), as the ATC paper does; T is in the estimate, and
          where no T can be fit (every source image right, one class, ...) T = 1 with the reason.
    DoC   difference of confidences (Guillory et al., 2021): source accuracy minus the drop in mean
          max-softmax confidence from source to site.
    agreement
          with a teacher that is right with probability 1 - e: |acc(student) - agree(student,
          teacher)| <= e. The site's e is unknown; the teacher's error on source validation stands
          in for it, so the bound is only as good as the teacher is on the site (weak where the
          teacher is weak).

Intervals: each estimate says what its interval is (`interval_kind`). ATC, ATC-TS and DoC give a
"spread": a seeded bootstrap over both the source and the site images (the threshold refit in every
resample), 95 % percentile. It covers sampling noise only, not the estimator's bias under shift;
benchmarks/results/site_estimates measured that bias to be larger, and too few cases exist to
calibrate a 95 % error interval from it (docs/site.md), so each estimate carries its measured error
beside the spread instead. Teacher agreement gives a "bound": the teacher's error either side.

Order: estimates are listed by their measured mean absolute error (MEASURED), lowest first; one not
yet measured comes after every measured one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from rise_edge.errors import UserError

BOOTSTRAP = 200      # resamples for the intervals
KS_ALPHA_C = 1.63    # two-sample Kolmogorov-Smirnov critical coefficient at alpha = 0.01
# Where the temperature is searched; a minimum at either end means no finite T fits (see
# fit_temperature). 0.02..50 spans every T reported for image classifiers many times over.
TEMPERATURE_BOUNDS = (0.02, 50.0)


class Measured(NamedTuple):
    """One estimator's error against the truth on one group of runs, FP32 and INT8 ONNX together."""

    cases: int       # artefacts x held-out domains
    mae: float       # mean absolute error, points
    largest: float   # largest absolute error, points
    held: int        # cases whose interval held the true accuracy


# The record every figure below comes from. Re-measure with benchmarks/site_estimates.py and paste
# the block its Markdown prints ("For rise_edge/site/estimates.py"). The demo group was re-measured
# on retrained runs with ATC-TS; the PACS group is carried (its runs were not at hand), so ATC-TS
# has no PACS figure and the order without a teacher is decided on the demo group.
MEASURED_RECORD = ("benchmarks/results/site_estimates.json (pacs: 4 EfficientNet-Lite0 ERM runs on "
                   "PACS, carried; demo: 12 RISE runs of the demo world with its teacher)")
MEASURED: dict[str, dict[str, Measured]] = {
    "ATC": {"pacs": Measured(8, 12.54, 21.74, 0), "demo": Measured(24, 7.18, 22.73, 16)},
    "DoC": {"pacs": Measured(8, 4.37, 14.02, 4), "demo": Measured(24, 6.38, 14.03, 11)},
    "teacher agreement": {"demo": Measured(24, 0.54, 1.19, 24)},
    "ATC-TS": {"demo": Measured(24, 6.82, 22.26, 13)},
}

# What each estimate's interval is (the field `interval_kind`, and its words for the reports).
INTERVAL_KINDS = {
    "spread": "95 % bootstrap spread over the source and site images: sampling noise only, not the "
              "estimator's error under shift, which was measured larger for ATC and DoC "
              "(docs/site.md)",
    "bound": "the teacher's source-validation error either side of the agreement (and its 95 % "
             "bootstrap spread): holds where the teacher is as good on the site as on the sources",
}


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


@dataclass(frozen=True)
class TemperatureFit:
    """The temperature ATC-TS divides the logits by, and how it was found."""

    temperature: float
    fitted: bool       # False: T = 1 kept, for `reason`
    reason: str        # why no temperature was fit; "" when one was
    nll_at_1: float    # mean negative log-likelihood on source validation at T = 1 ...
    nll: float         # ... and at `temperature`

    def to_record(self) -> dict[str, Any]:
        """The estimate's fields: T, whether it was fit (else why not), the NLL at T = 1 and at T."""
        nll = [round(v, 4) if np.isfinite(v) else None for v in (self.nll_at_1, self.nll)]
        return {"temperature": round(self.temperature, 4), "temperature_fitted": self.fitted,
                "temperature_fallback": self.reason or None, "source_nll_at_1_and_t": nll}


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax(`logits` (N, C) / T)."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def _unfit(logits: np.ndarray, labels: np.ndarray) -> str:
    """Why no temperature can be fit to these source logits, or "" when one can."""
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise UserError(f"temperature scaling: logits of shape {logits.shape} and labels of shape "
                        f"{labels.shape} do not match ((N, C) and (N,) are needed)")
    if len(logits) == 0:
        return "no source validation images"
    if logits.shape[1] < 2:
        return "fewer than two classes: the softmax does not depend on T"
    if not np.isfinite(logits).all():
        return "non-finite source logits (NaN or inf)"
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise UserError(f"temperature scaling: a label lies outside the {logits.shape[1]} classes")
    if float(np.ptp(logits, axis=1).max()) == 0.0:
        return "every image's logits are equal across classes: the likelihood does not depend on T"
    return ""


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS, tol: float = 1e-5
                    ) -> TemperatureFit:
    """The T > 0 minimising the NLL of softmax(logits (N, C) / T) for `labels` (N,) (Guo et al.
    2017, as ATC does before its threshold). The NLL is convex in 1/T, so unimodal in log T: a
    golden-section search on log T finds its minimum without a derivative or a start value. A
    minimum at an end of `bounds` means the NLL falls without limit (the model right on every image
    with a margin: T -> 0; no better than chance: T -> infinity): then T = 1 is kept, with the
    reason, as where the inputs allow no fit at all."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels).astype(np.int64)
    reason = _unfit(logits, labels)
    if reason:
        usable = len(logits) > 0 and logits.shape[1] >= 2 and bool(np.isfinite(logits).all())
        nll = temperature_nll(logits, labels, 1.0) if usable else float("nan")
        return TemperatureFit(1.0, False, reason, nll, nll)
    f = lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t)))  # noqa: E731
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:         # ... in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    log_t = (lo + hi) / 2.0
    at_1 = temperature_nll(logits, labels, 1.0)
    edge = 10 * tol  # a minimum this close to an end is the end: the NLL was still falling there
    if log_t - np.log(bounds[0]) < edge:
        return TemperatureFit(1.0, False, "the likelihood keeps rising as T -> 0 (the model is right "
                              "on every source validation image with a margin): no finite T fits",
                              at_1, at_1)
    if np.log(bounds[1]) - log_t < edge:
        return TemperatureFit(1.0, False, "the likelihood keeps rising as T grows (the model is no "
                              "better than chance on source validation): no finite T fits",
                              at_1, at_1)
    t = float(np.exp(log_t))
    return TemperatureFit(t, True, "", at_1, temperature_nll(logits, labels, t))


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
    the model was right (the only labels any estimator uses), and the temperature fit on them."""

    negative_entropy: np.ndarray  # (N,)
    confidence: np.ndarray        # (N,)
    correct: np.ndarray           # (N,) bool
    domain: np.ndarray            # (N,) the source domain's name
    temperature: TemperatureFit = field(
        default_factory=lambda: TemperatureFit(1.0, False, "not fit", float("nan"), float("nan")))
    scaled_negative_entropy: np.ndarray | None = None  # (N,) on logits / temperature

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray, domains: Sequence[str]
                    ) -> Calibration:
        """(N, C) source validation logits, (N,) their labels and domains."""
        fit = fit_temperature(logits, labels)
        return cls(negative_entropy(logits), max_confidence(logits),
                   np.asarray(logits).argmax(axis=1) == np.asarray(labels), np.asarray(domains),
                   fit, negative_entropy(np.asarray(logits, np.float64) / fit.temperature))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def measured_error(method: str) -> dict[str, Any] | None:
    """`method`'s error against the truth in MEASURED_RECORD (points, pooled over its groups and
    per group), or None where it has not been measured."""
    groups = MEASURED.get(method)
    if not groups:
        return None
    cases = sum(g.cases for g in groups.values())
    return {"record": MEASURED_RECORD, "cases": cases,
            "mean_abs_error": round(sum(g.mae * g.cases for g in groups.values()) / cases, 2),
            "largest_abs_error": max(g.largest for g in groups.values()),
            "interval_held": sum(g.held for g in groups.values()),
            "groups": {name: g._asdict() for name, g in groups.items()}}


def order_basis(methods: Sequence[str]) -> dict[str, Any]:
    """How `methods` are ordered: the groups of MEASURED that every measured one of them was
    measured on (so that none gains from easier cases; all of its groups where they share none),
    and each one's mean absolute error over them, in points."""
    measured = [m for m in methods if MEASURED.get(m)]
    common = set.intersection(*(set(MEASURED[m]) for m in measured)) if measured else set()
    errors = {}
    for method in measured:
        groups = [g for name, g in MEASURED[method].items() if name in common or not common]
        errors[method] = round(sum(g.mae * g.cases for g in groups) / sum(g.cases for g in groups), 2)
    order = sorted(measured, key=errors.__getitem__) + [m for m in methods if m not in measured]
    return {"rule": ORDER_RULE, "record": MEASURED_RECORD,
            # [] where they share no group: each is then taken over all of its own
            "compared_on": [g for g in MEASURED[measured[0]] if g in common] if measured else [],
            "mean_abs_error": {m: errors[m] for m in order if m in errors},
            "not_measured": [m for m in methods if m not in measured]}


def measured_order(methods: Sequence[str]) -> list[str]:
    """`methods` by measured mean absolute error, lowest first (order_basis); those not measured
    keep their order after the measured ones."""
    basis = order_basis(methods)
    return [*basis["mean_abs_error"], *basis["not_measured"]]


ORDER_RULE = ("listed by the mean absolute error measured on the groups of runs every listed "
              "estimator was measured on, lowest first; an estimator not yet measured comes last")


def _entry(method: str, value: float, interval: tuple[float, float], how: str, kind: str = "spread",
           **extra: Any) -> dict[str, Any]:
    return {"method": method, "estimate": round(100 * value, 2),
            "interval": [round(100 * interval[0], 2), round(100 * interval[1], 2)],
            "interval_kind": kind, "interval_meaning": INTERVAL_KINDS[kind],
            "measured": measured_error(method), "how": how, **extra}


def _confidence_estimates(calibration: Calibration, site_logits: np.ndarray, seed: int
                          ) -> list[dict[str, Any]]:
    """ATC, ATC-TS and DoC for one model on one site."""
    site_ne, site_conf = negative_entropy(site_logits), max_confidence(site_logits)
    src = (calibration.negative_entropy, calibration.correct)
    fit = calibration.temperature
    scaled = calibration.scaled_negative_entropy
    scaled = calibration.negative_entropy if scaled is None else scaled
    src_ts = (scaled, calibration.correct)
    # T is fit once, not per resample: its sampling noise is small beside the threshold's, and a
    # refit per resample would cost BOOTSTRAP fits on every artefact.
    site_ts = negative_entropy(np.asarray(site_logits, np.float64) / fit.temperature)
    return [
        _entry("ATC", atc(*src, site_ne), _bootstrap(atc, src, (site_ne,), seed),
               "share of site images whose softmax negative entropy reaches the threshold that "
               "source validation's error sets (Garg et al. 2022), on the raw logits",
               threshold=round(atc_threshold(*src), 6)),
        _entry("ATC-TS", atc(*src_ts, site_ts), _bootstrap(atc, src_ts, (site_ts,), seed),
               "ATC on the logits divided by the temperature that minimises the negative "
               "log-likelihood on source validation (as Garg et al. 2022 do)"
               + ("" if fit.fitted else f"; no temperature fit ({fit.reason}): T = 1, as ATC"),
               threshold=round(atc_threshold(*src_ts), 6), **fit.to_record()),
        _entry("DoC", doc(calibration.confidence, calibration.correct, site_conf),
               _bootstrap(doc, (calibration.confidence, calibration.correct), (site_conf,), seed),
               "source validation accuracy minus the fall in mean max-softmax confidence"),
    ]


def _agreement_estimate(site_logits: np.ndarray, teacher: Mapping[str, Any], seed: int
                        ) -> dict[str, Any]:
    """Teacher agreement: the share of site images where student and teacher agree, +- the
    teacher's source-validation error."""
    student = np.asarray(site_logits).argmax(axis=1)
    agree_each = student == np.asarray(teacher["site_predictions"])
    agree, error = float(np.mean(agree_each)), float(teacher["source_error"])
    rng = np.random.default_rng(seed)
    m = len(agree_each)
    spread = np.percentile([np.mean(agree_each[rng.integers(0, m, m)])
                            for _ in range(BOOTSTRAP)], [2.5, 97.5])
    return _entry(
        "teacher agreement", agree,
        (max(0.0, float(spread[0]) - error), min(1.0, float(spread[1]) + error)),
        "share of site images where the student and the teacher's zero-shot class agree; the "
        "accuracy lies within the teacher's error of it (the teacher's source-validation error "
        f"{100 * error:.1f} % stands in for its unknown error on the site)", kind="bound",
        teacher_source_error=round(100 * error, 2))


def estimate_accuracy(calibration: Calibration, site_logits: np.ndarray, *, seed: int = 0,
                      teacher: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every estimate for one model on one site, in points, each with its interval (and what kind
    of interval it is) and its measured error, listed best-measured first (measured_order).

    `site_logits` (M, C): the model's logits on the site's images, nothing else of them. `teacher`,
    when the run has one: {"site_predictions": (M,) the teacher's classes on the same images,
    "source_error": its error (0..1) on the source validation images}."""
    found = _confidence_estimates(calibration, site_logits, seed)
    if teacher is not None:
        found.append(_agreement_estimate(site_logits, teacher, seed))
    by = {e["method"]: e for e in found}
    return [by[m] for m in measured_order(list(by))]


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
