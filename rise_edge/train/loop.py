"""The training loop: source-domain batches, per-domain evaluation, model selection, checkpoints, resume.

The method lives in methods.py and objectives.py; this loop is the same for every method, and the
steps it shares with QAT (lr, optimizer step, evaluation, selection, resume state) are in fit.py.
Model selection uses the mean source-domain validation accuracy only; the target domain is
evaluated and logged, never used.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rise_edge.logs import logger
from rise_edge.logs import progress as progress_bar
from rise_edge.config import Recipe, dump_recipe, recipe_from_dict, recipe_to_dict
from rise_edge.data.domains import (SPLITS_FILE, DomainImages, DomainSplits, build_splits,
                                    data_root, split_lists_dir, splits_to_record)
from rise_edge.data.loading import TimedBatches, loader_workers, made_batch
from rise_edge.data.transforms import Preprocessing, eval_transform
from rise_edge.data.views import ViewBatches
from rise_edge.errors import UserError
from rise_edge.files import (RUN_MARKER, cache_root, is_run_directory, run_lock,
                             write_json_atomic, write_text_atomic)
from rise_edge.run_dir import RESUME_FILE, STUDENT_FILE, MetricsLog, StudentMeta, save_student
from rise_edge.track import Trackers, finish_training, require_trackers, start_training
from rise_edge.train.distributed import Distributed
from rise_edge.train.fit import (build_optimizer, count_correct, improves, learning_rate,
                                 load_state, optimizer_step, save_state)
from rise_edge.train.methods import method_of, resolved, teacher_and_text
from rise_edge.train.student import Student, build_student
from rise_edge.train.teacher_cache import training_views

TRAINING_SECTIONS = ("data", "student", "teacher", "loss", "optim", "train")  # what makes the student
# Fields of those sections that do not change what is trained. The teacher-view cache replaces the
# teacher's forward pass by its stored embedding of the very same view (equal within fp16 rounding),
# so a run may move between cached and on the fly, resumed or reused; augmentation is seeded per
# sample, so the worker count does not change what a run sees, and a re-check of the images changes
# nothing when they are unchanged.
NOT_TRAINING = frozenset({"teacher.cache", "teacher.cache_dir", "data.num_workers",
                          "data.recheck_images"})


@dataclass
class TrainResult:
    run_dir: Path
    source_domains: tuple[str, ...]
    target_domain: str
    selected_step: int
    accuracy: dict[str, float]  # "val/<domain>", "val_mean", "target/<domain>"
    stats: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Accuracy of the selected student per source domain (validation) and on the unseen target."""
        rows = [(d, "source (val)", self.accuracy[f"val/{d}"]) for d in self.source_domains]
        rows.append(("mean of sources", "selection", self.accuracy["val_mean"]))
        rows.append((self.target_domain, "UNSEEN target", self.accuracy[f"target/{self.target_domain}"]))
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{'domain':<{width}}{'split':<16}accuracy",
                 *(f"{d:<{width}}{s:<16}{100 * a:6.2f} %" for d, s, a in rows),
                 f"selected step {self.selected_step}"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Set-up


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _absolute_paths(recipe: Recipe) -> Recipe:
    """Store data paths absolute in the run directory, so export and bench work from anywhere."""
    data = recipe.data
    root, lists = data_root(data), split_lists_dir(data)
    return replace(recipe, data=replace(data, root=str(root.resolve()) if root else "",
                                        split_lists=str(lists.resolve()) if lists else ""))


def _run_dir(recipe: Recipe, recipe_name: str, run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir
    name = recipe.train.run_name or (
        f"{recipe_name}-{recipe.data.target_domain or 'notarget'}-seed{recipe.train.seed}")
    return Path(recipe.train.output_dir) / name




def finished_with(run_dir: Path, recipe: Recipe) -> bool:
    """True for a finished run (results.json) trained as `recipe` trains, its data paths resolved:
    export and bench settings aside, nothing that makes the student differs. Such a run is reused
    (the demo, sweeps), never retrained."""
    try:
        saved = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()), str(run_dir))
    except (OSError, UnicodeDecodeError, UserError, yaml.YAMLError, AttributeError, TypeError):
        return False
    try:
        return (run_dir / "results.json").is_file() and not _training_changes(
            saved, _absolute_paths(resolved(recipe)[0]))
    except UserError:  # a method that is not registered (now) cannot be what the run trained
        return False


