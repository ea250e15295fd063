"""A bundle's manifest (every file's sha256, what it was made from) and its replacement: a bundle
folder is only ever replaced whole, and only when its manifest says rise-edge made it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rise_edge.errors import UserError
from rise_edge.files import file_sha256, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"  # the same hashes in sha256sum's format, so the device checks with no Python
KIND = "rise-edge serving bundle"
SCHEMA = 1


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds a manifest that says rise-edge made it."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def check_replaceable(target: Path, given: bool = True) -> None:
    """A UserError unless `target` is absent or a bundle rise-edge made (which may be replaced);
    `given`: whether --bundle-dir chose it (else it is the default place, RUN/bundle)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and is_bundle(target):
        return
    what = "a folder" if target.is_dir() else "a file"
    elsewhere = ("choose another --bundle-dir" if given else
                 "give --bundle-dir DIR for another place")
    raise UserError(f"{target} exists and is {what} whose {MANIFEST} does not say rise-edge made it; "
                    f"it was left as it is: move it aside or {elsewhere}")


# The names replace_whole and package_run give their folders beside a bundle: `.work-<name>-` and
# mkdtemp's 8 characters, `.work-old-<name>-<pid>`. Matched exactly, so that the work folders of
# another bundle whose name starts alike ('bundle-x' beside 'bundle') are never taken for ours.
def stale_work_folders(target: Path) -> list[Path]:
    """The work folders a killed bundle of `target` left beside it (call with its lock held)."""
    import re

    name = re.escape(target.name)
    pattern = re.compile(rf"\.work-{name}-[a-z0-9_]{{8}}|\.work-old-{name}-[0-9]+")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> sha256 and size of every file under `folder` but the manifest and checksums."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST, CHECKSUMS):
            found[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return found


def write_manifest(folder: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Hash every file, then write SHA256SUMS and manifest.json (kind, schema, files, `document`)."""
    files = file_hashes(folder)
    write_text_atomic(folder / CHECKSUMS, "".join(f"{v['sha256']}  {k}\n" for k, v in files.items()))
    manifest = {"kind": KIND, "schema": SCHEMA, **document, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def replace_whole(staging: Path, target: Path, given: bool = True) -> None:
    """Put the finished `staging` folder at `target`, replacing an earlier bundle whole: the old one
    is renamed aside first and deleted only after the new one is in place, so a failure at any
    point leaves one complete bundle (or, killed between the renames, none and .work- folders the
    next bundle made at this place removes: stale_work_folders)."""
    check_replaceable(target, given)  # again: it may have changed while the bundle was laid out
    old = None
    if target.exists():
        old = target.parent / f".work-old-{target.name}-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
