"""Domain-folder data sets, the known-data-set registry, and leave-one-domain-out splits.

Layout (DomainBed): `<root>/<dataset folder>/<domain>/<class>/<image>`. The target domain is never
trained on; all its images form the test set. Validation comes from official split lists where given
(PACS) or from a seeded holdout of each source domain.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from rise_edge.config import DataConfig
from rise_edge.data.image_checks import ScannedFile, check_image_files, scan_images
from rise_edge.errors import UserError
from rise_edge.files import read_text_lines
# The data-set registry lives in a module without torch (the command line reads it at start-up);
# its names are part of this module's interface too.
from rise_edge.registry import (KNOWN_DATASETS, KnownDataset, known_dataset,  # noqa: F401
                                register_dataset)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


Sample = tuple[str, int]  # (image path, class index)
ORACLE_FRACTION = 0.2     # DomainBed's holdout_fraction for the test-domain validation split


@dataclass(frozen=True)
class DomainSplits:
    """Leave-one-domain-out splits: per-source-domain train/val lists and the whole target domain."""

    dataset_dir: Path
    classes: tuple[str, ...]
    source_domains: tuple[str, ...]
    target_domain: str
    train: dict[str, list[Sample]]
    val: dict[str, list[Sample]]
    test: list[Sample]
    skipped_images: tuple[str, ...] = ()
    # How the images were checked (image_checks.ImageCheck.stats): not part of the splits.
    image_check: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def train_samples(self) -> list[Sample]:
        return [s for d in self.source_domains for s in self.train[d]]

    def oracle_split(self) -> tuple[list[Sample], list[Sample]]:
        """The target domain as DomainBed's test-domain validation ("oracle") splits it: (in, out),
        out a seeded ORACLE_FRACTION of it. Only `rise-edge sweep collect`'s oracle row selects
        on out (and reports in); training never chooses anything on either."""
        return _holdout(self.test, ORACLE_FRACTION, 0, f"oracle:{self.target_domain}")

    def anchors(self) -> tuple[str, ...]:
        """Default RD anchors: the registry's, else the source domain names (never the target)."""
        known = known_dataset(self.dataset_dir.name)
        if known is not None and known.anchors:
            return known.anchors
        return self.source_domains  # as words in prompts unless teacher.prompt_names: verbatim


SPLITS_FILE = "splits.json"  # in the run directory: the exact lists training used


def splits_to_record(splits: DomainSplits) -> dict[str, Any]:
    """The splits as JSON: paths relative to the data set folder, so the record survives a move."""
    prefix = str(splits.dataset_dir).rstrip(os.sep) + os.sep

    def relative(path: str) -> str:
        # Sample paths are the scan's, under the folder: cutting the prefix is relpath's answer,
        # at a fraction of its cost (a DomainNet record has 586,000 of them).
        inside = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(
            path, splits.dataset_dir)
        return inside.replace(os.sep, "/")

    def rel(samples: Sequence[Sample]) -> list[list[Any]]:
        return [[relative(p), y] for p, y in samples]
    return {"schema": 1, "dataset_dir": str(splits.dataset_dir), "classes": list(splits.classes),
            "source_domains": list(splits.source_domains), "target_domain": splits.target_domain,
            "train": {d: rel(v) for d, v in splits.train.items()},
            "val": {d: rel(v) for d, v in splits.val.items()}, "test": rel(splits.test),
            "skipped_images": [relative(p) for p in splits.skipped_images]}


def splits_from_record(record: dict[str, Any], data_root: str | None = None) -> DomainSplits:
    """Rebuild the splits training used from its record; `data_root` (when the data moved) replaces
    the recorded folder's root, the data set's folder name staying the same."""
    recorded = Path(record["dataset_dir"])
    folder = recorded if not data_root else Path(data_root).expanduser().resolve() / recorded.name
    if not folder.is_dir():
        raise UserError(f"the data set this run was trained on is not at {folder} any more; if it "
                        f"moved, give its new root with --set data.root=PATH (the folder holding "
                        f"{recorded.name}/)")

    classes = tuple(record["classes"])

    def absolute(samples: list[list[Any]]) -> list[Sample]:
        out = []
        for p, y in samples:
            if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(classes):
                raise ValueError(f"label {y!r} of {p!r} is not a class index 0..{len(classes) - 1}")
            out.append((str(folder / p), y))
        return out
    return DomainSplits(folder, classes, tuple(record["source_domains"]),
                        record["target_domain"], {d: absolute(v) for d, v in record["train"].items()},
                        {d: absolute(v) for d, v in record["val"].items()}, absolute(record["test"]),
                        tuple(str(folder / p) for p in record.get("skipped_images", [])))


