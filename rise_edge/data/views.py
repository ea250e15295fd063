"""Parametric training views: RISE's augmentation as parameters drawn from a seed, then applied.

A view is named by (image, k): its parameters (crop box, flip, colour-jitter order and factors,
grayscale) are drawn from a generator seeded by the image's bytes (sha256) and k alone, never by the
run's seed or target, so one teacher-view cache (rise_edge.train.teacher_cache) serves every target,
seed and grid point of a sweep. The run's seed chooses which view each image shows in each epoch
(`view_index`): with K views per image (teacher.cache_views > 0), epochs cycle through the K views
in a seeded order per image and cycle, so no view repeats within K epochs; with K = 0 every epoch
draws a fresh view. The cached and on-the-fly paths share all of this, so view k of an image in
epoch e is the same tensor with or without the cache.

The augmentation is RISE's: RandomResizedCrop(scale 0.8-1, ratio 3/4-4/3), horizontal flip (p 0.5),
ColorJitter(0.4, 0.4, 0.4, 0.4) in a random order, grayscale (p 0.1); parameters are drawn as
torchvision's transforms draw them and applied with torchvision.transforms.v2.functional.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rise_edge.data.domains import EpochBatches, Sample, load_rgb
from rise_edge.data.transforms import Preprocessing

# One view's parameters, float32 (exact for pixel coordinates below 2**24):
# top, left, height, width, flip, grayscale, jitter order (4), brightness, contrast, saturation, hue
PARAMS = 14
FRESH_VIEWS = 2**40  # K = 0: view indices from here on are per (seed, epoch), never a cached one's
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class ViewSpec:
    """What draws and applies a view: RISE's augmentation ranges, the output size and interpolation.
    Part of the teacher-view cache's key; `version` changes when drawing or applying changes."""

    size: int
    interpolation: str = "bilinear"
    augment: bool = True
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    grayscale: float = 0.1
    version: int = 1

    @classmethod
    def of(cls, pre: Preprocessing, augment: bool = True) -> ViewSpec:
        return cls(pre.input_size, pre.interpolation if pre.interpolation in _INTERPOLATION
                   else "bilinear", augment)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def image_digest(data: bytes) -> bytes:
    """An image's key: sha256 of its file's bytes (32 bytes)."""
    return hashlib.sha256(data).digest()


def _seed(*parts: bytes | int) -> int:
    digest = hashlib.sha256(b"|".join(p if isinstance(p, bytes) else str(p).encode() for p in parts))
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def view_index(seed: int, sample: int, epoch: int, views: int) -> int:
    """Which view (k) sample `sample` shows in `epoch` of a run seeded `seed`: with views = K > 0,
    position epoch % K of a seeded permutation of range(K) drawn per (seed, sample, epoch // K);
    with views = 0 a fresh index per (seed, epoch), FRESH_VIEWS or above."""
    if views <= 0:
        return FRESH_VIEWS + _seed(b"fresh", seed, epoch) % (2**62)
    cycle, position = divmod(epoch, views)
    generator = torch.Generator().manual_seed(_seed(b"cycle", seed, sample, cycle))
    return int(torch.randperm(views, generator=generator)[position])


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def sample_view(spec: ViewSpec, digest: bytes, k: int, height: int, width: int) -> torch.Tensor:
    """View k of the image with sha256 `digest` and size (height, width): its parameters, (PARAMS,)
    float32. Drawn as torchvision's RandomResizedCrop, RandomHorizontalFlip, ColorJitter and
    RandomGrayscale draw them, from a generator seeded by (digest, k) alone."""
    if not spec.augment:
        return torch.tensor([0, 0, height, width, 0, 0, 0, 1, 2, 3, 1, 1, 1, 0], dtype=torch.float32)
    g = torch.Generator().manual_seed(_seed(b"view", spec.version, digest, k))
    top, left, h, w = _crop_box(g, height, width, spec.scale, spec.ratio)
    flip = float(torch.rand(1, generator=g) < 0.5)
    order = torch.randperm(4, generator=g).tolist()
    j = spec.jitter
    factors = [_uniform(g, 1 - j, 1 + j) for _ in range(3)] + [_uniform(g, -j, j)]
    gray = float(torch.rand(1, generator=g) < spec.grayscale)
    return torch.tensor([top, left, h, w, flip, gray, *order, *factors], dtype=torch.float32)


def _crop_box(g: torch.Generator, height: int, width: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop, as torchvision's
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_view(image: Image.Image, params: torch.Tensor, spec: ViewSpec, pre: Preprocessing
               ) -> torch.Tensor:
    """An RGB image and its view's parameters -> the student's tensor (3, size, size), float32,
    normalised with pre's mean/std. Deterministic: the same parameters give the same tensor."""
    top, left, h, w, flip, gray = (int(v) for v in params[:6].tolist())
    out = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size],
                          interpolation=_INTERPOLATION[spec.interpolation], antialias=True)
    if spec.augment:
        if flip:
            out = TF.hflip(out)
        factors = params[10:].tolist()
        for index in params[6:10].tolist():
            out = _JITTER[int(index)](out, factors[int(index)])
        if gray:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
    tensor = TF.to_dtype(TF.pil_to_tensor(out), torch.float32, scale=True)
    return TF.normalize(tensor, list(pre.mean), list(pre.std))


def read_image(path: str | Path) -> tuple[Image.Image, bytes]:
    """(the image as RGB, its sha256 digest) from one read of the file."""
    data = Path(path).read_bytes()
    return load_rgb(io.BytesIO(data)), image_digest(data)


class ViewImages(Dataset):
    """Training images as views: key (sample index, epoch) -> (image (3, S, S), label, index, k).

    `params` (N, K, PARAMS), when given (the teacher-view cache's), are replayed instead of drawn:
    the cache's own record of each view. Without it a view is drawn from the image's digest.
    """

    def __init__(self, samples: Sequence[Sample], pre: Preprocessing, spec: ViewSpec, seed: int,
                 views: int, params: torch.Tensor | None = None):
        self.samples, self.pre, self.spec = list(samples), pre, spec
        self.seed, self.views, self.params = seed, views, params

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, epoch = key
        path, label = self.samples[index]
        k = view_index(self.seed, index, epoch, self.views)
        if self.params is not None:
            image, params = load_rgb(path), self.params[index, k]
        else:
            image, digest = read_image(path)
            params = sample_view(self.spec, digest, k, image.height, image.width)
        return apply_view(image, params, self.spec, self.pre), label, index, k


class ViewBatches(EpochBatches):
    """EpochBatches whose items are (sample index, epoch): the view is chosen by ViewImages from
    those and the run's seed, so it depends on neither worker, rank nor resume point."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in super().__iter__():
            yield [(index, self.epoch) for index, _ in batch]
