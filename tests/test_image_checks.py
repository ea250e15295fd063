"""The image check once per file (rise_edge.data.image_checks): a second start decodes only new or
changed files, a changed, replaced or truncated file is caught, a damaged record is never trusted,
and two runs updating the record at once keep each other's entries."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_DATASET, make_tiny_dataset

from rise_edge.config import load_recipe
from rise_edge.data import image_checks
from rise_edge.data.domains import IMAGE_SUFFIXES, build_splits
from rise_edge.data.image_checks import (RECORDS_ENV, check_image_files, read_record, record_path,
                                         scan_images)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "records"
    monkeypatch.setenv(RECORDS_ENV, str(folder))
    return folder


@pytest.fixture
def aged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks run a minute after now: files just written are past the timestamp-tick margin."""
    monkeypatch.setattr(image_checks, "_now_ns", lambda: time.time_ns() + 60_000_000_000)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "data", images_per_cell=3) / TINY_DATASET


def _check(dataset: Path, *, recheck: bool = False, domains: tuple[str, ...] = ()):
    folders = [p for p in sorted(dataset.glob("*/*")) if not domains or p.parent.name in domains]
    files = [f for folder in folders for f in scan_images(folder, IMAGE_SUFFIXES)]
    scope = [f"{p.parent.name}/{p.name}/" for p in folders]
    return check_image_files(dataset, files, scope, recheck=recheck, progress=False)


def test_a_second_check_decodes_only_new_or_changed_files(dataset: Path, records: Path,
                                                          aged: None) -> None:
    bad = dataset / "photo" / "circle" / "bad.png"
    bad.write_bytes(b"not an image")
    first = _check(dataset)
    assert first.decoded == 28 and first.reused == 0 and [p for p, _ in first.bad] == [str(bad)]
    second = _check(dataset)
    assert second.decoded == 0 and second.reused == 28
    assert second.bad == first.bad  # what was found is recorded, not only what was fine
    (dataset / "photo" / "square" / "new.png").write_bytes((dataset / "photo" / "square" /
                                                            "000.png").read_bytes())
    killed = record_path(dataset).with_name(f".{record_path(dataset).name}.x1y2.tmp")
    killed.write_text("half a record, as a writer killed with -9 leaves it")
    third = _check(dataset)
    assert third.decoded == 1 and third.reused == 28
    assert not killed.exists()  # the next writer removes it, under the lock
    bad.unlink()  # a file that is gone is forgotten
    _check(dataset)
    assert "photo/circle/bad.png" not in read_record(record_path(dataset), dataset)


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _rewrite_same_size_old_mtime(path: Path) -> None:
    """Garbage of the same size written in place, the old mtime put back (as cp -p or tar do)."""
    before = path.stat()
    path.write_bytes(b"x" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _replace_same_size_old_mtime(path: Path) -> None:
    """Another file renamed over it (a new inode), with the same size and mtime."""
    before = path.stat()
    other = path.with_name("incoming.tmp")
    other.write_bytes(b"y" * before.st_size)
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, path)


@pytest.mark.parametrize("change", [_truncate, _rewrite_same_size_old_mtime,
                                    _replace_same_size_old_mtime])
def test_a_changed_replaced_or_truncated_file_is_checked_again_and_caught(
        dataset: Path, records: Path, aged: None, change) -> None:
    assert _check(dataset).bad == []
    victim = dataset / "cartoon" / "triangle" / "001.png"
    before = victim.stat()
    change(victim)
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns) or \
        change is _truncate  # size and mtime alone would have missed the other two
    again = _check(dataset)
    assert again.decoded == 1 and [p for p, _ in again.bad] == [str(victim)]


def test_a_file_younger_than_the_timestamp_tick_is_not_trusted(dataset: Path, records: Path,
                                                                monkeypatch) -> None:
    """Just-written files are decoded, but not recorded as checked: a rewrite within the same
    timestamp tick could not be told from them. Once older, they are."""
    assert _check(dataset).decoded == 27
    assert _check(dataset).decoded == 27  # still within the tick margin: decoded again
    monkeypatch.setattr(image_checks, "_now_ns", lambda: time.time_ns() + 60_000_000_000)
    assert _check(dataset).decoded == 27
    assert _check(dataset).decoded == 0


def test_recheck_decodes_every_image_and_splits_report_the_check(dataset: Path, records: Path,
                                                                 aged: None) -> None:
    def cfg(*extra: str):
        return load_recipe(None, [f"data.root={dataset.parent}", f"data.dataset={TINY_DATASET}",
                                  "data.target_domain=sketch", *extra]).data

    assert build_splits(cfg(), progress=False).image_check["decoded"] == 27
    assert build_splits(cfg(), progress=False).image_check["reused"] == 27
    forced = build_splits(cfg("data.recheck_images=true"), progress=False).image_check
    assert forced["decoded"] == 27 and forced["reused"] == 0


def _flip_body_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))


def _wrong_entry_shape(path: Path) -> None:
    """A well-formed file whose digest matches, but an entry of the wrong shape."""
    head, body = path.read_bytes().split(b"\n", 1)
    entries = json.loads(body)
    entries[next(iter(entries))] = ["big", 1, 2, 3, ""]
    body = json.dumps(entries).encode()
    header = {**json.loads(head), "sha256": hashlib.sha256(body).hexdigest()}
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "cut short or changed"),
    (_flip_body_byte, "cut short or changed"),
    (lambda p: p.write_bytes(b"\x00garbage"), "header is not JSON"),
    (lambda p: p.write_text(""), "header is not JSON"),
    (_wrong_entry_shape, "is not [size, mtime_ns, ctime_ns, inode, problem]"),
    (lambda p: p.write_text(p.read_text().replace('"schema": 1', '"schema": 9')), "schema 9"),
])
def test_a_damaged_record_is_rebuilt_with_one_line_never_trusted(
        dataset: Path, records: Path, aged: None, capsys, damage, why: str) -> None:
    bad = dataset / "sketch" / "circle" / "bad.png"
    bad.write_bytes(b"broken")
    _check(dataset)
    path = record_path(dataset)
    damage(path)
    capsys.readouterr()
    again = _check(dataset)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not trusted" in lines[0] and why in lines[0], lines
    assert again.decoded == 28 and [p for p, _ in again.bad] == [str(bad)]
    assert len(read_record(path, dataset)) == 28  # rebuilt whole
    assert _check(dataset).decoded == 0


def test_an_unwritable_record_folder_does_not_stop_the_check(dataset: Path, tmp_path: Path,
                                                             monkeypatch, aged: None,
                                                             capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(RECORDS_ENV, str(blocker / "records"))  # cannot be made: read-only-like
    (dataset / "photo" / "circle" / "bad.png").write_bytes(b"broken")
    outcome = _check(dataset)
    assert len(outcome.bad) == 1 and outcome.decoded == 28
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not save the image-check record" in err[0], err


_CHILD = """
import sys, time
from pathlib import Path
from rise_edge.data import image_checks
from rise_edge.data.domains import IMAGE_SUFFIXES
image_checks._now_ns = lambda: time.time_ns() + 60_000_000_000
lock = image_checks._record_lock
def announced(path):
    print("waiting", flush=True)  # decoded; about to take the record's lock
    return lock(path)
image_checks._record_lock = announced
dataset, domain = Path(sys.argv[1]), sys.argv[2]
folders = sorted((dataset / domain).iterdir())
files = [f for d in folders for f in image_checks.scan_images(d, IMAGE_SUFFIXES)]
out = image_checks.check_image_files(dataset, files, [f"{domain}/{d.name}/" for d in folders],
                                     progress=False)
print("decoded", out.decoded, flush=True)
"""


def test_two_runs_updating_the_record_at_once_keep_each_others_entries(
        dataset: Path, records: Path, aged: None) -> None:
    _check(dataset, domains=("sketch",))  # a third run's entries, recorded before
    path = record_path(dataset)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held: both runs read the same old record and must wait
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(dataset), domain], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for domain in ("cartoon", "photo")]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "waiting", child.stderr.read()
    finally:
        os.close(fd)  # both are at the lock with what they decoded: let them write in turn
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and "decoded 9" in out, err
    entries = read_record(path, dataset)
    assert {rel.split("/")[0] for rel in entries} == {"cartoon", "photo", "sketch"}
    assert len(entries) == 27
    assert _check(dataset).decoded == 0
