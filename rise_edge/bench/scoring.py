"""Accuracy: decoding and preprocessing exactly as at inference (timed apart from inference), an
engine's predictions per domain, and top-1, confusion matrix and agreement with the reference."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rise_edge.backends.base import Runner
from rise_edge.bench.plan import REFERENCE, DomainSet
from rise_edge.data.domains import Sample, load_rgb
from rise_edge.data.transforms import eval_transform, preprocess_images
from rise_edge.errors import UserError


class Decoder:
    """Decode + preprocess exactly as at inference, in this thread, timing it per domain."""

    def __init__(self, preprocessing: Any):
        self.transform = eval_transform(preprocessing)
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}

    def __call__(self, samples: Sequence[Sample], domain: str | None = None) -> np.ndarray:
        # preprocess_images is predict's path too (rise_edge.predict): one code for both.
        begin = time.perf_counter()
        try:
            batch = preprocess_images(self.transform, (load_rgb(path) for path, _ in samples))
        except OSError as exc:
            raise UserError(f"cannot read an image of domain '{domain}': {exc}; fix or remove it "
                            "(or set data.skip_bad_images=true and re-train)") from None
        if domain is not None:
            self.seconds[domain] = self.seconds.get(domain, 0.0) + time.perf_counter() - begin
            self.images[domain] = self.images.get(domain, 0) + len(samples)
        return batch

    def figure(self) -> dict[str, Any]:
        seconds, images = sum(self.seconds.values()), sum(self.images.values())
        per_domain = {d: {"images": self.images[d], "seconds": self.seconds[d],
                          "images_per_s": self.images[d] / self.seconds[d] if self.seconds[d] else None}
                      for d in self.seconds}
        return {"what": "decode (PIL) + resize + to tensor + normalise, one thread, timed during the "
                        "reference engine's accuracy pass",
                "images": images, "seconds": seconds,
                "images_per_s": images / seconds if seconds else None,
                "ms_per_image": 1e3 * seconds / images if images else None, "per_domain": per_domain}


def predict_domains(runner: Runner, domains: Sequence[DomainSet], decode: Decoder, batch: int,
            bar: Any) -> dict[str, np.ndarray]:
    """Predicted class per image, per domain (runs every image once)."""
    predictions = {}
    for domain in domains:
        found = []
        for start in range(0, len(domain.samples), batch):
            chunk = domain.samples[start:start + batch]
            logits = runner(decode(chunk, domain.name))
            found.append(np.asarray(logits).argmax(axis=1))
            bar.update(len(chunk))
        predictions[domain.name] = np.concatenate(found) if found else np.zeros(0, np.int64)
    return predictions


def score(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
          reference: np.ndarray | None) -> dict[str, Any]:
    """Top-1 (percent), confusion matrix (rows: true class, columns: predicted) and agreement."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    correct = int((predictions == labels).sum())
    images = int(labels.size)
    agreement = None if reference is None else float((predictions == reference).mean()) if images else None
    return {"top1": 100.0 * correct / images if images else None, "correct": correct, "images": images,
            "agreement_with_reference": agreement, "confusion_matrix": confusion.tolist()}


def finish_accuracy(rows: list[dict[str, Any]], predictions: dict[str, dict[str, np.ndarray]],
                     domains: Sequence[DomainSet], num_classes: int) -> None:
    reference = predictions.get(REFERENCE)
    for row in rows:
        found = predictions.get(row["engine"])
        if found is None or row["status"] == "run-failed":
            continue
        for domain in domains:
            labels = np.array([y for _, y in domain.samples], dtype=np.int64)
            ref = reference.get(domain.name) if reference else None
            entry = score(found[domain.name], labels, num_classes, ref)
            ref_top1 = 100.0 * float((ref == labels).mean()) if ref is not None and labels.size else None
            entry["drop_points"] = (ref_top1 - entry["top1"]) if ref_top1 is not None else None
            row["accuracy"][domain.name] = entry


def int8_judge(record: dict[str, Any]) -> dict[str, Any]:
    """The judge's verdict export recorded for an INT8 artefact (rise_edge.export.judge: budget,
    bound, rule), or a plain statement that it has none."""
    judged = record.get("accuracy_budget", {}).get("judge") or record.get("judge")
    stress = record.get("accuracy_budget", {}).get("stress") or record.get("stress")
    if judged:
        return {"judged": True, **judged, **({"stress": {k: v for k, v in stress.items()
                                                         if k != "fidelity"}} if stress else {})}
    why = record.get("accuracy_budget", {}).get("not_judged") or (
        "export.json holds no judgement of it (exported before rise-edge judged Q/DQ graphs: "
        "re-export to have it judged)")
    return {"judged": False, "reason": f"{why}: its accuracy per domain is in this report"}


def untimed(decode: Decoder) -> Callable[[Sequence[Sample], str | None], np.ndarray]:
    """The same decoding without adding to the decode figure (measured once, on the reference)."""
    return lambda samples, domain=None: decode(samples, None)
