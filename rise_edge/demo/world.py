"""The demo world: the same shapes drawn in several visual styles, each style a domain.

A small, honest stand-in for RISE's premise. The student sees four styles (photo, cartoon, painting,
sketch) and is tested on one it never trained on; the demo teacher is trained on those four AND on
extra styles the student never sees, as CLIP has seen the web. Within a style, colour, rotation, size,
position and background vary. Every image is a pure function of (seed, stream, style, class, index),
so the same spec and seed give byte-identical PNGs, and teacher images (another stream) never repeat
student images.

On disk the world uses the DomainBed layout `<world>/<style>/<class>/<index>.png`, so nothing downstream
knows it is synthetic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

import rise_edge.demo.styles as _styles
from rise_edge.demo.styles import COLOURS, SHAPES, STYLE_RENDERERS
from rise_edge.files import cache_key

# Bump when the drawing code changes what a spec produces, so old caches are not reused.
GENERATOR_VERSION = 1

DEMO_CLASSES: tuple[str, ...] = tuple(SHAPES)
DEMO_COLOURS: tuple[str, ...] = tuple(COLOURS)
STUDENT_STYLES: tuple[str, ...] = ("photo", "cartoon", "painting", "sketch")
TEACHER_ONLY_STYLES: tuple[str, ...] = ("mosaic", "neon_sign", "pixel_art", "embroidery", "chalk_drawing")
ALL_STYLES: tuple[str, ...] = STUDENT_STYLES + TEACHER_ONLY_STYLES

# Independent random streams: student data and teacher data can never draw the same image.
STREAM_STUDENT = 1
STREAM_TEACHER = 2

MARKER = ".demo-world.json"  # hidden: data loaders list only the style folders


@dataclass(frozen=True)
class WorldSpec:
    """Everything that decides the pixels of a generated world (and so its cache folder)."""

    classes: tuple[str, ...] = DEMO_CLASSES
    styles: tuple[str, ...] = STUDENT_STYLES
    image_size: int = 64
    images_per_class: int = 120  # per style
    seed: int = 0
    colours: tuple[str, ...] = DEMO_COLOURS

    def __post_init__(self) -> None:
        unknown = [s for s in self.styles if s not in STYLE_RENDERERS]
        unknown += [c for c in self.classes if c not in SHAPES]
        unknown += [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown style, class or colour: {', '.join(unknown)}")
        if self.image_size < 16 or self.images_per_class < 1 or self.seed < 0:
            raise ValueError("image_size must be >= 16, images_per_class >= 1, seed >= 0")

    def to_dict(self) -> dict:
        return {**asdict(self), "generator_version": GENERATOR_VERSION}

    @property
    def hash(self) -> str:
        """Hex digest of the spec and the generator version."""
        return cache_key(**self.to_dict())

    @property
    def folder_name(self) -> str:
        return f"demo-world-{self.hash[:12]}"

    @property
    def num_images(self) -> int:
        return len(self.styles) * len(self.classes) * self.images_per_class


class WorldSample(NamedTuple):
    """One generated image with what a caption may say about it."""

    image: Image.Image
    style: str
    colour: str
    class_name: str


def default_world_spec() -> WorldSpec:
    """The student's data set: 4 styles x 7 classes x 120 images = 3360 PNGs of 64 px."""
    return WorldSpec()


def miniature_world_spec() -> WorldSpec:
    """A world small enough for tests (seconds): 4 styles x 3 classes x 4 images of 32 px."""
    return WorldSpec(classes=("circle", "square", "triangle"), image_size=32, images_per_class=4)


def caption(style: str, colour: str, class_name: str) -> str:
    """The full caption of an image: 'a {style} of a {colour} {class}' (underscores become spaces)."""
    return f"a {_words(style)} of a {_words(colour)} {_words(class_name)}"


def _words(name: str) -> str:
    return name.replace("_", " ")


def _stable_id(name: str) -> int:
    # crc32 of the name, not its position in a tuple, so adding a class leaves the others unchanged.
    return zlib.crc32(name.encode())


