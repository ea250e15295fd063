"""rise-edge's messages and progress bars: one path for both.

Every message goes to Python's `logging`, under the `rise_edge` logger (one child per stage:
`rise_edge.train`, `rise_edge.bench`, ...). The command line shows INFO and above on stderr as bare
lines; `rise-edge --quiet` shows warnings and errors only, `--verbose` debug lines too, and
`--log-file FILE` also writes every message, time-stamped, to FILE. A program using the Python API
configures logging as it likes: `logging.basicConfig(level=logging.INFO)` shows the same lines.
Library code never prints (tests/test_layout.py checks).

Progress bars are tqdm's where stderr is a terminal. Where it is not (a file, a pipe, CI), a bar
steps down to one INFO line every `RISE_EDGE_PROGRESS_S` seconds (default 30) and one at its end
(work shorter than that writes none), so a captured log holds lines, not redraws: the demo's log, redirected to a file, was 330 kB of
redraws for a 7-minute run.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

NAME = "rise_edge"
PROGRESS_ENV = "RISE_EDGE_PROGRESS_S"
_bars_hidden = False  # set by configure(): --quiet hides progress with the INFO lines


def logger(stage: str | None = None) -> logging.Logger:
    """The `rise_edge` logger, or its child for one stage (`logger("bench")`)."""
    return logging.getLogger(NAME if stage is None else f"{NAME}.{stage}")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever sys.stderr is when a line is emitted (a test runner or a
    redirect may swap it after the handler was made)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # logging.StreamHandler sets it once; ignored
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # Above a running progress bar, not into it.
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's own contract: a handler never raises)
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """--log-file's handler: a file that cannot be written (a full disk, a device that refuses,
    a folder gone) is said once, in one line, and left; the command goes on, its messages on
    stderr. logging's default would print a traceback for every message."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        why = getattr(error, "strerror", None) or error
        tqdm.write(f"warning: --log-file {self.baseFilename}: {why}; messages go to stderr only "
                   "from here", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)


def configure(level: int = logging.INFO, log_file: Path | None = None) -> None:
    """The command line's logging: bare lines on stderr from `level` up, and with `log_file` every
    message (debug included), time-stamped, appended to that file. Called once per command."""
    global _bars_hidden
    root = logger()
    for handler in list(root.handlers):
        if getattr(handler, "_rise_edge", False):
            root.removeHandler(handler)
            handler.close()
    console = _Stderr()
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        to_file = _LogFile(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    for handler in handlers:
        handler._rise_edge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(min(level, logging.DEBUG if log_file is not None else level))
    # The command owns its output: a library that configured the root logger (some do, on import)
    # would otherwise print every rise-edge line a second time, in its own format.
    root.propagate = False
    _bars_hidden = level > logging.INFO


def stage_lines(stage: str, label: str, enabled: bool = True) -> Callable[[str], None]:
    """A stage's progress lines, `[label] message` at INFO on `rise_edge.<stage>`, or nothing when
    not `enabled` (the commands' --quiet)."""
    log = logger(stage)
    return (lambda message: log.info(f"[{label}] {message}")) if enabled else (lambda message: None)


def configure_once() -> None:
    """configure() with the defaults, unless this process configured rise-edge's logging already
    (a sweep's worker process or SLURM job: its stderr is the run's log)."""
    if not any(getattr(h, "_rise_edge", False) for h in logger().handlers):
        configure()


def interval_s() -> float:
    """Seconds between the progress lines a bar writes where stderr is not a terminal."""
    text = os.environ.get(PROGRESS_ENV, "")
    try:
        value = float(text) if text else 30.0
    except ValueError:
        value = 30.0
    return value if math.isfinite(value) and value >= 0 else 30.0


def progress(iterable: Iterable[Any] | None = None, *, enabled: bool = True,
             **kwargs: Any) -> Any:
    """A progress bar with tqdm's interface (update, set_postfix, write, close, iteration, `with`):
    tqdm itself on a terminal, periodic INFO lines elsewhere, nothing when not `enabled` or under
    `--quiet`."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if not enabled or _bars_hidden:
        return tqdm(iterable, disable=True, **kwargs)
    stream = kwargs["file"]
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


class LineProgress:
    """tqdm's interface for output that is not a terminal: a line every interval_s() and one at
    the end (`desc: n/total unit (rate/s) postfix`), through the `rise_edge.progress` logger."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str | None = None, unit: str = "it", initial: float = 0, **_: Any):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, initial, ""
        self._start_n, self._started = initial, time.monotonic()
        self._last, self._closed = self._started, False
        self._every = interval_s()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress made without an iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> None:
        seconds = max(time.monotonic() - self._started, 1e-9)
        done = f"{self.n:g}" + (f"/{self.total:g}" if self.total else "")
        rate = (self.n - self._start_n) / seconds
        logger("progress").info(f"{self.desc}: {done} {self.unit} in {seconds:.0f} s "
                                f"({rate:.3g} {self.unit}/s){self.postfix}")

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._line()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = (", " + ", ".join(f"{k}={v}" for k, v in items.items())) if items else ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    @staticmethod
    def write(text: str, file: TextIO | None = None, end: str = "\n") -> None:
        tqdm.write(text, file=file, end=end)

    def close(self) -> None:
        # A closing line only for work long enough to have earned a periodic one: a bar that
        # finished within the interval stays silent, as it would have on a terminal after `leave`.
        if not self._closed:
            self._closed = True
            if self.n > self._start_n and time.monotonic() - self._started >= self._every:
                self._line()
