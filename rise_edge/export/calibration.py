"""The INT8 calibration set, and the images export checks against.

Calibration images come from the SOURCE domains' training splits only (never validation, never the
target domain), balanced across (domain, class) cells: each cell is shuffled with its own seed and the
cells are visited round-robin, so any prefix of the list is as balanced as the data allows. Images are
preprocessed exactly as at inference (`eval_transform`). The set is identified by a sha256 over its
file list AND the files' bytes, so a cache keyed on it goes stale when an image changes, not only
when a name does.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.data.domains import DomainSplits, Sample, load_rgb, seeded_shuffle
from rise_edge.data.transforms import Preprocessing, eval_transform
from rise_edge.errors import UserError
from rise_edge.files import file_sha256


@dataclass(frozen=True)
class CalibrationSet:
    """Images chosen to calibrate INT8 ranges. `files` are relative to the data set folder."""

    dataset_dir: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    sha256: str
    requested: int
    seed: int
    source: str = "source-domain training splits"  # or an adapted run's site images (no labels)
    shifted_share: float = 0.0  # share of the images given a stress shift (shifted_indices)

    @property
    def paths(self) -> list[Path]:
        return [self.dataset_dir / f for f in self.files]

    def shifted_indices(self) -> list[int]:
        """The images calibrated on under a stress shift: spread evenly over the list (image i when
        floor((i + 1) * share) > floor(i * share)), so every prefix holds its share of them and, the
        list being round-robin over (domain, class) cells, they spread over the cells."""
        share = self.shifted_share
        return [i for i in range(len(self.files)) if int((i + 1) * share) > int(i * share)]

    def load(self, preprocessing: Preprocessing) -> np.ndarray:
        """The images decoded and preprocessed as at inference, the shifted share under
        rise_edge.export.stress's shifts in turn -> (N, 3, S, S) float32."""
        from rise_edge.export.stress import load_stressed

        paths = self.paths
        images = load_images(paths, preprocessing)
        shifted = self.shifted_indices()
        if shifted:
            images[shifted] = load_stressed([paths[i] for i in shifted], preprocessing)
        return images

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per source domain and per class index (as strings, for JSON)."""
        return {"per_domain": dict(Counter(f.split("/")[0] for f in self.files)),
                "per_class": {str(k): v for k, v in sorted(Counter(self.labels).items())}}

    def to_record(self, classes: Sequence[str]) -> dict[str, Any]:
        counts = self.counts()
        labelled = all(y >= 0 for y in self.labels)
        return {"sha256": self.sha256, "size": len(self.files), "requested": self.requested,
                "seed": self.seed, "source": self.source,
                "shifted": {"share": self.shifted_share, "images": len(self.shifted_indices()),
                            "shifts": "grayscale, line drawing, posterised, blurred in turn "
                                      "(rise_edge.export.stress)"},
                **({"per_domain": counts["per_domain"],
                    "per_class": {classes[int(k)]: v for k, v in counts["per_class"].items()}}
                   if labelled else {}),
                "files": list(self.files)}


def _relative(path: str, dataset_dir: Path) -> str:
    return Path(os.path.relpath(path, dataset_dir)).as_posix()


def select_calibration_set(splits: DomainSplits, size: int, seed: int = 0,
                           shifted_share: float = 0.0) -> CalibrationSet:
    """Up to `size` source-domain training images, round-robin over (domain, class) cells, of which
    `shifted_share` are calibrated on under a stress shift (CalibrationSet.shifted_indices).

    Each cell is shuffled with a seed derived from (seed, domain, class), so adding a domain or class
    does not reshuffle the others. Capped by the images that exist. The share is part of the set's
    sha256: ranges calibrated with another share are never reused.
    """
    cells: list[list[Sample]] = []
    for domain in splits.source_domains:  # never splits.target_domain, never splits.val
        by_class: dict[int, list[Sample]] = {}
        for sample in splits.train[domain]:
            by_class.setdefault(sample[1], []).append(sample)
        for label in sorted(by_class):
            cell = sorted(by_class[label])
            seeded_shuffle(cell, seed, f"{domain}/{label}")
            cells.append(cell)
    chosen = _round_robin(cells, size)
    files = tuple(_relative(p, splits.dataset_dir) for p, _ in chosen)
    digest = hashlib.sha256()
    for rel, (path, _) in zip(files, chosen):
        digest.update(f"{rel}\t{file_sha256(path)}\n".encode())
    if shifted_share:  # absent at 0, so sets (and caches) from before the option keep their sha256
        digest.update(f"shifted share {shifted_share!r}\n".encode())
    return CalibrationSet(splits.dataset_dir, files, tuple(y for _, y in chosen), digest.hexdigest(),
                          size, seed, shifted_share=shifted_share)


def select_fidelity_samples(splits: DomainSplits, per_domain: int, seed: int = 0
                            ) -> dict[str, list[Sample]]:
    """The judge's images: up to `per_domain` of every SOURCE domain's validation images (seeded
    order). The student never trained on them, calibration never saw them (it draws from the
    training split) and QAT never selects on them (select_qat_selection_samples): an INT8 model is
    judged out of sample. Training images would flatter it: their large margins hide the flips INT8
    causes. Never the target domain."""
    chosen = {}
    for domain in splits.source_domains:
        val = sorted(splits.val[domain])
        seeded_shuffle(val, seed, domain)
        chosen[domain] = val[:per_domain]
    return chosen


def select_qat_selection_samples(splits: DomainSplits, per_domain: int, calibration_files: set[str],
                                 seed: int = 0) -> dict[str, list[Sample]]:
    """The images QAT selects its step on: up to `per_domain` training images of every source domain
    outside the calibration set (seeded order), as many as the judge has validation images. QAT
    trains on the other training images, so its selection is out of sample too, and neither touches
    the judge's images."""
    chosen = {}
    for domain in splits.source_domains:
        train = [s for s in sorted(splits.train[domain])
                 if _relative(s[0], splits.dataset_dir) not in calibration_files]
        seeded_shuffle(train, seed, f"qat/{domain}")
        size = min(per_domain, max(1, len(splits.val[domain])))
        chosen[domain] = train[:size]
    return chosen