def _rng(seed: int, stream: int, style: str, class_name: str, index: int) -> np.random.Generator:
    key = (stream, _stable_id(style), _stable_id(class_name), index)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def render_sample(style: str, class_name: str, index: int, *, seed: int, stream: int,
                  image_size: int = 64, colours: Sequence[str] = DEMO_COLOURS) -> WorldSample:
    """Draw one image: a pure function of its arguments."""
    rng = _rng(seed, stream, style, class_name, index)
    colour = str(colours[int(rng.integers(len(colours)))])
    pixels = _styles.render(style, class_name, COLOURS[colour], rng, image_size)
    return WorldSample(Image.fromarray(pixels, "RGB"), style, colour, class_name)


def iter_samples(classes: Sequence[str] = DEMO_CLASSES, styles: Sequence[str] = ALL_STYLES, *,
                 seed: int = 0, image_size: int = 64, colours: Sequence[str] = DEMO_COLOURS,
                 count: int | None = None, stream: int = STREAM_TEACHER) -> Iterator[WorldSample]:
    """In-memory samples for teacher training, round-robin over (style, class) cells.

    They come from the teacher's random stream, disjoint from the student's data set for any seed.
    `count=None` never stops.
    """
    cells = [(s, c) for s in styles for c in classes]
    k = 0
    while count is None or k < count:
        style, class_name = cells[k % len(cells)]
        yield render_sample(style, class_name, k // len(cells), seed=seed, stream=stream,
                            image_size=image_size, colours=colours)
        k += 1


def world_path(root: Path, spec: WorldSpec) -> Path:
    """Where `generate_world` keeps this spec's world under `root` (a cache folder)."""
    return Path(root) / spec.folder_name


def is_complete(folder: Path, spec: WorldSpec) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()).get("hash") == spec.hash
    except (OSError, ValueError):
        return False


def generate_world(root: Path, spec: WorldSpec, *, progress: bool = True) -> Path:
    """The world's folder `<root>/demo-world-<hash12>` (DomainBed layout), generated on first use.

    Written into a temporary sibling and renamed, so an interrupted run leaves no half world and a
    concurrent run loses the race harmlessly; a second call with the same spec returns at once.
    """
    final = world_path(root, spec)
    if is_complete(final, spec):
        return final
    tmp = make_temp_sibling(final)
    try:
        _write_world(tmp, spec, progress)
        publish_folder(tmp, final, lambda folder: is_complete(folder, spec))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_temp_sibling(final: Path, stale_after_s: float = 3600.0) -> Path:
    """A new temporary folder beside `final`, to be renamed onto it when complete.

    Temporary folders of the same target older than `stale_after_s` were left by a killed process
    (an exception removes its own): they are deleted here.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    now = time.time()
    for old in final.parent.glob(f"{prefix}*"):
        try:
            if now - old.stat().st_mtime > stale_after_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed meanwhile by its owner
            pass
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the cache may be shared
    return tmp


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_world(folder: Path, spec: WorldSpec, progress: bool) -> None:
    from rise_edge.logs import progress as progress_bar

    bar = progress_bar(total=spec.num_images, desc="demo world", unit="img", enabled=progress,
                       leave=False)
    with bar:
        for style in spec.styles:
            for class_name in spec.classes:
                cell = folder / style / class_name
                cell.mkdir(parents=True)
                for index in range(spec.images_per_class):
                    sample = render_sample(style, class_name, index, seed=spec.seed,
                                           stream=STREAM_STUDENT, image_size=spec.image_size,
                                           colours=spec.colours)
                    # optimize=False and no metadata: the bytes depend on the pixels only.
                    sample.image.save(cell / f"{index:04d}.png", format="PNG")
                    bar.update(1)
    (folder / MARKER).write_text(json.dumps({"hash": spec.hash, "spec": spec.to_dict()}, indent=2))


def publish_folder(tmp: Path, final: Path, complete: Callable[[Path], bool]) -> None:
    """Rename the finished `tmp` onto `final`; keep a complete one another process put there first.

    A `final` that is not `complete` is a leftover (never a valid build) and is replaced.
    """
    if final.exists() and not complete(final):
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not complete(final):
            raise