DATA_ENV = "RISE_EDGE_DATA"  # the data root users set once, for recipes whose data.root is ""


def data_root(cfg: DataConfig) -> Path | None:
    """data.root, else $RISE_EDGE_DATA, as a path; None when neither is set."""
    text = cfg.root or os.environ.get(DATA_ENV, "")
    return Path(text).expanduser() if text else None


def split_lists_dir(cfg: DataConfig) -> Path | None:
    """data.split_lists as a folder: a relative path is taken from the data root (PACS-splits
    beside PACS/), else from the current directory; None when no lists are used."""
    if not cfg.split_lists:
        return None
    lists = Path(cfg.split_lists).expanduser()
    root = data_root(cfg)
    # From the data root, unless only the current directory has it: a folder found nowhere is
    # named where download puts it (<root>/PACS-splits), which is where a message should look.
    if not lists.is_absolute() and root is not None and (
            (root / lists).is_dir() or not lists.is_dir()):
        return root / lists
    return lists


def dataset_dir(cfg: DataConfig) -> Path:
    """The folder holding the domains, generating it first for data sets that are built (the demo)."""
    known = known_dataset(cfg.dataset)
    if known is not None and known.build is not None:
        return known.build(Path(cfg.root).expanduser() if cfg.root else None)
    root = data_root(cfg)
    if root is None:
        raise UserError(f"data.root is empty and {DATA_ENV} is not set: set either to the folder "
                        f"that holds '{cfg.dataset}/' (the DomainBed layout "
                        "<root>/<dataset>/<domain>/<class>/<image>), e.g. --set data.root=PATH")
    if not root.is_dir():
        raise UserError(f"data root '{root}' is not a folder (from "
                        f"{'data.root' if cfg.root else DATA_ENV})")
    folder = known.folder if known is not None else cfg.dataset
    path = root / folder
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserError(f"data set folder '{path}' not found for data.dataset={cfg.dataset}; "
                        f"folders under {root}: {', '.join(present) or '(none)'}")
    return path


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[ScannedFile]:
    return scan_images(folder, IMAGE_SUFFIXES)


