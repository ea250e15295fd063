"""Ctrl-C while a program is still starting: one line and exit status 130, never a traceback.

Python's own handler raises KeyboardInterrupt wherever the signal lands, and a command spends its
first second importing (click, torch): the traceback would point into an import. A program's entry
calls `quiet_ctrl_c_while_starting()` before its imports and `ctrl_c_raises()` once its own
KeyboardInterrupt handling is in place. Libraries importing rise_edge are never affected: only the
`rise-edge` program and the sweep's worker processes call these.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

INTERRUPTED = 130


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("interrupted\n")
    # SystemExit, unlike KeyboardInterrupt, leaves the interpreter without a traceback; `finally`
    # blocks still run.
    raise SystemExit(INTERRUPTED)


def quiet_ctrl_c_while_starting() -> None:
    """Until `ctrl_c_raises()`, SIGINT exits 130 with one line. A SIGINT the parent set to be ignored
    (a job started with `&` by a script) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def ctrl_c_raises() -> None:
    """Give SIGINT back to Python's handler (KeyboardInterrupt) if `quiet_ctrl_c_while_starting` took it."""
    handler = signal.getsignal(signal.SIGINT)
    # By name: `python -m rise_edge.cli` runs this module's code under two module objects.
    if getattr(handler, "__name__", None) == _interrupted_while_starting.__name__:
        signal.signal(signal.SIGINT, signal.default_int_handler)
