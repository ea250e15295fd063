"""Build or inspect the teacher-view caches a set of recipes needs (a sweep's runs, or one recipe).

A sweep fills each cache once, before its runs, with the training images of every run that reads
it (every target's source images: each image is a source image in all targets but its own), in
large batches on the sweep's device (fp16 on CUDA); its runs then only read. `rise-edge
teacher-cache build|info RECIPE|SWEEP` does the same from the command line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from rise_edge.config import Recipe, recipe_to_dict
from rise_edge.data.domains import build_splits
from rise_edge.data.views import ViewSpec
from rise_edge.files import cache_key
from rise_edge.train.methods import method_of, resolved
from rise_edge.train.teacher_cache import (Log, TeacherViewCache, _stderr, default_dir, hash_images,
                                           size_text)


def reads_cache(recipe: Recipe) -> bool:
    """True when the recipe's runs read the teacher-view cache: teacher.cache on or auto, K > 0,
    and a method that distils from the teacher's image side (w_kd > 0)."""
    recipe = resolved(recipe)[0]
    return (recipe.teacher.cache != "off" and recipe.teacher.cache_views > 0
            and method_of(recipe).uses_teacher and recipe.loss.w_kd > 0)


def _group(recipe: Recipe) -> str:
    """What decides a recipe's cache besides its images: the teacher, student, views, device."""
    plain = recipe_to_dict(recipe)
    return cache_key(teacher={k: v for k, v in plain["teacher"].items()
                              if k not in ("templates", "anchors", "logit_scale", "prompt_names")},
                     student=plain["student"], augment=recipe.train.augment, device=recipe.train.device)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def caches_for(recipes: Sequence[Recipe], *, fill: bool, log: Log = _stderr) -> list[dict[str, Any]]:
    """For each distinct teacher-view cache the recipes read: its state (info), and with `fill` the
    missing entries of all their training images embedded. Returns one record per cache."""
    from rise_edge.train.student import create_backbone
    from rise_edge.train.teacher import load_teacher

    groups: dict[str, list[Recipe]] = {}
    for recipe in recipes:
        if reads_cache(recipe):
            groups.setdefault(_group(recipe), []).append(recipe)
    records = []
    train_paths: dict[Any, list[str]] = {}  # per data section: seeds and grid points share splits
    for members in groups.values():
        first = members[0]
        device = _device(first.train.device)
        teacher = load_teacher(first.teacher, device)
        pre = create_backbone(first.student)[1]
        cache = TeacherViewCache.for_teacher(default_dir(first.teacher.cache_dir), teacher, pre,
                                             ViewSpec.of(pre, first.train.augment),
                                             first.teacher.cache_views)
        for r in members:
            if r.data not in train_paths:
                train_paths[r.data] = [p for p, _ in build_splits(r.data, progress=False).train_samples]
        paths = sorted({p for r in members for p in train_paths[r.data]})
        started = time.perf_counter()
        digests = hash_images(paths)
        hashing = time.perf_counter() - started
        missing = len(set(digests[i] for i in cache.lookup(digests).missing))
        record = {**cache.info(), "runs": len(members), "training_images": len(paths),
                  "unique_images": len(set(digests)), "missing_images": missing,
                  "hash_seconds": round(hashing, 2), "device": str(device)}
        if fill and missing:
            batch = 512 if device.type == "cuda" else 64
            record["filled"] = cache.fill(teacher, paths, digests=digests, batch=batch,
                                          workers=first.data.num_workers, log=log)
            record.update({k: v for k, v in cache.info().items() if k in ("images", "bytes", "shards", "dim")},
                          missing_images=0)
        records.append(record)
        del teacher
    return records


def describe(record: dict[str, Any]) -> str:
    """One cache's record in a few lines (rise-edge teacher-cache info/build)."""
    lines = [f"teacher-view cache {record['folder']}",
             f"  key {record['key']}: teacher {record['fields']['teacher']}, K = {record['K']} views, "
             f"student input {record['fields']['student_preprocessing']['input_size']} px",
             f"  {record['images']} image(s) cached in {record['shards']} shard(s), "
             f"{size_text(record['bytes'])}; {record['runs']} run(s) read it, "
             f"{record['unique_images']} distinct training image(s), {record['missing_images']} missing"]
    filled = record.get("filled")
    if filled:
        rate = filled["views"] / max(filled["seconds"], 1e-9)
        lines.append(f"  filled now: {filled['images']} image(s) x {record['K']} views in "
                     f"{filled['seconds']:.1f} s ({rate:.0f} views/s on {record['device']}), "
                     f"{size_text(filled['bytes'])}")
    return "\n".join(lines)
