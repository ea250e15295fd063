"""The image check, once per file: every image is fully decoded before training (truncation shows only
on decode), and a record of what was found lets the next start decode only new or changed files.

A file is the same file while its identity is: size, mtime_ns, ctime_ns and inode (`os.stat`).
- size and mtime catch ordinary edits and truncation;
- ctime catches a rewrite that put the old mtime back (`touch -d`, `cp -p`, `rsync -t`, tar): no
  program can set ctime, every write or rename sets it to now;
- the inode catches a file replaced by another (an atomic rename, a fresh copy), whatever its times.
A content hash would cost about what a decode costs (every byte read), so it is not used.
Timestamps can be coarse (1 s on ext3 and some network file systems, 2 s on FAT): a file rewritten
with the same size within one tick of the stat that recorded it would look unchanged. So an image
whose ctime is less than RACY_NS before its check is decoded but not recorded (as git treats a
"racily clean" index entry): the next start decodes it again.

Records live outside the data root, which may be read-only: one per data set folder, in
$RISE_EDGE_IMAGE_CHECKS (default: <cache>/image-checks/), named after the folder and a hash of its
resolved path. The file is a header line (schema, folder, decoder, entry count, sha256 of the body)
and a body line (relative path -> [size, mtime_ns, ctime_ns, inode, problem]; problem '' = readable).
A record that fails any check (digest, schema, shape) is never trusted: one line says so and every
image is decoded again. Readers take no lock (records are replaced by an atomic rename); a writer
holds an flock on `<record>.lock`, re-reads the record, merges its entries into it (another run's
entries are kept) and replaces it. A decoder other than the one that made the record (a Pillow
upgrade) decodes everything again too.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import stat as stat_module
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from rise_edge.logs import logger
from rise_edge.logs import progress as progress_bar
from rise_edge.files import atomic_path, cache_root, exclusive_lock

RECORDS_ENV = "RISE_EDGE_IMAGE_CHECKS"
SCHEMA = 1
RACY_NS = 3_000_000_000  # > the coarsest common timestamp tick (FAT: 2 s)
_KIND = "rise-edge image checks"

Identity = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
ScannedFile = tuple[str, os.stat_result]  # (path, its stat)


def _now_ns() -> int:
    return time.time_ns()  # a function of its own, so that tests can age files instead of waiting


def identity(st: os.stat_result) -> Identity:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def decoder() -> str:
    """What decodes images: a record made by another decoder is not trusted."""
    return f"Pillow {PIL.__version__}"


def _suffix(name: str) -> str:
    """pathlib's Path(name).suffix, without making a Path (a scan makes hundreds of thousands)."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def scan_images(folder: Path, suffixes: frozenset[str]) -> list[ScannedFile]:
    """Every regular file (or link to one) under `folder` whose suffix is in `suffixes`, with its
    stat, in sorted path order (Path order: by parts). Links to folders are not followed; dangling
    links are left out."""
    found: list[ScannedFile] = []
    pending = [str(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                if _suffix(entry.name).lower() not in suffixes:
                    continue
                try:
                    st = entry.stat()  # follows a link: the image it points to
                except OSError:
                    continue  # a dangling link, or a file removed while scanning
                if stat_module.S_ISREG(st.st_mode):
                    found.append((entry.path, st))
    found.sort(key=lambda item: item[0].split(os.sep))
    return found


def records_folder() -> Path:
    """$RISE_EDGE_IMAGE_CHECKS, else <cache>/image-checks."""
    text = os.environ.get(RECORDS_ENV, "")
    return Path(text).expanduser() if text else cache_root() / "image-checks"


def record_path(dataset_dir: Path) -> Path:
    resolved = str(Path(dataset_dir).resolve())
    return records_folder() / f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}.json"


@dataclass
class ImageCheck:
    """What one check found: unreadable images (path, reason), images decoded now and reused from
    the record, its time, and the lines the user should read (a damaged or unsaved record)."""

    bad: list[tuple[str, str]]
    decoded: int
    reused: int
    seconds: float
    record: Path
    notes: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"decoded": self.decoded, "reused": self.reused, "seconds": round(self.seconds, 3),
                "record": str(self.record)}


class DamagedRecord(Exception):
    """A record that is not one this rise-edge wrote, whole (the message says why)."""


