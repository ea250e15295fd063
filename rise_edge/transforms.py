"""Image preprocessing built from the student's `Preprocessing`, so it never drifts from the weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from rise_edge.student import Preprocessing

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


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


def train_transform(pre: Preprocessing, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """RISE's training augmentation: RandomResizedCrop(0.8-1), flip, ColorJitter(0.4 x4), grayscale 10%."""
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
