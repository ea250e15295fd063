"""The stress set: the judge's own source validation images, moved away from the sources the way unseen
domains move (never a target image), on which every INT8 model is measured beside the clean ones.

A budget on clean source images bounds what it measures and no more: an INT8 model that met it lost
3.2 points on an unseen sketch domain. INT8's rounding hurts most where activations leave the ranges
calibration saw, and that is what a domain shift does to them. Each judge image gets one of four
shifts, in turn (so the set is as large as the clean one and costs one more pass per model):

    grayscale      colour gone (sketches, infrared, old photographs)
    line drawing   edges only, dark on white (sketches, clipart outlines)
    posterised     few colours, strong saturation (cartoons, clipart, paintings)
    blurred        Gaussian blur, radius 2 px (defocus, low-resolution cameras)

Chosen from the domains the data sets rise-edge knows hold out (PACS sketch and cartoon, DomainNet
clipart, quickdraw and infograph, OfficeHome clipart, TerraIncognita's infrared night images). Whether
the stress drop predicts the unseen drop better than the clean drop is measured, not assumed
(docs/export.md says where that stands); until then it is reported, and decides nothing.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from rise_edge.data.domains import load_rgb
from rise_edge.data.transforms import Preprocessing, eval_transform


def _grayscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _line_drawing(image: Image.Image) -> Image.Image:
    edges = ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES)
    return ImageOps.invert(ImageOps.autocontrast(edges)).convert("RGB")


def _posterised(image: Image.Image) -> Image.Image:
    return ImageEnhance.Color(ImageOps.posterize(image, 2)).enhance(2.0)


def _blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=2))


SHIFTS: tuple[tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("grayscale", _grayscale), ("line drawing", _line_drawing), ("posterised", _posterised),
    ("blurred", _blurred))


def shift_of(index: int) -> str:
    """The name of the shift image `index` of a domain's judge images gets."""
    return SHIFTS[index % len(SHIFTS)][0]


def load_stressed(paths: Sequence[str | Path], preprocessing: Preprocessing, workers: int = 0
                  ) -> np.ndarray:
    """Images shifted in turn (image i gets SHIFTS[i % 4]) and preprocessed as at inference ->
    (N, 3, S, S) float32."""
    transform = eval_transform(preprocessing)

    def one(item: tuple[int, str | Path]) -> np.ndarray:
        index, path = item
        return transform(SHIFTS[index % len(SHIFTS)][1](load_rgb(path))).numpy()

    size = preprocessing.input_size
    if not paths:
        return np.zeros((0, 3, size, size), np.float32)
    with concurrent.futures.ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, enumerate(paths)))).astype(np.float32, copy=False)