def read_record(path: Path, dataset_dir: Path) -> dict[str, list]:
    """The entries of a record, {} where there is none; DamagedRecord where it cannot be trusted."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}  # none yet (or its folder cannot exist: the write says so)
    except OSError as exc:
        raise DamagedRecord(f"unreadable: {exc.strerror or exc}") from None
    head, newline, body = raw.partition(b"\n")
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedRecord("its header is not JSON") from None
    if not isinstance(header, dict) or header.get("kind") != _KIND:
        raise DamagedRecord("not an image-check record")
    if header.get("schema") != SCHEMA:
        raise DamagedRecord(f"schema {header.get('schema')!r}; this rise-edge reads {SCHEMA}")
    if header.get("dataset_dir") != str(Path(dataset_dir).resolve()):
        raise DamagedRecord(f"it records {header.get('dataset_dir')!r}")
    if not newline or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise DamagedRecord("its contents do not match their recorded sha256 (cut short or changed)")
    if header.get("decoder") != decoder():
        raise DamagedRecord(f"made with {header.get('decoder')}, images are now decoded with {decoder()}")
    entries = json.loads(body)
    if not isinstance(entries, dict) or len(entries) != header.get("entries"):
        raise DamagedRecord("its entries are not the ones its header counts")
    for rel, entry in entries.items():
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[4], str)
                and all(type(v) is int for v in entry[:4])):
            raise DamagedRecord(f"its entry for {rel!r} is not [size, mtime_ns, ctime_ns, inode, problem]")
    return entries


def _write_record(path: Path, dataset_dir: Path, entries: dict[str, list]) -> None:
    body = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
    header = {"kind": _KIND, "schema": SCHEMA, "dataset_dir": str(Path(dataset_dir).resolve()),
              "decoder": decoder(), "entries": len(entries), "sha256": hashlib.sha256(body).hexdigest()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _record_lock(path: Path) -> Any:
    """An flock beside the record for the read-merge-write of an update (a writer holds it for one
    merge: well under a second, so others wait)."""
    return exclusive_lock(path.with_name(path.name + ".lock"))


def _decode(path: str, before: Identity) -> tuple[str, bool]:
    """Fully decode one image: (problem, recordable); problem '' when readable. Not recordable when
    the file changed while it was decoded, or is too recent for its timestamps to tell a rewrite."""
    try:
        with Image.open(path) as image:
            image.load()
        problem = ""
    except Exception as exc:  # PIL raises many types for corrupt files
        problem = f"{type(exc).__name__}: {exc}"
    now = _now_ns()
    try:
        after = identity(os.stat(path))
    except OSError:
        return problem or "the file disappeared while it was checked", False
    return problem, after == before and now - after[2] >= RACY_NS


def check_image_files(dataset_dir: Path, files: Sequence[ScannedFile], scope: Sequence[str], *,
                      recheck: bool = False, progress: bool = True) -> ImageCheck:
    """Decode the images of `files` (as scan_images returns them) that the record does not hold
    unchanged, update the record, and return what was found. `scope` lists the folders (relative,
    ending in '/') that `files` covers whole: recorded files under them that are gone are forgotten.
    With `recheck`, every image is decoded whatever the record holds."""
    started = time.perf_counter()
    path = record_path(dataset_dir)
    notes: list[str] = []
    rewrite = recheck
    as_read = _stat_or_none(path)  # the record's version read here: spares a re-read to merge
    try:
        entries = {} if recheck else read_record(path, dataset_dir)
    except DamagedRecord as exc:
        entries, rewrite, as_read = {}, True, None
        notes.append(f"image-check record {path} is not trusted ({exc}); every image is decoded "
                     "again and the record rebuilt")
    base = str(dataset_dir).rstrip(os.sep) + os.sep
    bad: list[tuple[str, str]] = []
    todo: list[tuple[str, str, Identity]] = []
    seen: set[str] = set()
    for file, st in files:
        if not file.startswith(base):
            raise ValueError(f"{file} is not under {base}")
        rel = file[len(base):].replace(os.sep, "/")
        seen.add(rel)
        ident = identity(st)
        entry = entries.get(rel)
        if entry is not None and tuple(entry[:4]) == ident:
            if entry[4]:
                bad.append((file, entry[4]))
        else:
            todo.append((file, rel, ident))
    fresh = _decode_all(todo, progress, len(files))
    for (file, _, _), (problem, _) in zip(todo, fresh):
        if problem:
            bad.append((file, problem))
    bad.sort()
    new = {rel: [*ident, problem] for (_, rel, ident), (problem, ok) in zip(todo, fresh) if ok}
    prefixes = tuple(scope)
    if new or rewrite or any(r.startswith(prefixes) and r not in seen for r in entries):
        note = _update(path, dataset_dir, new, prefixes, seen,
                       (as_read, entries) if as_read and not recheck else None)
        if note:
            notes.append(note)
    for note in notes:
        logger("data").info(f"note: {note}")
    return ImageCheck(bad, len(todo), len(files) - len(todo), time.perf_counter() - started, path,
                      notes)


def _decode_all(todo: list[tuple[str, str, Identity]], progress: bool, total: int
                ) -> list[tuple[str, bool]]:
    if not todo:
        return []
    workers = min(8, (os.cpu_count() or 1) * 2)  # PIL releases the GIL while decoding
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(progress_bar(pool.map(lambda t: _decode(t[0], t[2]), todo, chunksize=64),
                                 total=len(todo), unit="img", leave=False,
                                 desc=f"checking {len(todo):,} new or changed of {total:,} images",
                                 enabled=progress))


def _stat_or_none(path: Path) -> Identity | None:
    try:
        return identity(os.stat(path))
    except OSError:
        return None


def _update(path: Path, dataset_dir: Path, new: dict[str, list], scope: tuple[str, ...],
            seen: set[str], read: tuple[Identity, dict[str, list]] | None) -> str:
    """Merge `new` entries into the record under its lock, forgetting files under `scope` that are
    not in `seen` (gone); '' when saved, else the line that says why it was not (the check itself
    stands). `read`: the record's identity when it was read and its entries, used instead of
    reading it again while no other run has replaced it (a replacement is a new file)."""
    try:
        with _record_lock(path):
            # Writers write under this lock: a temporary of this record now is a killed writer's.
            for leftover in path.parent.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
            if read is not None and _stat_or_none(path) == read[0]:
                current = read[1]
            else:
                try:
                    current = read_record(path, dataset_dir)
                except DamagedRecord:
                    current = {}  # already said when it was read; rebuilt from this run's checks
            current = {rel: entry for rel, entry in current.items()
                       if rel in seen or not rel.startswith(scope)}
            current.update(new)
            _write_record(path, dataset_dir, current)
    except OSError as exc:
        return (f"could not save the image-check record {path} ({exc.strerror or exc}); the next "
                f"start decodes these images again (set {RECORDS_ENV} to a writable folder)")
    return ""
