"""What `rise-edge predict SOURCE...` reads: SOURCE arguments expanded lazily into a stream of items.

    for item in expand_sources(["photos/", "more/*.jpg", "list.txt", "clip.mp4"], frame_step=5):
        item.source, item.image()     # 'clip.mp4#frame=10', an RGB PIL image (or an ItemError)

A SOURCE is
  - an image file (any file that is not one of the kinds below; decoding decides if it is one);
  - a folder: its images (by suffix, rise_edge.data.domains.IMAGE_SUFFIXES) and videos, walked
    recursively in sorted path order; links to folders are not followed, other files are left out;
  - a glob pattern (quoted, so that the shell leaves it alone; `**` crosses folders): the image
    and video files it matches, in the order the file system lists them (a folder or a list gives
    a fixed order); folders it matches are not walked;
  - a `.txt` file: one path per line (relative to the list's folder; blank lines and lines starting
    with '#' are skipped), each an image, a folder or a video (not another list);
  - a video (.mp4 .avi .mov .mkv .webm): its frames, decoded one at a time with PyAV, every
    `frame_step`-th one, named `clip.mp4#frame=N` (N counts decoded frames from 0).

Nothing is listed ahead: one folder's entries at a time, one list line at a time, one frame at a
time, so memory does not grow with the input's length. A SOURCE that yields nothing is an error.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from rise_edge.data.domains import IMAGE_SUFFIXES, load_rgb
from rise_edge.errors import UserError, missing_extra

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
LIST_SUFFIX = ".txt"


class ItemError(Exception):
    """An item that cannot be read as an image (its message says why): skipped or refused."""


@dataclass
class Item:
    """One image to classify: a file (decoded when asked) or a video frame (decoded already)."""

    source: str                        # the path as found, or 'video#frame=N'
    path: str | None = None            # the file to decode; None for a frame or a bad item
    frame: Image.Image | None = None   # a video frame, RGB
    frame_time_s: float | None = None
    problem: str | None = None         # why it cannot be read (found while listing or decoding)

    def image(self) -> Image.Image:
        """The RGB image, fully decoded as the data rules decode (rise_edge.data.image_checks):
        a truncated file or one past PIL's decompression-bomb limit raises ItemError."""
        if self.problem is not None:
            raise ItemError(self.problem)
        if self.frame is not None:
            return self.frame
        try:
            return load_rgb(self.path)
        except Exception as exc:  # PIL raises many types for corrupt files (as image_checks says)
            raise ItemError(f"not a readable image ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _walk(folder: str) -> Iterator[str]:
    """Image and video files under `folder`, in sorted path order (by parts), one folder's
    entries in memory at a time; links to folders are not followed, dangling links left out."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except PermissionError:
        raise UserError(f"cannot read folder {folder}: permission denied") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        elif _suffix(entry.name) in IMAGE_SUFFIXES | VIDEO_SUFFIXES and entry.is_file():
            yield entry.path


def _frames(path: str, frame_step: int) -> Iterator[Item]:
    """Every frame_step-th frame of a video, decoded one at a time (PyAV: FFmpeg's decoders)."""
    try:
        import av
    except ImportError:
        raise missing_extra("av", "video", f"reading video {path}") from None
    try:
        container = av.open(path)
    except Exception as exc:  # av.error.*: not a video FFmpeg can open
        yield Item(path, problem=f"not a readable video ({type(exc).__name__}: {exc})")
        return
    with container:
        if not container.streams.video:
            yield Item(path, problem="holds no video stream")
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's own frame threads: frames still arrive one by one
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % frame_step == 0:
                    # rgb24 through FFmpeg's scaler: an RGB image, as load_rgb gives for a file
                    yield Item(f"{path}#frame={index}", frame=frame.to_image(),
                               frame_time_s=None if frame.time is None else float(frame.time))
        except Exception as exc:  # a damaged stream: the frames before it stand
            yield Item(f"{path}#frame={index + 1}", problem=f"cannot decode ({type(exc).__name__}: "
                                                            f"{exc})")


def _list_lines(path: str) -> Iterator[str]:
    """The paths a .txt list names, read one line at a time, relative ones from the list's folder."""
    base = os.path.dirname(path)
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read list {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            for line in handle:
                text = line.strip()
                if text and not text.startswith("#"):
                    yield text if os.path.isabs(text) else os.path.join(base, text)
        except UnicodeDecodeError:
            raise UserError(f"list {path} is not UTF-8 text; give one path per line") from None


def _one(path: str, frame_step: int, *, listed_in: str | None = None) -> Iterator[Item]:
    """The items of one path found inside a folder, a glob or a list."""
    suffix = _suffix(path)
    if os.path.isdir(path):
        yield from _counted(_folder(path, frame_step), f"folder {path}")
    elif suffix in VIDEO_SUFFIXES and os.path.isfile(path):
        yield from _frames(path, frame_step)
    elif listed_in is not None and not os.path.exists(path):
        yield Item(path, problem=f"no such file (listed in {listed_in})")
    elif listed_in is not None and suffix == LIST_SUFFIX:
        yield Item(path, problem=f"a list inside the list {listed_in}: lists do not nest")
    else:
        yield Item(path, path=path)


def _folder(folder: str, frame_step: int) -> Iterator[Item]:
    for path in _walk(folder):
        yield from _one(path, frame_step)


def _counted(items: Iterable[Item], what: str) -> Iterator[Item]:
    """`items`, refusing with one line a source that turns out to hold no image."""
    found = False
    for item in items:
        found = True
        yield item
    if not found:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        raise UserError(f"{what} holds no images or videos ({kinds}); give a folder, file or list "
                        "that does")


def check_source(source: str | os.PathLike[str]) -> None:
    """Refuse, before anything runs, a SOURCE that is neither a path that exists nor a glob."""
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"a SOURCE must be a path or a glob pattern, got {type(source).__name__}")
    text = os.fspath(source)
    if not text:
        raise UserError("an empty SOURCE was given; give an image, folder, glob, .txt list or video")
    if not os.path.exists(text) and not glob.has_magic(text):
        raise UserError(f"SOURCE {text}: no such file or folder (and not a glob pattern); give an "
                        "image, a folder, a quoted glob such as 'photos/**/*.jpg', a .txt list of "
                        "paths or a video")


def _source(text: str, frame_step: int) -> Iterator[Item]:
    if os.path.isdir(text):
        yield from _counted(_folder(text, frame_step), f"folder {text}")
    elif os.path.isfile(text) and _suffix(text) == LIST_SUFFIX:
        yield from _counted((item for line in _list_lines(text)
                             for item in _one(line, frame_step, listed_in=text)), f"list {text}")
    elif os.path.exists(text):
        yield from _one(text, frame_step)
    else:
        # iglob yields matches as it walks (sorting them would hold them all); folders it matches
        # are not walked, or 'photos/**' would give every file twice
        matches = (m for m in glob.iglob(text, recursive=True)
                   if _suffix(m) in IMAGE_SUFFIXES | VIDEO_SUFFIXES and os.path.isfile(m))
        yield from _counted((item for m in matches for item in _one(m, frame_step)),
                            f"glob pattern {text!r}")


def expand_sources(sources: Iterable[Any], frame_step: int = 1) -> Iterator[Item]:
    """Every item of `sources` (paths or glob patterns, str or Path), lazily and in order."""
    if frame_step < 1:
        raise UserError(f"frame step must be a positive integer, got {frame_step}")
    for source in sources:
        check_source(source)
        yield from _source(os.fspath(source), frame_step)
