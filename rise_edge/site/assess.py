"""A model met at a site: its logits on the site's images and on the sources' validation images,
and what the estimators (rise_edge.site.estimates) make of them.

The source validation images calibrate every estimator (their labels are the only labels used);
the site's images enter only as pixels. The teacher, when the run distils from one, gives its
zero-shot classes on the same site images and its error on source validation, for the agreement
bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rise_edge.data.domains import DomainSplits
from rise_edge.site.estimates import (Calibration, describe_predictions, estimate_accuracy,
                                     order_basis, shift_check)

Decode = Callable[[Sequence[str]], np.ndarray]  # image paths -> (N, 3, S, S) float32, as at inference
Model = Callable[[np.ndarray], Any]             # (N, 3, S, S) -> (N, C) logits


def decoder(preprocessing: Any) -> Decode:
    """Image paths -> (N, 3, S, S) float32, decoded and preprocessed exactly as at inference
    (export's loader: the calibration images are read the same way)."""
    from rise_edge.export.calibration import load_images

    return lambda paths: load_images(list(paths), preprocessing)


def source_validation(splits: DomainSplits) -> list[tuple[str, int, str]]:
    """Every source domain's validation images as (path, label, domain): the calibration set."""
    return [(p, y, d) for d in splits.source_domains for p, y in splits.val[d]]


def logits_on(model: Model, paths: Sequence[str], decode: Decode, batch: int = 64,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, C) float32 logits of `model` on the images at `paths`, decoded `batch` at a time."""
    found = []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        found.append(np.asarray(model(decode(chunk)), dtype=np.float32))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(found) if found else np.zeros((0, 0), np.float32)


@dataclass
class SiteInputs:
    """The logits every assessment needs from one model."""

    source: list[tuple[str, int, str]]  # calibration images: (path, label, domain)
    site_paths: tuple[str, ...]

    def logits(self, model: Model, decode: Decode, batch: int = 64,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source logits (N, C), site logits (M, C))."""
        return (logits_on(model, [p for p, _, _ in self.source], decode, batch, progress),
                logits_on(model, self.site_paths, decode, batch, progress))


def assess(inputs: SiteInputs, source_logits: np.ndarray, site_logits: np.ndarray,
           classes: Sequence[str], teacher: dict[str, Any] | None = None, seed: int = 0
           ) -> dict[str, Any]:
    """One model's site record: predictions, confidence, estimates (best-measured first, each with
    its interval, what kind of interval that is, and its measured error), shift flag; or, when the
    model's logits are not finite (NaN, inf), only an error saying so."""
    bad = int((~np.isfinite(site_logits)).any(axis=1).sum() + (~np.isfinite(source_logits)).any(
        axis=1).sum())
    if bad:
        return {"error": f"non-finite logits (NaN or inf) on {bad} image(s): no estimate can be "
                         "made from them; re-export the artefact or check its inputs"}
    calibration = Calibration.from_logits(source_logits, np.array([y for _, y, _ in inputs.source]),
                                          [d for _, _, d in inputs.source])
    found = estimate_accuracy(calibration, site_logits, seed=seed, teacher=teacher)
    return {**describe_predictions(site_logits, classes),
            "source_validation_accuracy": round(100 * calibration.accuracy, 2),
            "estimates": found, "estimates_order": order_basis([e["method"] for e in found]),
            "shift": shift_check(calibration, site_logits)}


def teacher_view(recipe: Any, splits: DomainSplits, inputs: SiteInputs, decode: Decode,
                 preprocessing: Any, folders: Sequence[Any], batch: int = 64,
                 log: Callable[[str], None] = lambda _: None) -> dict[str, Any] | None:
    """The teacher's zero-shot classes on the site and its source-validation error, or None when
    the run's method does not use a teacher or the teacher cannot be loaded here (said in `log`)."""
    from rise_edge.errors import DamagedFile, UserError
    from rise_edge.train.methods import method_of, teacher_and_text

    if not method_of(recipe).uses_teacher:
        return None
    try:
        teacher, text = teacher_and_text(recipe, splits.classes, splits.anchors(), list(folders),
                                         torch.device("cpu"))
    except DamagedFile:
        raise  # a damaged weights or embeddings file is the user's to fix, never left out quietly
    except UserError as exc:
        log(f"teacher agreement left out: the teacher could not be loaded ({exc})")
        return None

    def model(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return teacher.zero_shot_logits(torch.from_numpy(images), preprocessing,
                                            text.prototypes).numpy()

    source_logits, site_logits = inputs.logits(model, decode, batch)
    labels = np.array([y for _, y, _ in inputs.source])
    return {"site_predictions": site_logits.argmax(axis=1),
            "source_error": float(np.mean(source_logits.argmax(axis=1) != labels)),
            "model": recipe.teacher.model}
