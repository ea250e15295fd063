"""A small CLIP teacher for the demo world, trained here on the CPU and cached once per machine.

It is a real open_clip model (architecture registered through `open_clip.add_model_config`, open_clip's
own tokenizer, `ClipLoss`), trained contrastively on captions "a {style} of a {colour} {class}" of
images in ALL styles: the student's four and styles only the teacher sees, as CLIP has seen the web.
Its images come from a random stream disjoint from the student's data set. It expects CLIP's mean/std,
not the student's, like the real teacher.

Cache layout: `<cache>/demo-teacher-<hash12>/` holding model.safetensors, config.json, zero_shot.json,
and open_clip_config.json (so open_clip's `local-dir:<folder>` works too); the architecture is registered
from `<cache>/model-configs/<hash12>/rise-edge-demo-clip.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from rise_edge.logs import logger
from rise_edge.config import CLIP_TEMPLATES
from rise_edge.demo.world import (ALL_STYLES, DEMO_CLASSES, DEMO_COLOURS, STUDENT_STYLES, WorldSpec,
                                  caption, default_world_spec, generate_world, iter_samples,
                                  make_temp_sibling, miniature_world_spec, publish_folder)
from rise_edge.files import cache_key, cache_root, write_json_atomic
from rise_edge.train.teacher import template_mean_embeddings

DEMO_TEACHER_MODEL = "rise-edge-demo-clip"
# OpenAI CLIP's statistics (not ImageNet's) and RISE's prompt templates: the originals.
CLIP_MEAN, CLIP_STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (the BPE vocabulary shipped with open_clip)
TRAINING_VERSION = 1  # bump when the training code changes what the same settings produce

RISE_TEMPLATES: tuple[str, ...] = CLIP_TEMPLATES
PLAIN_TEMPLATES: tuple[str, ...] = ("a {}.",)


@dataclass(frozen=True)
class DemoTeacherSettings:
    """Everything that decides the teacher's weights (and so its cache folder)."""

    classes: tuple[str, ...] = DEMO_CLASSES
    styles: tuple[str, ...] = ALL_STYLES  # student styles + teacher-only styles
    colours: tuple[str, ...] = DEMO_COLOURS
    source_size: int = 64  # generated image size (as the world's)
    images_per_cell: int = 200  # teacher images per (style, class), reused across steps
    seed: int = 0
    # architecture: a timm image tower (open_clip's timm adapter) and CLIP's text transformer.
    # A small residual CNN learns the shapes in about a thousand CPU steps; CLIP's ViT and
    # ModifiedResNet towers were still near chance after a few hundred steps in our trials.
    image_size: int = 40
    vision_model: str = "test_resnet"  # timm's 0.4 M-parameter ResNet
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2
    context_length: int = 16  # the longest caption, template or anchor here is 10 tokens
    embed_dim: int = 128
    # training
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    # The text tower learns colour and style words first and, while images carry no shape yet,
    # erases the class word; a slower text tower lets the image tower find the shapes first.
    text_lr_scale: float = 0.25
    weight_decay: float = 0.05
    warmup_steps: int = 20
    student_style_weight: float = 2.0  # a student style's images are drawn twice as often
    # the student's data set on which zero-shot accuracy is measured (and cached for the demo)
    eval_world: WorldSpec = field(default_factory=default_world_spec)

    def to_dict(self) -> dict:
        return {**asdict(self), "training_version": TRAINING_VERSION}

    @property
    def hash(self) -> str:
        return cache_key(**self.to_dict())

    @property
    def folder_name(self) -> str:
        return f"demo-teacher-{self.hash[:12]}"


DEFAULT_SETTINGS = DemoTeacherSettings()


def miniature_teacher_settings() -> DemoTeacherSettings:
    """For tests: data and training in a few seconds; its accuracy means nothing."""
    world = miniature_world_spec()
    return DemoTeacherSettings(
        classes=world.classes, styles=("photo", "sketch", "mosaic"), source_size=32,
        images_per_cell=2, image_size=32, text_width=64, text_heads=2, text_layers=1,
        embed_dim=32, steps=2, batch_size=8, warmup_steps=1, eval_world=world)


def model_config(settings: DemoTeacherSettings = DEFAULT_SETTINGS) -> dict:
    """The open_clip architecture config (the JSON open_clip's model registry reads)."""
    return {
        "embed_dim": settings.embed_dim,
        "vision_cfg": {"timm_model_name": settings.vision_model, "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": settings.image_size},
        "text_cfg": {"context_length": settings.context_length, "vocab_size": VOCAB_SIZE,
                     "width": settings.text_width, "heads": settings.text_heads,
                     "layers": settings.text_layers},
    }