def balanced_val_samples(splits: DomainSplits, count: int) -> list[Sample]:
    """Up to `count` source-validation images, round-robin over source domains (parity checks)."""
    return _round_robin([list(splits.val[d]) for d in splits.source_domains], count)


def _round_robin(pools: list[list[Sample]], count: int) -> list[Sample]:
    """Up to `count` samples taken one per pool in turn, so any prefix is balanced over the pools."""
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < count and any(depth < len(p) for p in pools):
        for pool in pools:
            if depth < len(pool) and len(chosen) < count:
                chosen.append(pool[depth])
        depth += 1
    return chosen


def load_images(paths: Sequence[str | Path], preprocessing: Preprocessing, workers: int = 0
                ) -> np.ndarray:
    """Decode and preprocess images exactly as at inference -> (N, 3, S, S) float32."""
    transform = eval_transform(preprocessing)

    def one(path: str | Path) -> np.ndarray:
        return transform(load_rgb(path)).numpy()

    size = preprocessing.input_size
    if not paths:
        return np.zeros((0, 3, size, size), np.float32)
    workers = workers or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        return np.stack(list(pool.map(one, paths))).astype(np.float32, copy=False)


def site_calibration_set(record: dict[str, Any], size: int, seed: int) -> CalibrationSet:
    """The child's INT8 calibration set drawn from its site images (adapt --int8-calibration site):
    up to `size` of them in a seeded order; no labels."""
    from rise_edge.data.site_images import find_site_images

    site = record["site"]
    folder = Path(site["folder"])
    try:
        found = find_site_images(folder, progress=False)
    except UserError as exc:
        raise UserError(f"this run was adapted to the site images under {folder}, and INT8 is "
                        f"calibrated on them: {exc}") from None
    if found.sha256 != site["sha256"]:
        raise UserError(f"the site images under {folder} changed since adapt (sha256 "
                        f"{found.sha256[:12]} against {site['sha256'][:12]}); adapt again, or "
                        "export with the sources' calibration")
    files = sorted(os.path.relpath(p, folder) for p in found.paths)
    seeded_shuffle(files, seed, "site")
    files = files[:size]
    digest = hashlib.sha256()
    for rel in files:
        digest.update(f"{rel}\t{file_sha256(folder / rel)}\n".encode())
    return CalibrationSet(folder, tuple(files), tuple(-1 for _ in files), digest.hexdigest(), size,
                          seed, source="site images (unlabelled)")
