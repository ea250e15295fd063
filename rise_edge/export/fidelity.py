"""Fidelity: a quantized model judged against FP32 on enough source images to mean something.

Whatever made the model (a post-training quantizer, QAT) and whatever runs it, the judgement is the same:
per source domain and over all of them, top-1 agreement with FP32 (Wilson 95 % interval), accuracy of
both and the paired drop with Tango's score interval (valid at zero disagreements); over all images,
the SQNR of the logits. The target domain plays no part; rise_edge.export.judge decides on these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def logits_in_batches(runner: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 32
                      ) -> np.ndarray:
    """(N, 3, S, S) -> (N, C), `batch` images at a time (a 500-image batch can exhaust memory)."""
    return np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(100 * max(0.0, centre - half), 3), round(100 * min(1.0, centre + half), 3))


def paired_drop_bound(fp32_only: int, int8_only: int, n: int, z: float) -> tuple[float, float]:
    """Tango's score interval (Stat. Med. 1998) for the paired accuracy drop FP32 - INT8, in points:
    `fp32_only` images FP32 gets right and INT8 wrong, `int8_only` the reverse, of `n` in all; the
    drop's bounds where the score statistic equals +z and -z.

    Chosen over a Wald interval because it stays honest at zero disagreements (500 images that all
    agree bound the drop by 0.76 points at z = 1.96, not by 0.00) and over conditional exact
    intervals because it uses n, not only the disagreements; its coverage is close to nominal for
    the small disagreement counts INT8 produces."""
    if n == 0:
        return (-100.0, 100.0)
    b, c = fp32_only, int8_only

    def score(delta: float) -> float:  # decreasing in delta
        w = -b - c + (2 * n - b + c) * delta
        p21 = (math.sqrt(max(w * w + 8 * n * c * delta * (1 - delta), 0.0)) - w) / (4 * n)
        var = n * (2 * p21 + delta * (1 - delta))
        numerator = b - c - n * delta
        if var > 0:
            return numerator / math.sqrt(var)
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)

    def solve(target: float) -> float:
        low, high = -1.0, 1.0
        for _ in range(80):
            mid = (low + high) / 2
            if score(mid) > target:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    return (round(100 * solve(z), 4), round(100 * solve(-z), 4))


@dataclass(frozen=True)
class FidelitySet:
    """Labelled source-domain images per domain: (images (N, 3, S, S), labels (N,)). Never the target."""

    domains: dict[str, tuple[np.ndarray, np.ndarray]]

    def logits_of(self, runner: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        """A model's logits per domain (the FP32 reference every INT8 model is measured against)."""
        return {d: logits_in_batches(runner, x) for d, (x, _) in self.domains.items()}


@dataclass
class Fidelity:
    """How one INT8 model compares with FP32 on a FidelitySet."""

    per_domain: dict[str, dict[str, Any]]
    logit_sqnr_db: float

    @property
    def worst_drop(self) -> float:
        return max(d["drop_points"] for d in self.per_domain.values())

    @property
    def mean_agreement(self) -> float:
        return float(np.mean([d["agreement"] for d in self.per_domain.values()]))

    @property
    def pooled(self) -> dict[str, Any]:
        """The paired drop over every source domain's images together (what the budget bounds)."""
        n = sum(int(d.get("images", 0)) for d in self.per_domain.values())
        return drop_record(sum(int(d.get("fp32_right_int8_wrong", 0)) for d in self.per_domain.values()),
                           sum(int(d.get("int8_right_fp32_wrong", 0)) for d in self.per_domain.values()),
                           n)

    def to_record(self) -> dict[str, Any]:
        return {"per_domain": self.per_domain, "all_source_images": self.pooled,
                "logit_sqnr_db": round(self.logit_sqnr_db, 2),
                "worst_drop_points": round(self.worst_drop, 3)}


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def measure_fidelity(reference: dict[str, np.ndarray], runner: Callable[[np.ndarray], np.ndarray],
                     fidelity: FidelitySet) -> Fidelity:
    """Top-1 agreement with FP32 (Wilson interval), accuracy of both, the paired drop with its
    interval, per source domain; and the SQNR of the logits over every image. `reference` holds the
    FP32 logits per domain; `runner` is any model (images -> logits), whatever runs it."""
    per_domain, ref_all, got_all = {}, [], []
    for domain, (images, labels) in fidelity.domains.items():
        ref, got = reference[domain], logits_in_batches(runner, images)
        ref_right, got_right = ref.argmax(1) == labels, got.argmax(1) == labels
        agree = int((ref.argmax(1) == got.argmax(1)).sum())
        per_domain[domain] = {
            "images": len(labels), "agreement": round(100 * agree / max(len(labels), 1), 3),
            "agreement_ci95": wilson_interval(agree, len(labels)),
            "accuracy_fp32": round(100 * float(ref_right.mean()), 3),
            "accuracy_int8": round(100 * float(got_right.mean()), 3),
            **drop_record(int((ref_right & ~got_right).sum()), int((got_right & ~ref_right).sum()),
                          len(labels))}
        ref_all.append(ref)
        got_all.append(got)
    return Fidelity(per_domain, sqnr_db(np.concatenate(ref_all), np.concatenate(got_all)))


def drop_record(fp32_only: int, int8_only: int, n: int) -> dict[str, Any]:
    """The paired drop in points with its two-sided 95 % interval and one-sided 95 % upper bound
    (both Tango's), the disagreements behind them, and what one image is worth."""
    return {"drop_points": round(100 * (fp32_only - int8_only) / max(n, 1), 3),
            "drop_ci95": list(paired_drop_bound(fp32_only, int8_only, n, 1.959964)),
            "drop_upper95": paired_drop_bound(fp32_only, int8_only, n, 1.644854)[1],
            "fp32_right_int8_wrong": fp32_only, "int8_right_fp32_wrong": int8_only,
            "points_per_image": round(100 / max(n, 1), 4)}
