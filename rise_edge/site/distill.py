"""`adapt --method distill`: the student fine-tuned on a site's unlabelled images against the run's
teacher, with replay of the labelled source images, the step chosen without a site label.

    site loss    KD to the teacher's zero-shot distribution over the run's class prompts (the
                 objective's own teacher_logits and kd_loss, the recipe's tau); for RISE runs whose
                 head has a projector, also RISE's absolute and relative distances with the
                 teacher's zero-shot class standing in for the label (AD and RD need a class per
                 image; at a site the teacher's is the only one there is).
    replay       batches of the run's labelled source training views under the run's own
                 objective (the module training builds: ERM, KD or RISE terms, the recipe's
                 weights), so the sources are not forgotten.
    selection    a seeded share of the site images (chosen by a hash of each image's bytes, so the
                 same images whatever the folder's layout or order) never enters adaptation; every
                 `eval_every` steps the student's top-1 agreement with the teacher on them is
                 measured, and the best step among those whose source validation top-1 (labelled
                 source images, as training selects) is within `source_guard` points of the
                 parent's becomes the child. Step 0, the parent itself, is a candidate.

The teacher's embeddings of the site views go through the teacher-view cache
(rise_edge.train.teacher_cache): it keys images by the sha256 of their bytes, so site images are
cached like training images, once per teacher, preprocessing, view spec and view count. The
held-out images are embedded once, un-augmented, in memory (the cache holds augmented views only).
Site images are ordered by that digest, never by path, so a layout that would leak labels (class-
named folders) gives the same child as a flat folder. Resumable: the loop's state (model,
optimizer, RNG, the best step's weights) is saved every evaluation in a work folder beside the
child, keyed by everything that changes the result; a rerun of the same command continues from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from rise_edge.data.site_images import SiteImages
from rise_edge.data.transforms import Preprocessing
from rise_edge.data.views import ViewBatches, ViewImages, ViewSpec
from rise_edge.errors import UserError
from rise_edge.files import cache_key, run_lock
from rise_edge.run_dir import TrainedRun, load_tensors, save_tensors
from rise_edge.train.student import Student

MIN_SITE_IMAGES = 10  # distill holds some out to choose the step: fewer leave too little for either
STATE_FILE = "state.safetensors"
BEST_FILE = "best.safetensors"
Log = Callable[[str], None]


@dataclass(frozen=True)
class DistillSettings:
    """What `adapt --method distill` does; every field is recorded in adapt.json. The defaults were
    chosen on the demo world (docs/site.md#distil-adabn-or-t3a)."""

    steps: int = 200            # optimizer steps, each a site batch and a replayed source batch
    eval_every: int = 20        # steps between selection evaluations (step 0 is one)
    lr_scale: float = 0.25      # the recipe's optimizer at this fraction of its peak lr, cosine
    batch_size: int = 64        # site views per step, at most the recipe's batch and the site's
    replay_weight: float = 1.0  # weight of the source objective beside the site loss
    holdout: float = 0.2        # share of the site held out of adaptation to select on
    min_holdout: int = 5        # held-out images at least
    views: int = 8              # augmented views per site image (teacher-view cache entries)
    language: bool = True       # RISE's AD and RD on site images (RISE runs with a projector)
    source_guard: float = 1.0   # a selectable step loses at most this many source-val points
    batchnorm: str = "frozen"   # frozen: the parent's BatchNorm statistics kept; train: updated
    seed: int = 0               # held-out share, batch order, view order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistillPlan:
    """What was checked before anything is written: the run, its splits, the site split."""

    run: TrainedRun
    splits: Any
    settings: DistillSettings
    adapt_paths: list[str]          # ordered by image digest
    adapt_digests: list[bytes]
    held_paths: list[str]
    site_sha256: str


def check_teacher(run: TrainedRun) -> None:
    """Refuse, before anything is written, a run that has no teacher to distil from."""
    from rise_edge.train.methods import method_of

    if not method_of(run.recipe).uses_teacher:
        raise UserError(f"--method distill distils from the run's CLIP teacher, and {run.path} was "
                        f"trained with loss.method={run.recipe.method}, which has none; use "
                        "--method adabn or t3a, or adapt a run trained with kd or rise")


def held_out_share(digests: list[bytes], settings: DistillSettings) -> set[int]:
    """Indices of the images kept out of adaptation: the `holdout` share (at least `min_holdout`)
    whose seeded hash of their bytes' digest ranks lowest. Depends on each image's content only,
    never on its path or the folder's order."""
    count = max(settings.min_holdout, round(settings.holdout * len(digests)))
    rank = sorted(range(len(digests)), key=lambda i: (hashlib.sha256(
        f"holdout:{settings.seed}:".encode() + digests[i]).digest(), i))
    return set(rank[:count])


def plan_distill(run: TrainedRun, site: SiteImages, data_root: str | None,
                 settings: DistillSettings) -> DistillPlan:
    """Every check of a distillation (teacher, site size, readable source images) and the site's
    split into adapted and held-out images; raises a one-line UserError, writing nothing."""
    import os

    from rise_edge.run_dir import run_splits
    from rise_edge.train.teacher_cache import hash_images

    check_teacher(run)
    if len(site.paths) < MIN_SITE_IMAGES:
        raise UserError(f"--method distill holds {settings.holdout:.0%} of the site's images (at "
                        f"least {settings.min_holdout}) out to choose the step, and --site "
                        f"{site.folder} holds {len(site.paths)}; give at least {MIN_SITE_IMAGES} "
                        "(a few hundred to gain), or use --method t3a")
    splits = run_splits(run, data_root)
    train = splits.train_samples
    if not train or not os.path.isfile(train[0][0]):
        raise UserError(f"--method distill replays the run's labelled source images, and "
                        f"{train[0][0] if train else 'none'} cannot be read here; give the data "
                        "set's new root with --set data.root=PATH")
    digests = hash_images(site.paths)
    order = sorted(range(len(site.paths)), key=lambda i: (digests[i], site.paths[i]))
    paths, digests = [site.paths[i] for i in order], [digests[i] for i in order]
    held = held_out_share(digests, settings)
    keep = [i for i in range(len(paths)) if i not in held]
    sha = hashlib.sha256(b"".join(sorted(digests))).hexdigest()
    return DistillPlan(run, splits, settings, [paths[i] for i in keep], [digests[i] for i in keep],
                       [paths[i] for i in sorted(held)], sha)


def checkpoint_dir(child: Path) -> Path:
    """The work folder a distillation keeps its resumable state in, beside the child."""
    return child.parent / f".{child.name}.work-distill"


def _device(choice: str) -> torch.device:
    """train.device as training reads it: auto takes CUDA when present."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("the run's train.device=cuda but no CUDA device is available here; "
                        "adapt it on a machine with one")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@dataclass
class _Parts:
    """What the loop runs: the objective (teacher and text inside), the site views and their
    teacher embeddings, the source views, the held-out images and the teacher's view of them."""

    objective: nn.Module
    site_views: ViewImages
    site_embeddings: torch.Tensor      # (N, K, D) fp16, the teacher-view cache's
    source_views: ViewImages
    source_embeddings: torch.Tensor | None  # (M, K, D) when the recipe's cache serves replay
    held: torch.Tensor                 # (H, 3, S, S) eval views of the held-out images
    held_teacher: torch.Tensor         # (H, C) the teacher's zero-shot logits on them
    source_val: list[tuple[str, int]]
    record: dict[str, Any]


def _teacher_and_text(plan: DistillPlan, device: torch.device, scratch: Path) -> tuple[Any, Any]:
    """The run's teacher and class text, read from a copy of the parent's text_embeddings/ (the
    loader writes embeddings it has to compute into every folder it is given: never the parent's)."""
    from rise_edge.train.methods import teacher_and_text

    folder = scratch / "text_embeddings"
    source = plan.run.path / "text_embeddings"
    if source.is_dir():
        shutil.copytree(source, folder)
    folder.mkdir(exist_ok=True)
    return teacher_and_text(plan.run.recipe, plan.splits.classes, plan.splits.anchors(), [folder],
                            device)


def _site_embeddings(plan: DistillPlan, teacher: Any, pre: Preprocessing, spec: ViewSpec,
                     log: Log) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(params (N, K, PARAMS), embeddings (N, K, D) fp16) of the adapted images' views from the
    teacher-view cache, filled where missing and spot-checked against this teacher."""
    from rise_edge.train.teacher_cache import TeacherViewCache, default_dir, verify

    cache = TeacherViewCache.for_teacher(default_dir(plan.run.recipe.teacher.cache_dir), teacher,
                                         pre, spec, plan.settings.views)
    filled = cache.fill(teacher, plan.adapt_paths, digests=plan.adapt_digests, log=log)
    entries = cache.lookup(plan.adapt_digests)
    if entries.missing:
        raise UserError(f"teacher-view cache {cache.folder} still lacks {len(entries.missing)} site "
                        "entries after filling it (damaged while in use?); run again")
    cosine = verify(cache, teacher, plan.adapt_paths, entries, seed=plan.settings.seed)
    return entries.params, entries.embeddings, {
        "folder": str(cache.folder), "key": cache.key, "views_per_image": plan.settings.views,
        "embedded_now": filled["images"], "verified_min_cosine": round(cosine, 6)}


def _build(plan: DistillPlan, device: torch.device, scratch: Path, log: Log) -> _Parts:
    """Load the teacher, build the run's objective, and gather every input of the loop."""
    from rise_edge.site.assess import decoder, source_validation
    from rise_edge.train.methods import method_of
    from rise_edge.train.teacher_cache import training_views

    run, recipe = plan.run, plan.run.recipe
    pre = run.meta.preprocessing
    teacher, text = _teacher_and_text(plan, device, scratch)
    objective = method_of(recipe).objective(recipe.loss, teacher, text, pre)
    spec = ViewSpec.of(pre, recipe.train.augment)
    params, embeddings, cache_record = _site_embeddings(plan, teacher, pre, spec, log)
    # The site's views carry no label: -1 fills the dataset's label field and is never read.
    site_views = ViewImages([(p, -1) for p in plan.adapt_paths], pre, spec, plan.settings.seed,
                            plan.settings.views, params)
    source_views, source_embeddings, replay_views = training_views(
        recipe, plan.splits.train_samples, pre, objective, log=log)
    held = torch.from_numpy(decoder(pre)(plan.held_paths)).to(device)
    with torch.no_grad():
        held_teacher = objective.teacher_logits(held)
    val = [(p, y) for p, y, _ in source_validation(plan.splits)]
    return _Parts(objective, site_views, embeddings, source_views, source_embeddings, held,
                  held_teacher, val, {"teacher_views": cache_record, "replay_views": replay_views})


def _stream(views: ViewImages, batch: int, seed: int, start: int) -> Iterator[list[Any]]:
    """Collated batches of views forever, from step `start` on: a seeded permutation per pass, the
    view of each image chosen by (seed, image, pass), so a resumed loop sees the same batches."""
    sampler = ViewBatches(len(views), batch, seed)
    per_pass = len(views) // batch
    epoch, position = divmod(start, per_pass)
    while True:
        sampler.set_epoch(epoch, position)
        for keys in sampler:
            yield default_collate([views[k] for k in keys])
        epoch, position = epoch + 1, 0


def _language(objective: nn.Module, student: Student, settings: DistillSettings) -> float:
    """The weight of RISE's AD and RD on site images relative to KD's (the recipe's w_dist / w_kd),
    or 0 where they do not apply: another method, no projector, w_dist = 0, or switched off."""
    from rise_edge.train.objectives import RiseObjective

    cfg = objective.cfg if hasattr(objective, "cfg") else None
    if (not settings.language or not isinstance(objective, RiseObjective) or cfg.w_dist <= 0
            or student.head_spec.embed_dim is None):
        return 0.0
    return cfg.w_dist / cfg.w_kd if cfg.w_kd > 0 else cfg.w_dist


def _site_loss(objective: nn.Module, student: Student, images: torch.Tensor,
               embeddings: torch.Tensor, language: float) -> dict[str, torch.Tensor]:
    """KD to the teacher's zero-shot logits on site views (B, 3, S, S), their cached embeddings
    (B, D); with `language` > 0, RISE's AD and RD against the teacher's zero-shot class."""
    from rise_edge.train.objectives import absolute_distance, kd_loss, relative_distance

    teacher = objective.teacher_logits(images, embeddings)
    if language <= 0:
        return {"site_kd": kd_loss(student(images).float(), teacher, objective.cfg.tau)}
    z, logits = student(images, with_embedding=True)
    z, cfg, text = z.float(), objective.cfg, objective.text
    terms = {"site_kd": kd_loss(logits.float(), teacher, cfg.tau)}
    pseudo = teacher.argmax(dim=1)  # the teacher's class: the one class a site image has
    if cfg.absolute_distance:
        terms["site_ad"] = language * absolute_distance(z, text.prototypes, pseudo)
    if cfg.relative_distance:
        terms["site_rd"] = language * relative_distance(z, text.raw_prototypes, text.anchors, pseudo)
    return terms


@torch.no_grad()
def _evaluate(student: Student, parts: _Parts, device: torch.device, tau: float) -> dict[str, float]:
    """Agreement with the teacher and KD to it on the held-out site images; source validation
    top-1 (labelled source images only)."""
    from rise_edge.site.assess import decoder
    from rise_edge.train.objectives import kd_loss

    student.eval()
    logits = student(parts.held).float()
    agreement = float((logits.argmax(1) == parts.held_teacher.argmax(1)).float().mean())
    decode = decoder(parts.site_views.pre)
    correct = 0
    for start in range(0, len(parts.source_val), 256):
        chunk = parts.source_val[start:start + 256]
        images = torch.from_numpy(decode([p for p, _ in chunk])).to(device)
        labels = torch.tensor([y for _, y in chunk], device=device)
        correct += int((student(images).argmax(1) == labels).sum())
    return {"agreement": round(100 * agreement, 3),
            "teacher_kd": round(float(kd_loss(logits, parts.held_teacher, tau)), 5),
            "source_val": round(100 * correct / max(1, len(parts.source_val)), 3)}


def _key(plan: DistillPlan, device: torch.device) -> str:
    """What a saved state must match to be resumed: the parent's student, the site, the settings."""
    from rise_edge.files import file_sha256
    from rise_edge.run_dir import STUDENT_FILE

    return cache_key(parent=file_sha256(plan.run.path / STUDENT_FILE), site=plan.site_sha256,
                     settings=plan.settings.to_dict(), device=device.type)


def _resume(folder: Path, key: str, student: Student, optimizer: torch.optim.Optimizer,
            device: torch.device, log: Log) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """(step, selection state, best weights) from a killed distillation's work folder when it was
    this very distillation; else the folder is cleared and the loop starts at step 0."""
    from rise_edge.errors import DamagedFile
    from rise_edge.train.fit import load_state

    state, best = folder / STATE_FILE, folder / BEST_FILE
    if state.is_file() and best.is_file():
        try:
            _, meta = load_tensors(state)
            if meta.get("key") == key:
                scaler = torch.amp.GradScaler("cpu", enabled=False)
                meta = load_state(state, student, optimizer, scaler, device)
                weights, _ = load_tensors(best)
                log(f"distill: resuming at step {meta['step']} from {folder}")
                return int(meta["step"]), meta["selection"], weights
        except (DamagedFile, UserError, KeyError, RuntimeError):
            pass  # a state cut short by the kill, or another distillation's: start again
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return 0, {}, {}


def _save(folder: Path, key: str, student: Student, optimizer: torch.optim.Optimizer, step: int,
          selection: dict[str, Any], best: dict[str, torch.Tensor], best_changed: bool) -> None:
    """The loop's state after an evaluation (best weights first, so a state always has them)."""
    from rise_edge.train.fit import save_state

    if best_changed:
        save_tensors(folder / BEST_FILE, best, {"step": selection["step"]})
    save_state(folder / STATE_FILE, student, optimizer, torch.amp.GradScaler("cpu", enabled=False),
               {"key": key, "step": step, "selection": selection})


def _select(selection: dict[str, Any], step: int, scores: dict[str, float],
            guard: float) -> bool:
    """Record step's scores; True when it becomes the chosen step: higher agreement (ties: lower
    KD to the teacher) among steps within `guard` source-val points of the parent (step 0)."""
    history = selection.setdefault("history", [])
    parent = history[0]["source_val"] if history else scores["source_val"]
    eligible = scores["source_val"] >= parent - guard
    history.append({"step": step, **scores, "eligible": eligible})
    best = selection.get("best")
    better = best is None or (scores["agreement"], -scores["teacher_kd"]) > (
        best["agreement"], -best["teacher_kd"])
    if eligible and better:
        selection["best"] = {"step": step, **scores}
        selection["step"] = step
        return True
    return False


def _train_mode(student: Student, batchnorm: str) -> None:
    """Training mode; with batchnorm 'frozen' every BatchNorm layer stays in eval mode: it
    normalises with the parent's statistics and keeps them (its scale and shift still learn).
    Updated by site and source batches in turn, the statistics drift to a mix of both, which
    cost the demo students several points of source validation within ten steps."""
    student.train()
    if batchnorm == "frozen":
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _lr(base: float, step: int, total: int) -> float:
    """Cosine from `base` to 0 over the distillation (no warm-up: the student is trained)."""
    import math

    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _train(plan: DistillPlan, parts: _Parts, student: Student, device: torch.device,
           folder: Path, log: Log) -> dict[str, Any]:
    """The loop: site loss + replay, evaluations, selection, checkpoints. Leaves the chosen step's
    weights in `student`; returns the selection record."""
    from rise_edge.train.fit import build_optimizer

    s, recipe = plan.settings, plan.run.recipe
    optim = replace(recipe.optim, lr=recipe.optim.lr * s.lr_scale)
    optimizer = build_optimizer(optim, (p for p in student.parameters() if p.requires_grad))
    key = _key(plan, device)
    step, selection, best = _resume(folder, key, student, optimizer, device, log)
    language = _language(parts.objective, student, s)
    site_batch = min(s.batch_size, recipe.train.batch_size, len(parts.site_views))
    source_batch = min(site_batch, len(parts.source_views))
    site = _stream(parts.site_views, site_batch, s.seed, step)
    source = _stream(parts.source_views, source_batch, s.seed + 1, step)
    if step == 0:
        _select(selection, 0, _evaluate(student, parts, device, recipe.loss.tau), s.source_guard)
        best = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        _save(folder, key, student, optimizer, 0, selection, best, True)
    sums: dict[str, float] = {}
    while step < s.steps:
        _train_mode(student, s.batchnorm)
        images, _, index, k = next(site)  # the label field is the -1 placeholder: not read
        terms = _site_loss(parts.objective, student, images.to(device),
                           parts.site_embeddings[index, k].to(device), language)
        src_images, labels, src_index, src_k = next(source)
        extra = {} if parts.source_embeddings is None else {
            "teacher_embeddings": parts.source_embeddings[src_index, src_k].to(device)}
        replay = parts.objective(student, src_images.to(device), labels.to(device), **extra)
        loss = sum(terms.values()) + s.replay_weight * replay["loss"]
        if not torch.isfinite(loss.detach()):
            raise UserError(f"distill: the loss became {float(loss)} at step {step + 1}; the child "
                            "was not made; adapt with --method t3a, or retrain the parent")
        for group in optimizer.param_groups:
            group["lr"] = _lr(optim.lr, step, s.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        for name, value in {**terms, **{f"replay_{n}": v for n, v in replay.items()}}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if step % s.eval_every == 0 or step == s.steps:
            scores = _evaluate(student, parts, device, recipe.loss.tau)
            chosen = _select(selection, step, scores, s.source_guard)
            if chosen:
                best = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            _save(folder, key, student, optimizer, step, selection, best, chosen)
            log(f"distill step {step}/{s.steps}: agreement with the teacher on held-out site "
                f"images {scores['agreement']:.1f} %, source val {scores['source_val']:.1f} %"
                + (" (chosen)" if chosen else ""))
    student.load_state_dict(best)
    selection["loss_terms"] = sorted(sums)
    selection["site_batch"], selection["source_batch"] = site_batch, source_batch
    selection["lr"], selection["language_weight"] = optim.lr, language
    return selection


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on the CPU, as training runs there (then restored)."""
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


def distill(plan: DistillPlan, student: Student, child: Path, log: Log) -> dict[str, Any]:
    """Fine-tune `student` (a copy of the run's; CPU) in place as the module docstring says, on the
    run's train.device; returns what it did, for adapt.json. Its resumable state lives in
    checkpoint_dir(child) (the caller removes it once the child is in place)."""
    started = time.perf_counter()
    device = _device(plan.run.recipe.train.device)
    folder = checkpoint_dir(child)
    with run_lock(folder, "adapt --method distill", noun="distillation", clean=False), \
            tempfile.TemporaryDirectory(prefix="rise-edge-distill-") as scratch, \
            _deterministic(device):
        torch.manual_seed(plan.settings.seed)
        parts = _build(plan, device, Path(scratch), log)
        student.to(device)
        try:
            selection = _train(plan, parts, student, device, folder, log)
        finally:
            student.cpu().eval()
    s, best, parent = plan.settings, selection["best"], selection["history"][0]
    return {
        "method": "distill", "settings": s.to_dict(), "device": str(device), "precision": "fp32",
        "teacher": {"model": plan.run.recipe.teacher.model, "tau": plan.run.recipe.loss.tau,
                    "logit_scale": float(parts.objective.teacher.logit_scale)},
        "site_images": {"adapted": len(plan.adapt_paths), "held_out_for_selection":
                        len(plan.held_paths), "order": "by the sha256 of each image's bytes"},
        "site_loss": {"kd": 1.0, "language_weight": selection["language_weight"],
                      "language_class": "the teacher's zero-shot class" if
                      selection["language_weight"] else None},
        "replay": {"objective": plan.run.recipe.method, "weight": s.replay_weight,
                   "images": len(parts.source_views), "views": parts.record["replay_views"]},
        "batch": {"site": selection["site_batch"], "source": selection["source_batch"]},
        "lr": selection["lr"], "optimizer": plan.run.recipe.optim.name, "schedule": "cosine",
        "loss_terms": selection["loss_terms"], "teacher_views": parts.record["teacher_views"],
        "selection": {
            "rule": ("highest top-1 agreement with the teacher's zero-shot class on the held-out "
                     "site images (ties: lower KD to the teacher there), among the evaluated steps "
                     f"whose source validation top-1 is within {s.source_guard:g} point(s) of the "
                     "parent's; step 0 is the parent"),
            "images": len(plan.held_paths), "step": best["step"], "agreement": best["agreement"],
            "teacher_kd": best["teacher_kd"], "source_val": best["source_val"],
            "parent_agreement": parent["agreement"], "parent_source_val": parent["source_val"],
            "history": selection["history"]},
        "seconds": round(time.perf_counter() - started, 1)}


def describe(record: dict[str, Any]) -> str:
    """One line on what distill chose, for the terminal."""
    sel = record["selection"]
    return (f"distill chose step {sel['step']} of {record['settings']['steps']}: agreement with "
            f"the teacher on {sel['images']} held-out site images {sel['parent_agreement']:.1f} -> "
            f"{sel['agreement']:.1f} %, source val {sel['parent_source_val']:.1f} -> "
            f"{sel['source_val']:.1f} %")