def _training_changes(saved: Recipe, recipe: Recipe) -> list[str]:
    """The fields that make the student (TRAINING_SECTIONS) on which two recipes differ; `recipe`
    is resolved (rise_edge.train.methods.resolved), `saved` as a run directory holds it."""
    saved = resolved(saved, written_before_heads=saved.student.head == "auto")[0]
    old, new = recipe_to_dict(saved), recipe_to_dict(recipe)
    return [f"{s}.{k}" for s in TRAINING_SECTIONS for k in new[s]
            if old[s].get(k) != new[s][k] and f"{s}.{k}" not in NOT_TRAINING]


def _check_run_dir(path: Path, recipe: Recipe, resume: bool, given: bool = True) -> None:
    """Refuse to overwrite a run; on resume, refuse a recipe that changed what training does.
    `given`: whether --run-dir chose the folder (else the recipe's output_dir and run_name did).

    A folder holding no training output (a start that failed before the first step) is reused, and
    so is one whose run was interrupted before its first checkpoint (only its log is left: it is
    started again, as nothing could be resumed).
    """
    elsewhere = ("choose another --run-dir" if given else
                 "give --run-dir DIR, or --set train.run_name=NAME")
    if path.is_dir() and not is_run_directory(path):
        theirs = sorted(p.name for p in path.iterdir())
        if theirs:
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            if resume:  # what was asked for cannot be: say that first
                raise UserError(f"nothing to resume in {path}: it is not a rise-edge run directory "
                                f"(it holds {shown}, files rise-edge did not write), and nothing "
                                f"in it was touched; resume the run where train wrote it, or "
                                f"{elsewhere} to start a new one without --resume")
            raise UserError(f"{path} holds files rise-edge did not write ({shown}); train writes only "
                            "into a new or empty folder or a run directory of its own, so nothing of "
                            f"yours is overwritten: {elsewhere}")
    checkpointed = any((path / name).exists() for name in (STUDENT_FILE, RESUME_FILE, "results.json"))
    if not resume:
        if checkpointed:
            hint = ("continue it with --resume" if (path / RESUME_FILE).is_file()
                    else "it holds a trained run")
            other = "choose another --run-dir, or --set train.run_name=NAME" if given else elsewhere
            raise UserError(f"run directory {path} already exists ({hint}); {other}")
        if (path / "metrics.jsonl").exists():
            logger("train").info(f"{path} was interrupted before its first checkpoint: starting "
                                 "it again")
            (path / "metrics.jsonl").unlink()
        return
    if not (path / RESUME_FILE).is_file():
        state = ("it finished already" if (path / "results.json").is_file() else
                 "it was interrupted before its first checkpoint; run the same command without "
                 "--resume to start it again" if (path / "recipe.yaml").is_file() else
                 "it holds no training state")
        raise UserError(f"nothing to resume in {path}: {state}")
    try:
        saved = recipe_from_dict(yaml.safe_load((path / "recipe.yaml").read_text()), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError) as exc:
        raise UserError(f"cannot resume {path}: its recipe.yaml is unreadable ({' '.join(str(exc).split())}"
                        "); it was changed or damaged after the run started") from None
    changed = _training_changes(saved, recipe)
    if changed:
        raise UserError(f"cannot resume {path}: the recipe changed {', '.join(changed)} since the run "
                        "started; resume with the same recipe and --set options")


def _objective(recipe: Recipe, splits: DomainSplits, device: torch.device, run_dir: Path,
               cache_dir: Path | None) -> tuple[nn.Module, Student, Preprocessing]:
    """The recipe's method (rise_edge.train.methods) and the student with its head (student.head, resolved):
    the teacher is loaded when the method distils from it or the head needs its space (the projector
    is sized to the teacher's embedding; the 'rise' head's classifier starts from the class text)."""
    torch.manual_seed(recipe.train.seed)
    method = method_of(recipe)
    head = recipe.student.head
    if not method.uses_teacher and head == "linear":
        student, pre = build_student(recipe.student, head, len(splits.classes), None)
        return method.objective(recipe.loss, None, None, pre), student, pre
    folders = [run_dir / "text_embeddings"] + ([cache_dir] if cache_dir else [])
    teacher, text = teacher_and_text(recipe, splits.classes, splits.anchors(), folders, device)
    student, pre = build_student(recipe.student, head, len(splits.classes), text.prototypes.shape[1])
    if head == "rise":
        student.init_classifier_from_text(text.prototypes.cpu())
    if not method.uses_teacher:
        teacher, text = None, None  # the head needed the teacher's space; the objective does not
    return method.objective(recipe.loss, teacher, text, pre), student, pre