def build_splits(cfg: DataConfig, *, check_images: bool = True, progress: bool = True) -> DomainSplits:
    """Scan the data set, check it, and split it leave-one-domain-out."""
    path = dataset_dir(cfg)
    known = known_dataset(cfg.dataset) or known_dataset(path.name)
    present = _subfolders(path)
    if not cfg.target_domain:
        raise UserError(f"data.target_domain is empty; domains of {path.name}: {', '.join(present)}")
    wanted_sources = cfg.source_domains or tuple(d for d in present if d != cfg.target_domain)
    for domain in (cfg.target_domain, *wanted_sources):
        if domain not in present:
            raise UserError(f"domain '{domain}' not found in {path}; domains present: "
                            f"{', '.join(present) or '(none)'}")
    if cfg.target_domain in wanted_sources:
        raise UserError(f"data.target_domain '{cfg.target_domain}' is also listed in "
                        "data.source_domains: the unseen domain can never be trained on")
    if not wanted_sources:
        raise UserError(f"no source domains left to train on besides '{cfg.target_domain}'")
    domains = (*wanted_sources, cfg.target_domain)
    classes = _check_classes(path, domains, known)
    scanned = {d: {c: _image_files(path / d / c) for c in classes} for d in domains}
    empty = [f"{d}/{c}" for d in domains for c in classes if not scanned[d][c]]
    if empty:
        raise UserError(f"no images in {len(empty)} class folder(s) of {path}: {', '.join(empty[:10])}")
    files = {d: {c: [p for p, _ in scanned[d][c]] for c in classes} for d in domains}
    skipped: tuple[str, ...] = ()
    checked: dict[str, Any] = {}
    if check_images:
        outcome = check_image_files(path, [f for d in domains for c in classes for f in scanned[d][c]],
                                    [f"{d}/{c}/" for d in domains for c in classes],
                                    recheck=cfg.recheck_images, progress=progress)
        bad, checked = outcome.bad, outcome.stats()
        if bad and not cfg.skip_bad_images:
            listing = "\n  ".join(f"{p}: {why}" for p, why in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise UserError(f"{len(bad)} unreadable image(s) in {path}:\n  {listing}{more}\n"
                            "fix or remove them, or set data.skip_bad_images=true to skip them")
        bad_paths = {p for p, _ in bad}
        files = {d: {c: [p for p in ps if p not in bad_paths] for c, ps in cs.items()}
                 for d, cs in files.items()}
        skipped = tuple(sorted(bad_paths))
    label = {c: i for i, c in enumerate(classes)}
    by_domain = {d: [(p, label[c]) for c in classes for p in files[d][c]] for d in domains}
    lists = split_lists_dir(cfg)
    if lists is not None:
        train, val = _official_splits(lists, path, wanted_sources, classes, set(skipped))
    else:
        train, val = {}, {}
        for d in wanted_sources:
            train[d], val[d] = _holdout(by_domain[d], cfg.val_fraction, cfg.split_seed, d)
    return DomainSplits(path, classes, tuple(wanted_sources), cfg.target_domain, train, val,
                        by_domain[cfg.target_domain], skipped, checked)


def _check_classes(path: Path, domains: Sequence[str], known: KnownDataset | None) -> tuple[str, ...]:
    per_domain = {d: set(_subfolders(path / d)) for d in domains}
    if known is not None and known.classes is not None:
        expected = set(known.classes)
        for d, found in per_domain.items():
            missing = sorted(expected - found)
            if missing:
                raise UserError(f"class folder(s) {', '.join(missing)} missing in {path / d}; "
                                f"present: {', '.join(sorted(found)) or '(none)'}")
        return tuple(sorted(expected))
    union = set().union(*per_domain.values())
    differ = {d: sorted(union - found) for d, found in per_domain.items() if union - found}
    if differ:
        lines = "; ".join(f"{d} lacks {', '.join(m)}" for d, m in differ.items())
        raise UserError(f"class sets differ between domains of {path}: {lines}")
    if not union:
        raise UserError(f"no class folders in the domains of {path}")
    return tuple(sorted(union))


def seeded_shuffle(items: list[Any], seed: int, key: str) -> None:
    """Shuffle `items` in place by (seed, key): the key (a domain, a domain/class cell) enters the
    seed, so each list shuffles on its own and adding another leaves the rest as they were."""
    random.Random(seed * 1_000_003 + zlib.crc32(key.encode())).shuffle(items)


def _holdout(samples: list[Sample], fraction: float, seed: int, domain: str
             ) -> tuple[list[Sample], list[Sample]]:
    """Seeded per-domain holdout; the domain name enters the seed so domains split independently."""
    order = list(range(len(samples)))
    seeded_shuffle(order, seed, domain)
    n_val = max(1, round(fraction * len(samples)))
    val_idx = set(order[:n_val])
    return ([s for i, s in enumerate(samples) if i not in val_idx],
            [s for i, s in enumerate(samples) if i in val_idx])


def _missing_split_lists(lists_dir: Path, dataset_path: Path) -> str:
    """The one line for a recipe that trains on official split lists that are not there: where
    they were looked for, and the command that fetches them (`data download` places them later,
    keeping the data set) or the seeded holdout that does without them."""
    name = next((n for n, known in KNOWN_DATASETS.items() if known.official_lists
                 and known.folder == dataset_path.name), None)
    fetch = (f"fetch them with `rise-edge data download {name} --root {dataset_path.parent}`"
             if name else "put the data set's official lists there")
    return (f"data.split_lists: this recipe trains and selects on the official split lists, and "
            f"{lists_dir} is not a folder holding them; {fetch}, or train on a seeded holdout of "
            "each source domain with --set data.split_lists=\"\"")


def _official_splits(lists_dir: Path, dataset_path: Path, sources: Sequence[str],
                     classes: Sequence[str], skipped: set[str]
                     ) -> tuple[dict[str, list[Sample]], dict[str, list[Sample]]]:
    """Read `<domain>_train_kfold.txt` / `<domain>_crossval_kfold.txt` (paths relative to the root,
    or to the data set's folder)."""
    if not lists_dir.is_dir():
        raise UserError(_missing_split_lists(lists_dir, dataset_path))
    label = {c: i for i, c in enumerate(classes)}
    root = dataset_path.parent
    splits: dict[str, dict[str, list[Sample]]] = {"train": {}, "crossval": {}}
    for split, per_domain in splits.items():
        for domain in sources:
            list_file = lists_dir / f"{domain}_{split}_kfold.txt"
            if not list_file.is_file():
                present = ", ".join(sorted(p.name for p in lists_dir.glob("*.txt"))) or "(none)"
                raise UserError(f"split list {list_file} not found; lists present: {present}")
            samples = []
            fix = ("put the data set's official list there again (`rise-edge data download` fetches "
                   "PACS's), or use a seeded holdout with --set data.split_lists=\"\"")
            for n, line in enumerate(read_text_lines(list_file, fix), 1):
                if not line.strip():
                    continue
                rel = line.split()[0]
                # Relative to the data root (PACS/photo/..., as the RISE code's lists) or to the
                # data set's folder (photo/..., as the RSC code's lists that download fetches).
                image = root / rel if rel.split("/")[0] == dataset_path.name else dataset_path / rel
                class_name = image.parent.name
                if class_name not in label or image.parent.parent.name != domain:
                    raise UserError(f"{list_file}:{n}: '{rel}' is not an image of a known class "
                                    f"in domain '{domain}'")
                if str(image) in skipped:
                    continue
                if not image.is_file():
                    raise UserError(f"{list_file}:{n}: image {image} not found")
                samples.append((str(image), label[class_name]))
            per_domain[domain] = samples
    return splits["train"], splits["crossval"]


# ---------------------------------------------------------------------------------------------------
# Loading images


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image as RGB: grayscale and palette convert, transparency composites on white."""
    with Image.open(path) as image:
        if image.mode == "RGB":
            return image.copy()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


class DomainImages(Dataset):
    """Images decoded lazily (in DataLoader workers), never all held in memory.

    An index may come with a per-sample seed, `(index, seed)`: augmentation then depends only on the
    sample and the epoch, not on which worker or process draws it, so resumed and multi-process runs
    see the same augmented images as an uninterrupted single-process run.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_rgb(path)
        if seed is None:
            return self.transform(image), label
        # Seed only the CPU generator the transforms draw from, and put its state back: torch.manual_seed
        # would also reseed (and, on CUDA builds, queue work for) every accelerator's generator.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            generator.set_state(state)


class EpochBatches:
    """Batch sampler: a seeded permutation per epoch, global batches, this rank's share of each.

    Every rank sees the same global batches; rank r takes positions r, r + world, ... of each, so N
    processes together see exactly the batches one process would. Last partial batch dropped.
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int, *, rank: int = 0,
                 world_size: int = 1):
        if global_batch % world_size:
            raise UserError(f"train.batch_size {global_batch} does not split evenly over "
                            f"{world_size} processes")
        if n_samples < global_batch:
            raise UserError(f"train.batch_size {global_batch} is larger than the {n_samples} "
                            "training images; lower it")
        self.n_samples, self.global_batch, self.seed = n_samples, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.n_samples // self.global_batch - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_samples, generator=generator).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for b in range(self.start_batch, self.n_samples // self.global_batch):
            positions = range(b * self.global_batch + self.rank, (b + 1) * self.global_batch,
                              self.world_size)
            yield [(order[p], (base + p) % 2**63) for p in positions]
