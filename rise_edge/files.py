"""Files rise-edge writes and trusts: atomic writes (a kill never leaves half a file), sha256 of a
file's bytes, the cache folder with its content keys, and the lock a command holds on its folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rise_edge.errors import UserError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """$RISE_EDGE_CACHE, else ~/.cache/rise-edge."""
    return Path(os.environ.get("RISE_EDGE_CACHE", "~/.cache/rise-edge")).expanduser()


def cache_key(**parts: Any) -> str:
    """A sha256 (hex) over named JSON-able parts, key order ignored: what cached things are named by."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Written first into every run directory train makes: a folder without it (and without a trained
# student from before the marker existed) is not rise-edge's to write into or clean.
RUN_MARKER = ".rise-edge-run"


def is_run_directory(folder: Path) -> bool:
    """True for a run directory rise-edge made: its marker, or (runs from before the marker) a
    student or resume state file."""
    folder = Path(folder)
    return any((folder / name).is_file()
               for name in (RUN_MARKER, "student.safetensors", "resume.safetensors"))


@contextmanager
def exclusive_lock(path: Path, *, busy: Callable[[int], None] | None = None) -> Iterator[int]:
    """An exclusive flock on the file `path` (made, with its folder, when missing) for the block;
    yields the lock file's descriptor. The kernel releases it when the process ends, kill -9
    included. When another process holds it, `busy(fd)` is called first: it raises to refuse, or
    returns (after saying so) to wait for the holder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                busy(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run_lock(run_dir: Path, command: str, *, noun: str = "run directory", clean: bool = True
             ) -> Iterator[None]:
    """Own a run directory for the duration of one command: a second train, export or bench on the
    same run stops with a UserError naming the holder instead of mixing its files with ours.

    The lock is an flock on `.<name>.rise-edge.lock` beside the run directory (so a failed start
    leaves no run directory behind); the kernel releases it when the process ends, kill -9 included,
    so a crash never leaves a run locked. With `clean`, the temporaries a killed command left in
    the run directory are removed once the lock is held (a folder holding other lockable run
    directories, like the demo's, passes clean=False: their own locks clean them).
    """
    # Absolute, so that the lock of '.' (or of 'runs/..') lies beside the folder, never inside it.
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a {noun}; choose another path")
    parent = run_dir.parent

    def refuse(fd: int) -> None:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        raise UserError(f"{run_dir} is in use by {holder}; wait for it to finish or use another "
                        f"{noun}")

    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(exclusive_lock(parent / f".{run_dir.name}.rise-edge.lock",
                                                    busy=refuse))
        except OSError as exc:
            raise UserError(f"cannot use {run_dir}: {exc.strerror or exc} "
                            f"({exc.filename or parent}); choose a writable folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"rise-edge {command} (pid {os.getpid()})".encode(), 0)
        if clean and is_run_directory(run_dir):  # never in a folder of the user's own
            remove_leftovers(run_dir)
        yield


# What a command killed with -9 leaves behind: atomic_path's temporaries, export's work folders,
# calibration's range folders. Only the lock's holder removes them: no live process owns them then.
LEFTOVER_PATTERNS = (".*.tmp", ".work-*", ".ranges.*")


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files and folders a killed command left in `run_dir`; return them."""
    if not run_dir.is_dir():
        return []
    found = {p for pattern in LEFTOVER_PATTERNS for p in run_dir.rglob(pattern)}
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts)):  # parents first
        if not path.exists() and not path.is_symlink():
            continue  # inside a folder removed just before
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