def _loader(dataset: Dataset, recipe: Recipe, device: torch.device, workers: int, *,
            persistent: bool = True, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and workers > 0, **kwargs)


class _Shard(torch.utils.data.Sampler):
    """Evaluation indices of this rank: rank, rank + world, ... (counts are summed afterwards)."""

    def __init__(self, n: int, dist: Distributed):
        self.indices = list(range(dist.rank, n, dist.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------------
# The run


def train_run(recipe: Recipe, *, recipe_name: str = "recipe", run_dir: Path | None = None,
              resume: bool = False, progress: bool = True, cache_dir: Path | None = None,
              ) -> TrainResult:
    """Train per the recipe into a run directory; resume continues an interrupted run exactly."""
    # An unknown loss.method, or a head the method cannot train, stops here, before anything is
    # written; the run's recipe.yaml names the method and head it trained with.
    recipe, notes = resolved(recipe)
    require_trackers(recipe.log)  # a tracker asked for but not installed: one line, nothing written
    device = _device(recipe.train.device)
    dist = Distributed.from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    path = _run_dir(_absolute_paths(recipe), recipe_name, run_dir)
    trackers, status = Trackers(), "FAILED"  # the recipe's trackers (log:), opened by _train
    try:
        with run_lock(path, "train") if dist.is_main else contextlib.nullcontext():
            result = _train(recipe, recipe_name, run_dir, resume, progress and dist.is_main, device,
                            dist, cache_dir, notes, trackers)
        finish_training(trackers, result.run_dir)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"  # --resume continues it, and its MLflow run with it
        raise
    finally:
        trackers.close(status)
        dist.close()


def _train(recipe: Recipe, recipe_name: str, run_dir: Path | None, resume: bool, progress: bool,
           device: torch.device, dist: Distributed, cache_dir: Path | None,
           notes: list[str], trackers: Trackers) -> TrainResult:
    started = time.perf_counter()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    recipe, path, splits, batches, cache_dir = _prepare_run(recipe, recipe_name, run_dir, resume,
                                                            progress, dist, cache_dir)

    objective, student, pre = _objective(recipe, splits, device, path, cache_dir)
    if dist.is_main:  # once everything is checked and training is about to start
        for note in notes:
            logger("train").info(f"note: {note}")
    model = _placed(student, recipe, device, dist)
    optimizer = build_optimizer(recipe.optim, (p for p in student.parameters() if p.requires_grad))
    scaler, autocast = _mixed_precision(recipe, device)

    workers = loader_workers(recipe.data.num_workers, device.type)
    views_set, cached, views = training_views(recipe, splits.train_samples, pre, objective,
                                              log=logger("train").info)
    train_set = TimedBatches(views_set)
    per_epoch = len(train_set) // recipe.train.batch_size
    total = recipe.train.steps or recipe.train.epochs * per_epoch
    eval_every = recipe.train.eval_every or per_epoch
    eval_sets, eval_loaders = _eval_loaders(recipe, splits, pre, device, dist, workers)

    step, best = 0, {"val_mean": -1.0, "step": -1}
    if resume:
        step, best = _load_resume(path, student, optimizer, scaler, device)
    if dist.is_main:  # the trackers get exactly the records metrics.jsonl gets
        start_training(trackers, path, recipe, resume, step)
    log = MetricsLog(path / "metrics.jsonl", keep=(lambda r: r["step"] <= step) if resume else
                     None, listeners=(trackers.record,)) if dist.is_main else None
    meta = StudentMeta(recipe.student.model, student.head_spec, pre, splits.classes,
                       splits.source_domains, splits.target_domain, step, {})

    bar = progress_bar(total=total, initial=step, unit="step", desc=f"train {path.name}",
                       enabled=progress)
    window: dict[str, float] = defaultdict(float)
    rates = _Rates(workers, dist.world_size, time.perf_counter())
    while step < total:
        epoch, position = divmod(step, per_epoch)
        batches.set_epoch(epoch, position)
        loader = _loader(train_set, recipe, device, workers, batch_sampler=batches,
                         collate_fn=made_batch)
        for images, labels, index, k, made_s in rates.batches(loader):
            model.train()
            images, labels = _to_device(images, labels, device, recipe.train.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe.optim, step, total)
            # the cache's embeddings of exactly these views (B, D), in place of the teacher's pass
            extra = {} if cached is None else {"teacher_embeddings": cached[index, k].to(device)}
            with autocast():
                terms = objective(model, images, labels, **extra)
            if not torch.isfinite(terms["loss"].detach()):
                bar.close()
                _diverged(float(terms["loss"].detach()), step, total, path, recipe, best)
            optimizer_step(terms["loss"], optimizer, scaler)
            step += 1
            for name, value in terms.items():
                window[name] += float(value.detach())  # float() waits for the device: the step is done
            rates.stepped(images.shape[0], made_s)
            if step % recipe.train.log_every == 0 or step == total:
                _log_window(log, bar, window, rates, step, epoch, optimizer.param_groups[0]["lr"])
            bar.update(1)
            if step % eval_every == 0 or step == total:
                best = _evaluate_and_select(
                    _Checkpoint(path, recipe, splits, meta, dist, log, bar), model, student,
                    eval_loaders, device, autocast, optimizer, scaler, step, epoch, best)
            if step >= total:
                break
    bar.close()
    views.update(teacher_s=round(getattr(objective, "teacher_seconds", 0.0), 3),  # distinct: K or epochs
                 distinct_views_per_image=min(recipe.teacher.cache_views or total, -(-total // per_epoch)))
    return _finish(path, splits, eval_sets, best, total, started, device, dist, rates.run(), views)


def _log_window(log: MetricsLog | None, bar: Any, window: dict[str, float], rates: _Rates,
                step: int, epoch: int, lr: float) -> None:
    """One metrics.jsonl line (the window's mean loss terms and images/s) and the bar's figures;
    then a new window."""
    record = {"step": step, "epoch": epoch, "lr": lr,
              **{k: v / rates.window_steps for k, v in window.items()}, **rates.window()}
    if log:
        log.write(record)
    bar.set_postfix({"loss": f"{record['loss']:.3f}",  # img/s: end to end, step, loader
                     "img_s": f"{record['images_per_s']:.0f}",
                     "step": f"{record['step_images_per_s']:.0f}",
                     "loader": f"{record['loader_images_per_s']:.0f}"})
    window.clear()
    rates.restart_window()


class _Rates:
    """Images per second of the training loop, over a logging window and over the run (global: every
    process's images). images_per_s: end to end (waiting for batches and stepping); step: the training
    step alone (forward, backward, optimizer, from a batch in hand to its loss read back); loader:
    what the loader can deliver (batches made side by side in `workers` processes, each timed where
    it was made: decode + augment + collate). The smaller of step and loader sets the pace."""

    def __init__(self, workers: int, world_size: int, since: float):
        self.workers, self.world, self.since = workers, world_size, since
        self.run_totals = [0, 0.0, 0.0, 0.0]  # images, waiting s, step s, batch-making s
        self.first_step_at: float | None = None
        self.restart_window()

    def restart_window(self) -> None:
        self.window_steps, self.totals = 0, [0, 0.0, 0.0, 0.0]

    def batches(self, loader: DataLoader):
        """The loader's batches, the wait for each measured (the step's time starts when it comes)."""
        iterator = iter(loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.batch_at = time.perf_counter()
            self.waited = self.batch_at - asked
            yield batch

    def stepped(self, images: int, made_s: float) -> None:
        now = time.perf_counter()
        self.first_step_at = self.first_step_at or now
        for totals in (self.totals, self.run_totals):
            for i, value in enumerate((images, self.waited, now - self.batch_at, made_s)):
                totals[i] += value
        self.window_steps += 1

    def _rates(self, totals: list[float]) -> dict[str, float]:
        images, waited, stepping, making = totals
        images *= self.world
        return {"images_per_s": images / max(waited + stepping, 1e-9),
                "step_images_per_s": images / max(stepping, 1e-9),
                "loader_images_per_s": images * max(1, self.workers) / max(making, 1e-9)}

    def window(self) -> dict[str, float]:
        return self._rates(self.totals)

    def run(self) -> dict[str, Any]:
        rates = self._rates(self.run_totals)
        _, waited, stepping, _ = self.run_totals
        return {**rates, "loader_workers": self.workers,
                "bottleneck": "loader" if rates["loader_images_per_s"] < rates["step_images_per_s"]
                else "step",
                "waiting_for_batches_fraction": waited / max(waited + stepping, 1e-9),
                # from the start of training (after start-up and the image check) to step 1's end
                "seconds_to_first_step": (self.first_step_at or self.since) - self.since}


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch, images (B, 3, S, S) and labels (B,), on the training device (channels-last on CUDA
    when the recipe asks: the layout cuDNN's convolutions are fastest in)."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if device.type == "cuda" and channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def _placed(student: Student, recipe: Recipe, device: torch.device, dist: Distributed) -> nn.Module:
    """The student on its device (channels-last on CUDA when asked), wrapped in DDP under torchrun;
    the student itself stays the module that is saved and selected."""
    student.to(device)
    if device.type == "cuda" and recipe.train.channels_last:
        student.to(memory_format=torch.channels_last)
    if not dist.enabled:
        return student
    # The split head's projector gets no gradient where no language term uses it (ERM, KD,
    # RISE with w_dist = 0): DDP must be told, or it waits for that gradient forever.
    return nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=recipe.student.head == "split")


def _prepare_run(recipe: Recipe, recipe_name: str, run_dir: Path | None, resume: bool,
                 progress: bool, dist: Distributed, cache_dir: Path | None
                 ) -> tuple[Recipe, Path, DomainSplits, ViewBatches, Path | None]:
    """The run directory with its recipe and splits written (main process), the splits shared, and
    the batches they make. Everything that can refuse the recipe runs before the folder is made."""
    recipe = _absolute_paths(recipe)
    path = _run_dir(recipe, recipe_name, run_dir)
    if dist.is_main:
        _check_run_dir(path, recipe, resume, given=run_dir is not None)
    # The other ranks wait here while rank 0 checks every image (the first time, longer than NCCL's
    # timeout on a large data set): `share` waits on the start group, up to $RISE_EDGE_START_TIMEOUT.
    splits = dist.share(build_splits(recipe.data, progress=progress) if dist.is_main else None)
    if splits.skipped_images and dist.is_main:
        logger("train").warning(f"skipped {len(splits.skipped_images)} unreadable image(s) "
                                "(data.skip_bad_images)")
    batches = ViewBatches(len(splits.train_samples), recipe.train.batch_size, recipe.train.seed,
                          rank=dist.rank, world_size=dist.world_size)
    if dist.is_main and not resume:
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / RUN_MARKER, "a rise-edge run directory: train, export and bench "
                          "write here\n")  # first, so the folder is ours before anything else
        write_text_atomic(path / "recipe.yaml", dump_recipe(recipe))
    if dist.is_main and not (resume and (path / SPLITS_FILE).is_file()):
        # export and bench read these lists instead of rebuilding them: one truth about the data
        write_json_atomic(path / SPLITS_FILE, splits_to_record(splits))
    dist.barrier()
    if cache_dir is None and (method_of(recipe).uses_teacher or recipe.student.head != "linear"):
        cache_dir = cache_root() / "text_embeddings"
    return recipe, path, splits, batches, cache_dir


def _mixed_precision(recipe: Recipe, device: torch.device
                     ) -> tuple[torch.amp.GradScaler, Callable[[], contextlib.AbstractContextManager]]:
    """The gradient scaler (active for fp16 only) and the autocast context the recipe asks for."""
    use_amp = device.type == "cuda" and recipe.train.precision != "fp32"
    amp_dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    return scaler, autocast


def _eval_loaders(recipe: Recipe, splits: DomainSplits, pre: Preprocessing, device: torch.device,
                  dist: Distributed, workers: int) -> tuple[dict[str, list], dict[str, DataLoader]]:
    """Each source domain's validation images and the target domain's test images, with a loader each.
    The target is scored in DomainBed's two oracle parts (in, out) and as a whole from their counts."""
    target_in, target_out = splits.oracle_split()
    eval_sets = {**{f"val/{d}": splits.val[d] for d in splits.source_domains},
                 f"target_in/{splits.target_domain}": target_in,
                 f"target_out/{splits.target_domain}": target_out}
    eval_batch = max(1, min(256, 2 * recipe.train.batch_size // dist.world_size))
    # Evaluation workers live for one evaluation only: kept alive, every domain's workers (forks of a
    # process holding the model) stayed for the whole run, and two PACS runs ran out of 24 GiB.
    # Their own generator keeps the training's random stream untouched by when evaluations happen.
    eval_loaders = {name: _loader(DomainImages(samples, eval_transform(pre)), recipe, device, workers,
                                  persistent=False, generator=torch.Generator().manual_seed(0),
                                  batch_size=eval_batch, sampler=_Shard(len(samples), dist))
                    for name, samples in eval_sets.items()}
    return eval_sets, eval_loaders


def _diverged(loss: float, step: int, total: int, path: Path, recipe: Recipe,
              best: dict[str, float]) -> None:
    """Stop a run whose loss stopped being finite, saying what was kept and what to change."""
    kept = (f"{STUDENT_FILE} keeps the student selected at step {best['step']}"
            if best["step"] > 0 else "no student was saved")
    raise UserError(f"training loss became {loss} at step {step + 1} of {total} in {path}; {kept}; "
                    f"lower optim.lr (now {recipe.optim.lr:g}) and start a new run")


def _finish(path: Path, splits: DomainSplits, eval_sets: dict[str, list], best: dict[str, float],
            total: int, started: float, device: torch.device, dist: Distributed,
            rates: dict[str, Any], views: dict[str, Any]) -> TrainResult:
    """The run's results.json (selected step, accuracies, cost, loader and step rates, the image
    check, the views and teacher-view cache it trained with) written; the resume state removed."""
    stats = {"wall_time_s": time.perf_counter() - started, "steps": total, "views": views,
             "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "device": str(device), "world_size": dist.world_size, **rates,
             "image_check": splits.image_check}
    if device.type == "cuda":
        stats["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result = TrainResult(path, splits.source_domains, splits.target_domain, int(best["step"]),
                         {k: v for k, v in best.items() if k != "step"}, stats)
    if dist.is_main:
        write_json_atomic(path / "results.json", {
            "selected_step": result.selected_step, "accuracy": result.accuracy, "stats": stats,
            "classes": list(splits.classes), "source_domains": list(splits.source_domains),
            "target_domain": splits.target_domain,
            "images": {**{f"train/{d}": len(splits.train[d]) for d in splits.source_domains},
                       **{k: len(v) for k, v in eval_sets.items()},
                       f"target/{splits.target_domain}": len(splits.test)}})
        (path / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
    return result


@dataclass
class _Checkpoint:
    """Where and how an evaluation is recorded: the run directory, its metadata, the log and bar."""

    path: Path
    recipe: Recipe
    splits: DomainSplits
    meta: StudentMeta
    dist: Distributed
    log: MetricsLog | None
    bar: Any


def _evaluate_and_select(c: _Checkpoint, model: nn.Module, student: Student,
                         loaders: dict[str, DataLoader], device: torch.device,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                         epoch: int, best: dict[str, Any]) -> dict[str, Any]:
    """Score every domain, select on the mean source validation accuracy (never the target), save
    the selected student and the resume state; returns the best so far."""
    sources, target = c.splits.source_domains, c.splits.target_domain
    counts = {name: count_correct(model, dl, device, c.dist, autocast()) for name, dl in loaders.items()}
    scores = {name: correct / max(n, 1) for name, (correct, n) in counts.items()}
    scores["val_mean"] = sum(scores[f"val/{d}"] for d in sources) / len(sources)
    parts = [counts[f"target_in/{target}"], counts[f"target_out/{target}"]]
    scores[f"target/{target}"] = sum(c for c, _ in parts) / max(sum(n for _, n in parts), 1)
    selected = improves(scores["val_mean"], best["val_mean"], student)
    if selected:
        best = {**scores, "step": step}
    if c.dist.is_main:
        if selected:
            save_student(c.path, student, replace(c.meta, step=step, selection=best), c.recipe)
        c.log.write({"step": step, "epoch": epoch, "eval": scores, "selected": selected})
        _save_resume(c.path, student, optimizer, scaler, step, best)
        c.bar.write(f"step {step}: source val {100 * scores['val_mean']:.2f} %"
                    f"{' (selected)' if selected else ''}, target "
                    f"{100 * scores[f'target/{c.splits.target_domain}']:.2f} %")
    return best


# ---------------------------------------------------------------------------------------------------
# Resume state: model, optimizer, scaler and position in one safetensors file (no pickles).


def _save_resume(path: Path, student: Student, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, step: int, best: dict[str, Any]) -> None:
    save_state(path / RESUME_FILE, student, optimizer, scaler, {"step": step, "best": best})


def _load_resume(path: Path, student: Student, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device) -> tuple[int, dict[str, Any]]:
    metadata = load_state(path / RESUME_FILE, student, optimizer, scaler, device)
    if not (path / STUDENT_FILE).is_file():
        raise UserError(f"{path}: resume state exists but {STUDENT_FILE} is missing; start again")
    return int(metadata["step"]), metadata["best"]
