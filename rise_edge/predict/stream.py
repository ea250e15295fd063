"""The prediction loop: items in, one Prediction (top-k classes, probabilities) out per image, lazily.

    predictions = predict_run("runs/pacs", ["photos/", "clip.mp4"], top_k=3)
    for p in predictions:                     # batches of `batch` images, never the whole input
        print(p.source, p.classes[0], p.probabilities[0])
    predictions.images_per_s, predictions.skipped

Images are decoded and preprocessed by the code bench scores with (load_rgb, then
rise_edge.data.transforms.preprocess_images with the run's recorded preprocessing), so top-1 here
is bench's prediction for the same image and artefact. Top-k is ordered by logit (ties: the lower
class index, as arg-max breaks them), probabilities are the softmax of the logits.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rise_edge.logs import progress as progress_bar
from rise_edge.backends.base import Runner
from rise_edge.data.transforms import eval_transform, preprocess_images
from rise_edge.errors import UserError
from rise_edge.files import read_lock
from rise_edge.predict.engine import batch_limit, choose_artefact, load_artefact
from rise_edge.predict.sources import Item, ItemError, check_source, expand_sources
from rise_edge.run_dir import open_run

SKIP_HINT = "remove it, or skip unreadable images (--skip-bad-images; skip_bad=True in Python)"


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes (most likely first) and their softmax probabilities."""

    source: str                       # the file as found, or 'clip.mp4#frame=N'
    classes: list[str]
    probabilities: list[float]
    index: int                        # its position in the stream, from 0
    class_indices: list[int] = field(default_factory=list)  # the classes' indices in the run's list
    frame_time_s: float | None = None  # a video frame's timestamp


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) logits -> the k best class indices (N, k), by logit, ties to the lower index (so the
    first is arg-max's choice), and their softmax probabilities (N, k) float64."""
    logits = np.asarray(logits, dtype=np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    return order, np.take_along_axis(probabilities, order, axis=1)


class Predictions:
    """The stream predict_run returns: an iterator of one Prediction per image, made lazily (a
    second loop goes on where the first stopped, as with a file).

    `artefact`, `device`, `top_k` are known at once; `images`, `seconds` (decode, preprocessing and
    inference, not the time the caller spends between predictions), `images_per_s` and `skipped`
    ((source, why) of unreadable images left out) grow as it is consumed."""

    def __init__(self, items: Iterator[Item], runner: Runner, artefact: str,
                 transform: Callable[[Image.Image], Any], classes: tuple[str, ...], *, top_k: int,
                 batch: int, skip_bad: bool, progress: bool, warnings: list[str]):
        self.artefact = artefact
        self.device = runner.device
        self.top_k = min(top_k, len(classes))
        self.warnings = warnings
        self.images = 0
        self.seconds = 0.0
        self.skipped: list[tuple[str, str]] = []
        self._items, self._runner, self._transform = items, runner, transform
        self._classes, self._batch, self._skip_bad = classes, batch, skip_bad
        self._progress = progress
        self._stream: Iterator[Prediction] | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def __iter__(self) -> Iterator[Prediction]:
        return self

    def __next__(self) -> Prediction:
        # one stream, as a generator or a file: a second loop goes on where the first stopped
        if self._stream is None:
            self._stream = self._generate()
        return next(self._stream)

    def _batches(self) -> Iterator[list[tuple[Item, Image.Image]]]:
        """Readable items with their images, `batch` at a time; unreadable ones skipped or refused."""
        chunk: list[tuple[Item, Image.Image]] = []
        for item in self._items:
            try:
                chunk.append((item, item.image()))
            except ItemError as exc:
                if not self._skip_bad:
                    raise UserError(f"{item.source}: {exc}; {SKIP_HINT}") from None
                self.skipped.append((item.source, str(exc)))
                continue
            if len(chunk) == self._batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _generate(self) -> Iterator[Prediction]:
        bar = progress_bar(desc=f"predict ({self.artefact})", unit="img", enabled=self._progress)
        begin = time.perf_counter()
        try:
            for chunk in self._batches():
                images = preprocess_images(self._transform, (image for _, image in chunk))
                best, probabilities = top_k(self._runner(images), self.top_k)
                self.seconds += time.perf_counter() - begin
                bar.update(len(chunk))
                for (item, _), indices, probs in zip(chunk, best, probabilities):
                    yield Prediction(item.source, [self._classes[i] for i in indices],
                                     [float(p) for p in probs], self.images,
                                     [int(i) for i in indices], item.frame_time_s)
                    self.images += 1
                begin = time.perf_counter()  # the caller's time between predictions is not ours
            self.seconds += time.perf_counter() - begin
        finally:
            bar.close()
            # The runner goes with the stream: its memory back at once, and runtimes released in
            # the order they were made (one CPU plugin swaps the thread's signal stack on every
            # compile and release; released out of order, it left a freed one, and the next
            # signal, Ctrl-C included, crashed the process: found as a SIGSEGV in the test suite).
            self._runner = None  # type: ignore[assignment]
            gc.collect()
        if not self.images:
            raise UserError(f"none of the {len(self.skipped)} image(s) found could be read (all "
                            f"skipped: {self.skipped[0][0]}: {self.skipped[0][1]}, ...)")


def predict_run(run_dir: str | Path, sources: Iterable[str | Path], *, artefact: str | None = None,
                top_k: int = 5, batch: int = 32, skip_bad: bool = False, frame_step: int = 1,
                progress: bool = False) -> Predictions:
    """Classify every image of `sources` (files, folders, glob patterns, .txt lists, videos: see
    rise_edge.predict.sources) with one artefact of the run (None: export's recommended INT8, else
    ONNX FP32, else the PyTorch student), streamed in constant memory.

    The artefact is chosen, verified and loaded now (UserError: exit_code 2, or 3 for one this
    machine cannot run); the sources are read as the stream is consumed."""
    for value, name in ((top_k, "top_k"), (batch, "batch"), (frame_step, "frame_step")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]  # one path, not the characters of one
    if isinstance(sources, (list, tuple)):  # given whole: checked before anything loads
        if not sources:
            raise UserError("no SOURCE given; give images, folders, glob patterns, .txt lists or "
                            "videos")
        for source in sources:
            check_source(source)
    run = open_run(run_dir)
    with read_lock(run.path, "predict"):  # no export replaces the artefact while it is verified
        spec = choose_artefact(run, artefact)
        runner = load_artefact(run, spec)
    limit = batch_limit(spec)
    warnings = [*spec.warnings, *([runner.fallback] if getattr(runner, "fallback", None) else [])]
    return Predictions(expand_sources(sources, frame_step), runner, spec.name,
                       eval_transform(run.meta.preprocessing), run.meta.classes, top_k=top_k,
                       batch=min(batch, limit) if limit else batch, skip_bad=skip_bad,
                       progress=progress, warnings=warnings)
