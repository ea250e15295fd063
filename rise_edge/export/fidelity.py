"""Fidelity: a quantized model judged against FP32 on enough source images to mean something.

Whatever made the model (a post-training quantizer, QAT) and whatever runs it, the judgement is the same:
per source domain, top-1 agreement with FP32 (Wilson 95 % interval), accuracy of both and the paired
drop with its interval; over all images, the SQNR of the logits. The target domain plays no part.
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


def paired_drop(fp32_right: np.ndarray, int8_right: np.ndarray, z: float = 1.96
                ) -> tuple[float, float]:
    """Accuracy drop FP32 - INT8 in points on the same images, and the half-width of its 95 %
    interval (paired: only the images on which the two disagree carry information)."""
    n = len(fp32_right)
    if n == 0:
        return 0.0, 0.0
    d = fp32_right.astype(np.float64) - int8_right.astype(np.float64)
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return 100 * mean, 100 * half


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

    def to_record(self) -> dict[str, Any]:
        return {"per_domain": self.per_domain, "logit_sqnr_db": round(self.logit_sqnr_db, 2),
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
        drop, half = paired_drop(ref_right, got_right)
        per_domain[domain] = {
            "images": len(labels), "agreement": round(100 * agree / max(len(labels), 1), 3),
            "agreement_ci95": wilson_interval(agree, len(labels)),
            "accuracy_fp32": round(100 * float(ref_right.mean()), 3),
            "accuracy_int8": round(100 * float(got_right.mean()), 3),
            "drop_points": round(drop, 3), "drop_ci95_half_width": round(half, 3)}
        ref_all.append(ref)
        got_all.append(got)
    return Fidelity(per_domain, sqnr_db(np.concatenate(ref_all), np.concatenate(got_all)))