def preprocess_config(settings: DemoTeacherSettings = DEFAULT_SETTINGS) -> dict:
    return {"size": settings.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "squash"}


def register_demo_teacher_config(settings: DemoTeacherSettings = DEFAULT_SETTINGS,
                                 cache_dir: Path | None = None) -> Path:
    """Make `DEMO_TEACHER_MODEL` known to open_clip with these settings' architecture.

    The last registration in a process wins. Returns the registered JSON file.
    """
    return _register(model_config(settings), cache_dir or cache_root())


def _register(config: dict, cache: Path) -> Path:
    """open_clip names a model after its config file's stem, so each architecture gets a folder:
    `<cache>/model-configs/<hash12>/rise-edge-demo-clip.json`."""
    import open_clip

    text = json.dumps(config, indent=2, sort_keys=True)
    folder = cache / "model-configs" / hashlib.sha256(text.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{DEMO_TEACHER_MODEL}.json"
    if not path.is_file():
        write_json_atomic(path, config)
    open_clip.add_model_config(path)
    return path


def teacher_folder(settings: DemoTeacherSettings = DEFAULT_SETTINGS,
                   cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / settings.folder_name


def load_demo_teacher(weights: Path) -> torch.nn.Module:
    """A built teacher (eval mode) from its model.safetensors, via open_clip.create_model.

    Registers the architecture stored beside the weights first, so `open_clip.get_tokenizer(
    DEMO_TEACHER_MODEL)` then gives the matching tokenizer.
    """
    import open_clip

    weights = Path(weights)
    config = json.loads((weights.parent / "config.json").read_text())
    _register(config["model_cfg"], weights.parent.parent)
    model = open_clip.create_model(DEMO_TEACHER_MODEL, pretrained=str(weights),
                                   force_preprocess_cfg=config["preprocess_cfg"])
    return model.eval()


# -- training data ---------------------------------------------------------------------------------

@dataclass
class _Pool:
    """Teacher images at the teacher's input size, with what their captions may say."""

    images: torch.Tensor  # (N, 3, S, S) float in [0, 1]
    styles: list[str]
    colours: list[str]
    classes: list[str]


def _to_tensor(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) in [0, 1], resized as ClipTeacher resizes student batches."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _build_pool(settings: DemoTeacherSettings, progress: bool) -> _Pool:
    from rise_edge.logs import progress as progress_bar

    count = len(settings.styles) * len(settings.classes) * settings.images_per_cell
    samples = list(progress_bar(iter_samples(settings.classes, settings.styles, seed=settings.seed,
                                             image_size=settings.source_size,
                                             colours=settings.colours, count=count),
                                total=count, desc="teacher images", unit="img", enabled=progress,
                                leave=False))
    return _Pool(_to_tensor([s.image for s in samples], settings.image_size),
                 [s.style for s in samples], [s.colour for s in samples],
                 [s.class_name for s in samples])


_CAPTION_KINDS = ("full", "colour", "style", "class")
_CAPTION_P = (0.4, 0.2, 0.2, 0.2)


def _caption_variant(rng: np.random.Generator, kind: str, style: str, colour: str, cls: str
                     ) -> tuple[str, str]:
    """(canonical caption, its written form). Partial captions keep the text tower from depending
    on style and colour words being present, so class-only prompt templates work."""
    text = {"full": caption(style, colour, cls), "colour": f"a {colour} {cls}",
            "style": f"a {style} of a {cls}", "class": f"a {cls}"}[kind].replace("_", " ")
    written = ("the" + text[1:]) if rng.random() < 0.3 else text
    return text, written + ("." if rng.random() < 0.5 else "")


def _groups(pool: _Pool) -> dict[tuple[str, str], dict[str, list[int]]]:
    """Pool indices by (style, colour), then by class."""
    groups: dict[tuple[str, str], dict[str, list[int]]] = {}
    for i, (s, c, k) in enumerate(zip(pool.styles, pool.colours, pool.classes)):
        groups.setdefault((s, c), {}).setdefault(k, []).append(i)
    return groups


def _batch(rng: np.random.Generator, groups: dict[tuple[str, str], dict[str, list[int]]], size: int,
           student_weight: float = 1.0) -> tuple[list[int], list[str]]:
    """A batch of whole (style, colour) groups: one image of every class, captioned alike.

    Within a group captions differ only in the class word, so the contrastive loss cannot be solved
    by colour or style alone. No caption repeats: ClipLoss treats every other caption in the batch as
    a negative, so a repeated one would be a contradictory target.
    """
    keys = list(groups)
    weights = np.array([student_weight if style in STUDENT_STYLES else 1.0 for style, _ in keys])
    order = rng.choice(len(keys), size=len(keys), replace=False, p=weights / weights.sum())
    seen: set[str] = set()
    indices, texts = [], []
    for g in order:
        (style, colour), by_class = keys[g], groups[keys[g]]
        kind = _CAPTION_KINDS[rng.choice(len(_CAPTION_KINDS), p=_CAPTION_P)]
        for cls in sorted(by_class):
            canonical, written = _caption_variant(rng, kind, style, colour, cls)
            if canonical in seen:
                canonical = written = caption(style, colour, cls)
            if canonical in seen:
                continue
            seen.add(canonical)
            candidates = by_class[cls]
            indices.append(candidates[int(rng.integers(len(candidates)))])
            texts.append(written)
            if len(indices) == size:
                return indices, texts
    return indices, texts


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (80-100 % of the side), horizontal flip, mild brightness and contrast: the
    teacher later sees the student's augmented views."""
    n = x.shape[0]
    scale = 0.8 + 0.2 * torch.rand(n, generator=gen)
    shift = (1 - scale)[:, None] * (torch.rand(n, 2, generator=gen) * 2 - 1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    contrast = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the teacher's input (CLIP mean/std)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- training --------------------------------------------------------------------------------------

def _is_text(name: str) -> bool:
    return not name.startswith("visual.") and "logit_scale" not in name


def _optimizer(model: torch.nn.Module, settings: DemoTeacherSettings) -> torch.optim.Optimizer:
    # As open_clip's training code: no weight decay on gains, biases and logit_scale. The text tower
    # may learn slower than the image tower (text_lr_scale): see DemoTeacherSettings.
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "logit_scale" in name
        groups.setdefault((_is_text(name), no_decay), []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if no_decay else settings.weight_decay,
                     "lr": settings.lr * (settings.text_lr_scale if text else 1.0)}
                    for (text, no_decay), ps in groups.items()]
    try:
        return torch.optim.AdamW(param_groups, lr=settings.lr, fused=True)
    except (RuntimeError, TypeError):  # builds without the fused CPU kernel
        return torch.optim.AdamW(param_groups, lr=settings.lr)


def _lr_factor(step: int, settings: DemoTeacherSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_teacher(settings: DemoTeacherSettings, cache_dir: Path, progress: bool = True,
                  timings: dict[str, float] | None = None) -> torch.nn.Module:
    """A freshly trained teacher (eval mode); deterministic for given settings and thread count."""
    import open_clip
    from open_clip.loss import ClipLoss

    from rise_edge.logs import progress as progress_bar

    torch.manual_seed(settings.seed)
    register_demo_teacher_config(settings, cache_dir)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: that is the point
    try:
        model = open_clip.create_model(DEMO_TEACHER_MODEL, force_preprocess_cfg=preprocess_config(settings))
    finally:
        logging.disable(previous)
    tokenizer = open_clip.get_tokenizer(DEMO_TEACHER_MODEL)
    start = time.perf_counter()
    pool = _build_pool(settings, progress)
    pool_s = time.perf_counter() - start
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = _optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    loss_fn = ClipLoss()
    groups = _groups(pool)
    model.train()
    bar = progress_bar(range(settings.steps), desc="demo teacher", enabled=progress, leave=False)
    for _ in bar:
        indices, texts = _batch(rng, groups, settings.batch_size, settings.student_style_weight)
        images = normalise(_augment(pool.images[indices], gen))
        out = model(images, tokenizer(texts))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) \
            if isinstance(out, dict) else loss_fn(*out[:3])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if timings is not None:
        timings.update(teacher_images=pool_s, training=time.perf_counter() - start - pool_s)
    return model.eval()


# -- zero-shot evaluation --------------------------------------------------------------------------

@torch.no_grad()
def text_prototypes(model: torch.nn.Module, tokenizer, classes: Sequence[str],
                    templates: Sequence[str]) -> torch.Tensor:
    """(C, D) normalised class prototypes, computed as the RISE teacher computes its own."""
    raw = template_mean_embeddings(lambda texts: model.encode_text(tokenizer(texts)).float(), classes,
                                   templates)
    return F.normalize(raw, dim=-1)


def _world_images(world_root: Path, style: str, classes: Sequence[str]) -> Iterator[tuple[Path, int]]:
    for label, cls in enumerate(classes):
        for path in sorted((Path(world_root) / style / cls).glob("*.png")):
            yield path, label


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer, world_root: Path, styles: Sequence[str],
                       templates: Sequence[str], classes: Sequence[str] = DEMO_CLASSES,
                       image_size: int | None = None, batch: int = 256) -> dict[str, float]:
    """Per-style accuracy of classifying `<world_root>/<style>/<class>/*.png` by the nearest text
    prototype (cosine), as RISE's teacher logits do."""
    from PIL import Image

    size = image_size or int(torch.tensor(model.visual.image_size).flatten()[0])  # int or (H, W)
    prototypes = text_prototypes(model, tokenizer, classes, templates)
    result = {}
    for style in styles:
        items = list(_world_images(world_root, style, classes))
        correct = 0
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            images = [Image.open(p).convert("RGB") for p, _ in chunk]
            emb = F.normalize(model.encode_image(normalise(_to_tensor(images, size))).float(), dim=-1)
            pred = (emb @ prototypes.t()).argmax(dim=-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
        result[style] = correct / max(1, len(items))
    return result


def format_accuracy_table(table: dict[str, dict[str, float]]) -> str:
    """Rows: template sets; columns: styles."""
    styles = list(next(iter(table.values())))
    lines = [f"{'templates':<10}" + "".join(f"{s:>11}" for s in styles)]
    for name, row in table.items():
        lines.append(f"{name:<10}" + "".join(f"{100 * row[s]:>10.1f}%" for s in styles))
    return "\n".join(lines)


# -- build and cache -------------------------------------------------------------------------------

def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def default_threads(sample_s: float = 0.3) -> int:
    """The usable cores, less those other processes keep busy right now.

    On a busy machine, torch's OpenMP threads spin-wait for each other: with 2 threads on 2 cores
    shared with one other busy process we measured a training step 40x slower than with 1 thread.
    The busy cores are sampled over `sample_s` (this process sleeps meanwhile), not read from the
    load average, which still counts a `pip install` that ended a minute ago.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return cores
    total_cores = os.cpu_count() or cores
    busy = (after[0] - before[0]) / (after[1] - before[1]) * total_cores
    return max(1, min(cores, cores - math.floor(busy + 0.25)))  # a core 75 % busy counts as taken


def build_demo_teacher(cache_dir: Path | None = None, *,
                       settings: DemoTeacherSettings = DEFAULT_SETTINGS, progress: bool = True,
                       threads: int | None = None) -> Path:
    """`<cache>/demo-teacher-<hash12>/model.safetensors`, trained on first use (minutes on a CPU),
    then reused. Registers `DEMO_TEACHER_MODEL` with open_clip as a side effect."""
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    final = teacher_folder(settings, cache)
    register_demo_teacher_config(settings, cache)
    if _is_complete(final, settings):
        return final / "model.safetensors"
    tmp = make_temp_sibling(final)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        _build_into(tmp, settings, cache, progress)
        publish_folder(tmp, final, lambda folder: _is_complete(folder, settings))
    finally:
        torch.set_num_threads(previous)
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "model.safetensors"


def _build_into(folder: Path, settings: DemoTeacherSettings, cache: Path, progress: bool) -> None:
    import open_clip
    from safetensors.torch import save_file

    timings: dict[str, float] = {}
    start = time.perf_counter()
    world_root = generate_world(cache, settings.eval_world, progress=progress)
    timings["world"] = time.perf_counter() - start
    model = train_teacher(settings, cache, progress, timings)
    start = time.perf_counter()
    tokenizer = open_clip.get_tokenizer(DEMO_TEACHER_MODEL)
    styles = [s for s in settings.eval_world.styles if s in STUDENT_STYLES] or \
        list(settings.eval_world.styles)
    table = {name: zero_shot_accuracy(model, tokenizer, world_root, styles, templates, settings.classes)
             for name, templates in (("rise", RISE_TEMPLATES), ("plain", PLAIN_TEMPLATES))}
    timings["zero_shot"] = time.perf_counter() - start
    if progress:
        logger("demo").info(f"demo teacher zero-shot accuracy on the student's styles "
                            f"(chance {100 / len(settings.classes):.1f}%):\n"
                            f"{format_accuracy_table(table)}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    write_json_atomic(folder / "zero_shot.json", {
        "world": settings.eval_world.folder_name, "classes": list(settings.classes),
        "styles": styles, "chance": 1 / len(settings.classes),
        "templates": {"rise": list(RISE_TEMPLATES), "plain": list(PLAIN_TEMPLATES)},
        "accuracy": table})
    write_json_atomic(folder / "config.json", {
        "hash": settings.hash, "model_name": DEMO_TEACHER_MODEL, "model_cfg": model_config(settings),
        "preprocess_cfg": preprocess_config(settings), "settings": settings.to_dict(),
        "tokenizer": {"kind": "open_clip SimpleTokenizer", "context_length": settings.context_length},
        "build_seconds": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads()})
    write_json_atomic(folder / "open_clip_config.json", {
        "model_cfg": model_config(settings), "preprocess_cfg": preprocess_config(settings)})


def _is_complete(folder: Path, settings: DemoTeacherSettings) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("hash") == settings.hash and (folder / "model.safetensors").is_file()
