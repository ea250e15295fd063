"""Shared fixtures: a tiny synthetic domain data set and a trained run directory built from it.

`tiny_run` is what `export` and `bench` tests start from: a run directory as `rise-edge train` leaves it
(student.safetensors + student.json + recipe.yaml), with a tiny timm student trained for a few steps on
coloured shapes so its accuracy means something (well above chance on every domain).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw


def _absl_handler_on_the_real_stderr() -> None:
    """absl-py (tensorboard's dependency; nncf imports absl.logging where it is installed) makes a
    logging handler on whatever sys.stderr is when it is imported: inside a test, pytest's capture
    stream. Importing submitit runs logging.config.dictConfig, which closes every handler, and
    absl's closes its stream unless it is the process's own: pytest's capture then dies mid-session
    ('I/O operation on closed file', found in test_sweep after test_backends' NNCF test). Pointing
    it at sys.__stderr__ now, before any test, keeps that stream the process's own."""
    import sys

    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_handler_on_the_real_stderr()

TINY_CLASSES = ("circle", "square", "triangle")
TINY_DOMAINS = ("cartoon", "photo", "sketch")  # sketch is the target
TINY_TARGET = "sketch"
TINY_IMAGES_PER_CELL = 8  # images per (domain, class)
TINY_DATASET = "shapes"

# Each class has its own colour and shape; each domain its own background and noise level.
_CLASS_COLOUR = {"circle": (220, 40, 40), "square": (40, 180, 40), "triangle": (40, 60, 220)}
_DOMAIN_BACKGROUND = {"cartoon": (250, 240, 200), "photo": (120, 110, 100), "sketch": (255, 255, 255)}


def _draw_shape(cls: str, domain: str, rng: random.Random) -> Image.Image:
    size = 40  # not the model's 32 px, so the resize in eval_transform is exercised
    image = Image.new("RGB", (size, size), _DOMAIN_BACKGROUND[domain])
    draw = ImageDraw.Draw(image)
    r = rng.randint(9, 15)
    cx, cy = rng.randint(r + 1, size - r - 1), rng.randint(r + 1, size - r - 1)
    colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in _CLASS_COLOUR[cls])
    if domain == "sketch":
        outline, fill = colour, None
    else:
        outline, fill = (0, 0, 0) if domain == "cartoon" else None, colour
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif cls == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline,
                     width=2)
    if domain == "photo":  # sensor noise
        pixels = image.load()
        for _ in range(120):
            x, y = rng.randrange(size), rng.randrange(size)
            pixels[x, y] = tuple(rng.randrange(256) for _ in range(3))
    return image


def make_tiny_dataset(root: Path, images_per_cell: int = TINY_IMAGES_PER_CELL, seed: int = 0) -> Path:
    """<root>/shapes/<domain>/<class>/<n>.png for every domain and class; returns root."""
    rng = random.Random(seed)
    for domain in TINY_DOMAINS:
        for cls in TINY_CLASSES:
            folder = root / TINY_DATASET / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(images_per_cell):
                _draw_shape(cls, domain, rng).save(folder / f"{n:03d}.png")
    return root


def tiny_recipe_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", f"data.dataset={TINY_DATASET}",
            f"data.target_domain={TINY_TARGET}", "data.val_fraction=0.25", "data.num_workers=0",
            "student.model=test_resnet", "student.pretrained=none", "student.image_size=32",
            "train.steps=30", "train.batch_size=16", "export.calibration_size=24"]


