"""The student's preprocessing (`Preprocessing`: size, mean, std, interpolation) and the image
transforms built from it, so they never drift from the weights it travels with."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for the student: square resize to input_size, then normalise."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(int(data["input_size"]), tuple(data["mean"]), tuple(data["std"]),
                   str(data.get("interpolation", "bilinear")))


def _interpolation(pre: Preprocessing) -> T.InterpolationMode:
    return _INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)


def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Test-time: square resize to input_size (as the RISE code does), to tensor, normalise.

    Output: (3, input_size, input_size) float32.
    """
    return T.Compose([
        T.Resize((pre.input_size, pre.input_size), interpolation=_interpolation(pre), antialias=True),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def preprocess_images(transform: Callable[[Image.Image], torch.Tensor],
                      images: Iterable[Image.Image]) -> np.ndarray:
    """RGB images -> the (N, 3, S, S) float32 batch every runner takes, by `transform` (eval_transform).

    The one per-image path of bench's accuracy pass and of predict, so the two cannot differ. Runs
    with one torch thread, as in a data-loader worker: the transform's tensor ops are tiny, and on
    a busy machine a second OpenMP thread waiting for a core made them 20x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return np.stack([transform(image).numpy() for image in images])
    finally:
        torch.set_num_threads(threads)


def train_transform(pre: Preprocessing, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """RISE's training augmentation: RandomResizedCrop(0.8-1), flip, ColorJitter(0.4 x4), grayscale 10%,
    drawn from torch's random stream (QAT fine-tuning). Training draws the same augmentation as
    parameters seeded by each image and view (rise_edge.data.views), so that views can be cached."""
    if not augment:
        return eval_transform(pre)
    return T.Compose([
        T.RandomResizedCrop(pre.input_size, scale=(0.8, 1.0), interpolation=_interpolation(pre),
                            antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomGrayscale(0.1),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
