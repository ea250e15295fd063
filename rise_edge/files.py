"""Files rise-edge writes and trusts: atomic writes (a kill never leaves half a file), sha256 of a
file's bytes, the cache folder with its content keys, the lock a command holds on its folder, and the
one checked reader of what it wrote (JSON records field by field, JSON lines, text lists,
safetensors), whose every complaint names the file and the field and says what fixes it."""

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

from rise_edge.errors import DamagedFile, UserError


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


# ---------------------------------------------------------------------------------------------------
# Reading back what rise-edge wrote: every reader of a record, a list or a tensors file goes through
# these, so a damaged or hand-changed file is one line (DamagedFile) that names the file and the
# field, says what was expected and what fixes it, instead of a traceback or a silent wrong result.

_MISSING: Any = object()


def _shown(value: Any) -> str:
    """A field's value as a message shows it: its repr, cut short; 'nothing' for a missing one."""
    if value is _MISSING:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_plain_file_name(text: Any) -> bool:
    """True for the name of a file inside a folder: no folder part, not '.' or '..', not absolute,
    no NUL byte. What records that name a file beside them must hold."""
    return (isinstance(text, str) and text not in ("", ".", "..") and "\0" not in text
            and "/" not in text and "\\" not in text and Path(text).name == text)


def file_in_folder(folder: Path, name: Any, record: Path, field: str, fix: str) -> Path:
    """`folder`/`name`, where a record (`record`, its `field`) names a file kept beside it; never a
    path that leads elsewhere (another folder, an absolute path): DamagedFile naming the field."""
    if not is_plain_file_name(name):
        raise DamagedFile(f"{record}: {field} must be the name of a file in {folder.name}/, got "
                          f"{_shown(name)}; it was changed by hand or damaged, and rise-edge never "
                          f"opens a file outside that folder for it: {fix}")
    return folder / name


class Record:
    """A JSON object read back from `path` (or a part of one, `prefix` naming where), with typed
    accessors: each returns the field's value or raises DamagedFile naming the file, the field, what
    it must be and what it held, and ending with `fix` (what the user can do: re-export, re-train...).

    A field is a key, or a tuple of keys into nested objects: ("accuracy", "val_mean")."""

    def __init__(self, path: Path, data: Any, fix: str, prefix: str = "") -> None:
        self.path, self.fix, self.prefix = Path(path), fix, prefix
        if not isinstance(data, dict):
            raise DamagedFile(f"{self.path}: {prefix.rstrip('.') or 'its content'} must be a JSON "
                              f"object, got {_shown(data)}; it was changed by hand or damaged; {fix}")
        self.data: dict[str, Any] = data

    def name(self, field: str | tuple[str, ...]) -> str:
        return self.prefix + (".".join(field) if isinstance(field, tuple) else field)

    def raw(self, field: str | tuple[str, ...], default: Any = None) -> Any:
        """The field's value unchecked (`default` when missing)."""
        value: Any = self.data
        for key in field if isinstance(field, tuple) else (field,):
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    def has(self, field: str | tuple[str, ...]) -> bool:
        return self.raw(field, _MISSING) is not _MISSING

    def damaged(self, field: str | tuple[str, ...], expected: str) -> DamagedFile:
        """The error for a field that is not `expected` (a phrase: 'a number from 0 to 1')."""
        return DamagedFile(f"{self.path}: {self.name(field)} must be {expected}, got "
                           f"{_shown(self.raw(field, _MISSING))}; it was changed by hand or damaged; "
                           f"{self.fix}")

    def _get(self, field: str | tuple[str, ...], optional: bool, expected: str) -> Any:
        value = self.raw(field, _MISSING)
        if value is _MISSING or (value is None and optional):
            if optional:
                return _MISSING
            raise self.damaged(field, expected)
        return value

    def mapping(self, field: str | tuple[str, ...], *, optional: bool = False) -> Record | None:
        """A nested object, as a Record whose messages name the whole path to its fields."""
        value = self._get(field, optional, "a JSON object")
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise self.damaged(field, "a JSON object")
        return Record(self.path, value, self.fix, self.name(field) + ".")

    def records(self, field: str | tuple[str, ...], *, optional: bool = False) -> dict[str, Record]:
        """An object of objects (name -> record), each a Record."""
        outer = self.mapping(field, optional=optional)
        if outer is None:
            return {}
        return {key: outer.mapping(key) for key in outer.data}  # type: ignore[misc]

    def rows(self, field: str | tuple[str, ...], *, optional: bool = False) -> list[Record]:
        """A list of objects, each a Record ('rows.3.' in messages)."""
        value = self._get(field, optional, "a list of JSON objects")
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.damaged(field, "a list of JSON objects")
        return [Record(self.path, v, self.fix, f"{self.name(field)}.{i}.") for i, v in enumerate(value)]

    def string(self, field: str | tuple[str, ...], *, optional: bool = False,
               choices: tuple[str, ...] | None = None, expected: str | None = None) -> str | None:
        """A string (non-empty, without NUL bytes); one of `choices` when given."""
        want = expected or ("one of " + ", ".join(choices) if choices else "a non-empty string")
        value = self._get(field, optional, want)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value or "\0" in value or (
                choices is not None and value not in choices):
            raise self.damaged(field, want)
        return value

    def file_name(self, field: str | tuple[str, ...], *, optional: bool = False,
                  folder: str = "its folder") -> str | None:
        """The name of a file inside `folder` (never a path that leads out of it)."""
        want = f"the name of a file in {folder} (no folder part, not absolute)"
        value = self._get(field, optional, want)
        if value is _MISSING:
            return None
        if not is_plain_file_name(value):
            raise self.damaged(field, want)
        return value

    def sha256(self, field: str | tuple[str, ...], *, optional: bool = False) -> str | None:
        """A sha256 as export and adapt record them: 64 lower-case hexadecimal digits."""
        import re

        value = self._get(field, optional, "64 hexadecimal digits")
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise self.damaged(field, "64 hexadecimal digits")
        return value

    def number(self, field: str | tuple[str, ...], *, low: float | None = None,
               high: float | None = None, integer: bool = False, optional: bool = False
               ) -> float | int | None:
        """A finite number (an integer when `integer`) within [low, high] where given."""
        import math

        kind = "an integer" if integer else "a number"
        bounds = (f" from {low:g} to {high:g}" if low is not None and high is not None else
                  f" of at least {low:g}" if low is not None else
                  f" of at most {high:g}" if high is not None else "")
        want = f"{kind}{bounds}"
        value = self._get(field, optional, want)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (integer and not isinstance(value, int)) or (low is not None and value < low) \
                or (high is not None and value > high):
            raise self.damaged(field, want)
        return value

    def strings(self, field: str | tuple[str, ...], *, optional: bool = False) -> list[str] | None:
        """A list of non-empty strings."""
        want = "a list of non-empty strings"
        value = self._get(field, optional, want)
        if value is _MISSING:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v
                                                  for v in value):
            raise self.damaged(field, want)
        return value

    def integers(self, field: str | tuple[str, ...], *, low: int | None = None,
                 optional: bool = False) -> list[int] | None:
        """A non-empty list of integers, each at least `low` where given."""
        want = "a non-empty list of integers" + (f" of at least {low}" if low is not None else "")
        value = self._get(field, optional, want)
        if value is _MISSING:
            return None
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)
                for v in value):
            raise self.damaged(field, want)
        return value


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise DamagedFile(f"{path} is a folder where rise-edge keeps a file; {fix}") from None
    except OSError as exc:
        raise DamagedFile(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None


def decode_text(data: bytes, path: Path, fix: str) -> str:
    """`data` as UTF-8 text (what rise-edge writes), or one line saying where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}): it was damaged or replaced; {fix}") from None


def parse_json_record(text: str, path: Path, fix: str, where: str = "") -> Record:
    """A JSON object from `text` (the file's content, or the line `where` names), as a Record."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{path}{where} is not JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}): it was cut short, damaged or changed by hand; {fix}"
                          ) from None
    except RecursionError:  # nesting deeper than the parser goes: no record rise-edge writes
        raise DamagedFile(f"{path}{where} is nested too deeply to be a record rise-edge wrote; {fix}"
                          ) from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}{where} holds {type(data).__name__} {_shown(data)} where rise-edge "
                          f"writes a JSON object: it was changed by hand or damaged; {fix}")
    return Record(path, data, fix)


def read_json_record(path: str | Path, fix: str, *, missing_ok: bool = False) -> Record | None:
    """The JSON object rise-edge wrote at `path`, checked to be UTF-8 JSON holding an object; None
    for a missing file when `missing_ok`. Fields are then read through the Record's accessors."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        if missing_ok:
            return None
        raise UserError(f"{path} not found; {fix}")
    return parse_json_record(decode_text(_read_bytes(path, fix), path, fix), path, fix)


def read_jsonl_records(path: str | Path, fix: str, *, torn_tail_ok: bool = False) -> list[Record]:
    """Every line of a JSON-lines log (metrics.jsonl) as a Record; [] for a missing file. With
    `torn_tail_ok`, a last line that is not JSON (cut by a kill mid-write) is dropped; a damaged
    line anywhere else is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    text = decode_text(_read_bytes(path, fix), path, fix)
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = parse_json_record(line, path, fix, f": line {number}")
            found.append(Record(path, entry.data, fix, f"line {number}: "))
        except DamagedFile:
            # Each line is written whole with its newline: only a last line without one was cut.
            if torn_tail_ok and number == len(lines) and not text.endswith("\n"):
                break
            raise
    return found


def read_text_lines(path: str | Path, fix: str) -> list[str]:
    """A text file's lines (a split list), checked to be UTF-8 text without NUL bytes."""
    path = Path(path)
    text = decode_text(_read_bytes(path, fix), path, fix)
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise DamagedFile(f"{path}:{line} holds a NUL byte: it is not a text file (damaged?); {fix}")
    return text.splitlines()


def read_safetensors(path: str | Path, fix: str, *,
                     expect: dict[str, tuple[int | None, ...]] | None = None,
                     finite: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, checked: readable whole, and with `expect`
    holding each named tensor with that many dimensions of those sizes (None: any size); with
    `finite`, no NaN or infinity in its floating-point tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DamagedFile(f"{path} is not a readable safetensors file "
                          f"({' '.join(str(exc).split())[:200]}): it was cut short or damaged; "
                          f"{fix}") from None
    for name, shape in (expect or {}).items():
        if name not in tensors:
            raise DamagedFile(f"{path} holds no tensor '{name}' (it holds "
                              f"{', '.join(sorted(tensors)[:6]) or 'none'}); it is not the file "
                              f"rise-edge wrote; {fix}")
        found = tuple(tensors[name].shape)
        if len(found) != len(shape) or any(w is not None and w != n for w, n in zip(shape, found)):
            wanted = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
            raise DamagedFile(f"{path}: tensor '{name}' has shape {found}, expected {wanted}; it "
                              f"was changed or belongs to another run; {fix}")
    if finite:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise DamagedFile(f"{path}: tensor '{name}' holds NaN or infinite values; it was "
                                  f"damaged; {fix}")
    return tensors, header


def check_safetensors(path: str | Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header alone (cheap for a large file):
    DamagedFile when it is cut short or is not a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DamagedFile(f"{path} is not a readable safetensors file "
                          f"({' '.join(str(exc).split())[:200]}): it was cut short or damaged; "
                          f"{fix}") from None


# ---------------------------------------------------------------------------------------------------
# Writers beside what a command only reads: where they may write, the lock a reader takes, copies
# and groups of files written whole, and the path a failed write is about.


def _real(path: str | Path) -> Path:
    """`path` absolute with '..' and symlinks resolved (its missing tail kept as written)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def path_relation(dest: str | Path, source: str | Path) -> str | None:
    """How `dest` lies against `source`, symlinks and '..' resolved: 'is' (the same folder),
    'inside' (within it), 'holds' (an ancestor of it), or None when they are apart."""
    d, s = _real(dest), _real(source)
    if d == s:
        return "is"
    if d.is_relative_to(s):
        return "inside"
    if s.is_relative_to(d):
        return "holds"
    return None


def check_destination(dest: str | Path, source: str | Path, *, command: str, writes: str,
                      reads: str, given: str | None, fix: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is written, a destination that is, lies inside or holds `source`,
    which `command` only reads (the one check every writer makes against what it reads).

    writes: what would be written there ('the adapted run'); reads: what `source` is ('the parent
    run'); given: the option that chose `dest` ('--run-dir'), None for a default place; fix: what
    to do instead; allow: the relations that are harmless for this writer (path_relation's words).
    """
    relation = path_relation(dest, source)
    if relation is None or relation in allow:
        return
    where = {"is": "is", "inside": "lies inside", "holds": "holds"}[relation]
    named = f"{given} {dest}" if given else str(dest)
    raise UserError(f"{named} {where} {reads} {_real(source)}, which {command} only reads: writing "
                    f"{writes} there would change it; nothing was written: {fix}")


@contextmanager
def read_lock(run_dir: str | Path, command: str, *, noun: str = "run directory") -> Iterator[None]:
    """Read a run directory while no command writes it: a shared flock on the lock file run_lock
    uses, so a train, export or bench on the run stops a reader (and is stopped by one), while
    readers never stop each other. A reader needs no write access: where the lock file cannot be
    made (a read-only folder), no writer can take it either, and the run is read without one."""
    import fcntl

    run_dir = Path(os.path.abspath(run_dir))
    path = run_dir.parent / f".{run_dir.name}.rise-edge.lock"
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY)  # flock needs no write access
        except OSError:  # no lock file and none can be made here: no writer holds one
            yield
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}; wait for it to finish, then run "
                            f"this again (rise-edge {command} only reads this {noun})") from None
        if writable:  # so that a writer refused by this reader can name it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"rise-edge {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)


def copy_for_write(source: Path, dest: Path) -> None:
    """Copy the file or folder tree `source` to `dest`. A failure raises the OSError itself with
    `dest`'s file as its filename (shutil names the source for a full disk, and copytree folds
    errors into a list of both paths): a message then names where the write failed."""
    if source.is_dir():  # a link to a folder is copied as the folder (as copytree does)
        try:
            dest.mkdir()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(dest)) from None
        for entry in sorted(source.iterdir()):
            copy_for_write(entry, dest / entry.name)
        return
    try:
        shutil.copy2(source, dest)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(dest)) from None


@contextmanager
def atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """Temporary paths beside each of `paths`; every one is renamed over its path only if the
    whole block succeeds, so a group of files (a report's) is replaced all together or not at all:
    a failure leaves each file as it was and no temporary behind."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def written_path(exc: OSError) -> str | None:
    """The file a failed write was writing: the destination of a copy or rename (shutil and
    os.rename name the source first), and for a temporary that atomic_path made, the file it
    stands for; None when the error names no file."""
    import errno
    import re

    name = exc.filename
    if exc.filename2 is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                                                   errno.EROFS):
        name = exc.filename2  # space or a read-only disk: the side being written
    if name is None:
        return None
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name)
    match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", os.path.basename(text))
    return os.path.join(os.path.dirname(text), match.group(1)) if match else text


def write_failure(exc: OSError, what: str, dest: Path, work: Path | None, elsewhere: str) -> str:
    """One line for a failed all-or-nothing write of `what` (the adapted run, the bundle) at
    `dest`, assembled in the work folder `work`: names `dest` and the file in it being written,
    never the source of a copy (which a full disk names otherwise), and what to do (`elsewhere`:
    how to choose another place, as the user chose this one)."""
    import errno

    failed = written_path(exc)
    part = ""
    if failed is not None and work is not None and Path(failed).is_relative_to(work) \
            and Path(failed) != work:
        part = f" (writing {Path(failed).relative_to(work).as_posix()})"
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    fix = (f"free space on the disk that holds {dest.parent}" if full else
           f"check that {dest.parent} is writable")
    return (f"cannot write {what} {dest}: {exc.strerror or exc}{part}; nothing was kept and "
            f"nothing else changed: {fix}, or {elsewhere}")