def train_cli_args(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """`rise-edge train` options for a tiny run on the synthetic data set (extra ones win)."""
    return ["--run-dir", str(run_dir), "--set", f"data.root={data_root}",
            "--set", f"data.dataset={TINY_DATASET}", "--set", "data.target_domain=sketch",
            "--set", "data.val_fraction=0.25", "--set", "data.num_workers=0",
            "--set", "student.model=test_resnet", "--set", "student.image_size=32",
            "--set", "train.batch_size=8", "--set", "optim.lr=0.05", *extra]



def tree_hash(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): to show a command left it unchanged."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`): the tiny
    students are too small to gain from threads, and on a shared 2-core machine two torch threads
    waiting on each other turn a 1 ms forward pass into hundreds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _image_check_records(tmp_path_factory: pytest.TempPathFactory):
    """The image-check records of the tests' throw-away data sets go to a folder of this session,
    never the user's cache (subprocesses inherit it)."""
    from rise_edge.data.image_checks import RECORDS_ENV

    before = os.environ.get(RECORDS_ENV)
    os.environ[RECORDS_ENV] = str(tmp_path_factory.mktemp("image-checks"))
    yield
    if before is None:
        os.environ.pop(RECORDS_ENV, None)
    else:
        os.environ[RECORDS_ENV] = before


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    """A minimal ERM recipe file (cross-entropy only); the rest comes from train_cli_args."""
    path = tmp_path / "erm.yaml"
    path.write_text("loss:\n  method: erm\n  w_ce: 1.0\n")
    return path


def _train_tiny_student(student: torch.nn.Module, samples: list[tuple[str, int]], transform,
                        steps: int, seed: int) -> None:
    """A few plain SGD steps (not rise_edge.train.loop: these fixtures must not depend on it)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, OpenMP's spin-waiting threads cost 100x
    try:
        _sgd_steps(student, samples, transform, steps)
    finally:
        torch.set_num_threads(threads)
    student.eval()


def _sgd_steps(student: torch.nn.Module, samples: list[tuple[str, int]], transform, steps: int) -> None:
    from rise_edge.data.domains import load_rgb

    images = torch.stack([transform(load_rgb(p)) for p, _ in samples])
    labels = torch.tensor([y for _, y in samples])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    student.train()
    for _ in range(steps):
        batch = torch.randint(0, len(samples), (16,))
        loss = torch.nn.functional.cross_entropy(student(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def build_tiny_run(run_dir: Path, data_root: Path, extra_overrides: list[str] = ()) -> Path:
    """Write a run directory with a trained tiny student, as `rise-edge train` would."""
    from rise_edge.config import dump_recipe, load_recipe
    from rise_edge.data.domains import build_splits
    from rise_edge.data.transforms import eval_transform
    from rise_edge.files import write_text_atomic
    from rise_edge.run_dir import StudentMeta, save_student
    from rise_edge.train.student import build_student

    recipe = load_recipe(None, [*tiny_recipe_overrides(data_root), *extra_overrides])
    splits = build_splits(recipe.data, progress=False)
    torch.manual_seed(recipe.train.seed)
    student, preprocessing = build_student(recipe.student, "linear", len(splits.classes), None)
    _train_tiny_student(student, splits.train_samples, eval_transform(preprocessing),
                        recipe.train.steps, recipe.train.seed)
    meta = StudentMeta(recipe.student.model, student.head_spec, preprocessing, splits.classes,
                       splits.source_domains, splits.target_domain, step=recipe.train.steps,
                       selection={})
    run_dir.mkdir(parents=True, exist_ok=True)
    save_student(run_dir, student, meta, recipe)
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    return run_dir


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic data set's root (read-only for tests): <root>/shapes/<domain>/<class>/*.png."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def _tiny_run_template(tmp_path_factory: pytest.TempPathFactory, tiny_data_root: Path) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run_template") / "run", tiny_data_root)


@pytest.fixture
def tiny_run(tmp_path: Path, _tiny_run_template: Path) -> Path:
    """A fresh copy of a trained tiny run directory (test_resnet, 32 px, 3 classes, sources cartoon +
    photo, target sketch) that a test may write into freely. Returns the run directory's Path."""
    return Path(shutil.copytree(_tiny_run_template, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# A tiny open_clip teacher: one layer, random weights, the real tokenizer.

TINY_CLIP = "rise-edge-test-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path) -> str:
    """A one-layer open_clip config with random weights (the real tokenizer comes with it)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory):
    from rise_edge.config import TeacherConfig
    from rise_edge.train.teacher import load_teacher

    register_tiny_clip(tmp_path_factory.mktemp("clip_config"))
    torch.manual_seed(0)
    return load_teacher(TeacherConfig(model=TINY_CLIP, pretrained="none"), torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip 'local-dir:' teacher: config + random weights, loadable in any process."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CONFIG,
         "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                            "std": list(open_clip.OPENAI_DATASET_STD)}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder
