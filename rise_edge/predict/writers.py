"""Where predictions go: terminal lines, CSV or JSON Lines, to stdout or to a file written whole.

    fmt = output_format(path, None)                 # from the suffix: .csv, .jsonl / .json-lines
    check_output(path, run_dir)                     # before anything runs
    with open_output(path, fmt, top_k) as write:    # a file is renamed into place at the end
        for p in predictions:
            write(p)

Formats (k = the top-k asked for, at most the number of classes):
  terminal  `SOURCE  class1 0.930  class2 0.041 ...`, one line per image
  csv       header `source,frame_time_s,class_1,probability_1,...,class_k,probability_k`
  jsonl     {"source", "index", "frame_time_s", "classes", "probabilities"} per line
A file is written under a temporary name beside it and renamed when the stream ends, so an error or
a kill never leaves half a file, and an existing file stays as it was until the new one is whole.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rise_edge.errors import UserError

FORMATS = ("terminal", "csv", "jsonl")
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl",
            ".txt": "terminal"}
DIGITS = 6  # probabilities in files: enough to tell 0.999999 from 1


def output_format(output: Path | None, fmt: str | None) -> str:
    """The format asked for (--format), else the output file's suffix's, else terminal."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"unknown output format '{fmt}'; formats: {', '.join(FORMATS)}")
        return fmt
    if output is None:
        return "terminal"
    found = SUFFIXES.get(output.suffix.lower())
    if found is None:
        raise UserError(f"--output {output}: cannot tell the format from its suffix "
                        f"'{output.suffix}'; name it .csv or .jsonl, or give --format "
                        f"{'|'.join(FORMATS)}")
    return found


def check_output(output: Path | None, run_dir: Path) -> None:
    """Refuse, before anything runs, an output that is a folder, lies in a missing folder, or lies
    inside the run directory (whose records predict must never write over)."""
    if output is None:
        return
    from rise_edge.files import check_destination

    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name such as "
                        f"{output / 'predictions.csv'}")
    if output.exists() and not output.is_file():
        # The output is written under a temporary name and renamed over the old one: over a
        # device or a pipe, that would replace the device or pipe itself.
        raise UserError(f"--output {output} exists and is not a regular file (a device, a pipe or "
                        "a socket), which predict would replace whole; give a file path, or leave "
                        "out --output and redirect the terminal output")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--output {output}: its folder {parent} does not exist; create it or "
                        "write elsewhere")
    check_destination(output, run_dir, command="rise-edge predict", writes="predictions",
                      reads="the run directory", given="--output",
                      fix="write the predictions outside the run directory", allow=("holds",))


def terminal_line(prediction: Any) -> str:
    """`SOURCE  class1 0.930  class2 0.041`: what a person reads."""
    ranked = "  ".join(f"{c} {p:.3f}" for c, p in zip(prediction.classes, prediction.probabilities))
    return f"{prediction.source}  {ranked}"


def _csv_writer(stream: TextIO, k: int) -> Callable[[Any], None]:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["source", "frame_time_s",
                     *(f"{name}_{rank}" for rank in range(1, k + 1)
                       for name in ("class", "probability"))])

    def write(p: Any) -> None:
        writer.writerow([p.source, "" if p.frame_time_s is None else p.frame_time_s,
                         *(v for c, prob in zip(p.classes, p.probabilities)
                           for v in (c, round(prob, DIGITS)))])
    return write


def _jsonl_writer(stream: TextIO) -> Callable[[Any], None]:
    def write(p: Any) -> None:
        stream.write(json.dumps({"source": p.source, "index": p.index,
                                 "frame_time_s": p.frame_time_s, "classes": list(p.classes),
                                 "probabilities": [round(x, DIGITS) for x in p.probabilities]})
                     + "\n")
    return write


def _terminal_writer(stream: TextIO) -> Callable[[Any], None]:
    if stream.isatty():  # lines above the progress bar, never through it
        from tqdm import tqdm

        return lambda p: tqdm.write(terminal_line(p), file=stream)
    return lambda p: stream.write(terminal_line(p) + "\n")


def writer_for(stream: TextIO, fmt: str, k: int) -> Callable[[Any], None]:
    """A function that writes one Prediction to `stream` in `fmt` (a CSV header first)."""
    if fmt == "csv":
        return _csv_writer(stream, k)
    if fmt == "jsonl":
        return _jsonl_writer(stream)
    return _terminal_writer(stream)


@contextmanager
def open_output(output: Path | None, fmt: str, k: int) -> Iterator[Callable[[Any], None]]:
    """A writer to stdout, or to `output` written whole: under a temporary name in its folder,
    renamed over `output` only when the block ends without an error."""
    if output is None:
        yield writer_for(sys.stdout, fmt, k)
        sys.stdout.flush()
        return
    from rise_edge.files import atomic_path

    with atomic_path(Path(os.path.abspath(output))) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as stream:
            yield writer_for(stream, fmt, k)
