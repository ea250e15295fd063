"""A site's images: a folder of unlabelled images in any layout, listed, checked and hashed.

Nothing is read from the layout but the files: folder names are never taken as labels. Every image
is decoded once to find unreadable files (the per-folder record of rise_edge.data.image_checks, so
a second look at the same site decodes nothing); they are refused with their names unless the user
asks to skip them. Files that are not images (by suffix) are left out and counted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rise_edge.data.domains import IMAGE_SUFFIXES
from rise_edge.data.image_checks import check_image_files, scan_images
from rise_edge.errors import UserError
from rise_edge.files import file_sha256, is_run_directory


@dataclass(frozen=True)
class SiteImages:
    """The site's readable images (absolute paths, sorted) and what was left out."""

    folder: Path
    paths: tuple[str, ...]
    sha256: str                       # over every used image's relative path and bytes
    skipped: tuple[tuple[str, str], ...] = ()   # (relative path, why) of unreadable images
    not_images: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_record(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "images": len(self.paths), "sha256": self.sha256,
                "skipped_unreadable": [list(s) for s in self.skipped],
                "ignored_not_images": self.not_images,
                "labels": "none read: the folder's layout is never taken as labels"}


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under it."""
    return a == b or b in a.parents


def _refuse_run_folders(folder: Path, runs: list[Path]) -> None:
    for run in runs:
        run = run.resolve()
        if _inside(folder, run) or _inside(run, folder):
            raise UserError(f"--site {folder} {'is' if folder == run else 'overlaps'} the run "
                            f"directory {run}; give a folder holding only the site's images")
    if is_run_directory(folder):
        raise UserError(f"--site {folder} is a rise-edge run directory, not a folder of site "
                        "images")


def find_site_images(folder: str | Path, *, runs: tuple[Path, ...] = (), skip_bad: bool = False,
                     progress: bool = True) -> SiteImages:
    """List, check and hash the images under `folder` (recursively; links to folders are not
    followed). Refuses a missing folder, a file, a folder that is or overlaps a run directory, a
    folder without images, and unreadable images unless `skip_bad`."""
    given = Path(folder)
    if not given.exists():
        raise UserError(f"--site {given}: no such folder; give a folder of the site's images")
    if not given.is_dir():
        raise UserError(f"--site {given} is a file; give the folder that holds the site's images")
    root = given.resolve()
    _refuse_run_folders(root, list(runs))
    try:
        images = scan_images(root, IMAGE_SUFFIXES)
        everything = sum(len(files) for _, _, files in os.walk(root))
    except PermissionError as exc:
        raise UserError(f"--site {given}: cannot read {exc.filename}: permission denied") from None
    not_images = max(0, everything - len(images))
    if not images:
        raise UserError(f"--site {given} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                        + (f"; its {not_images} file(s) are of other kinds" if not_images else ""))
    check = check_image_files(root, images, [""], progress=progress)
    base = str(root) + os.sep
    bad = {path: why for path, why in check.bad}
    if bad and not skip_bad:
        listed = "; ".join(f"{p[len(base):]} ({w})" for p, w in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"--site {given}: {len(bad)} unreadable image(s): {listed}{more}; remove "
                        "them or pass --skip-bad-images")
    used = [path for path, _ in images if path not in bad]
    if not used:
        raise UserError(f"--site {given}: none of its {len(images)} image(s) can be read")
    digest = hashlib.sha256()
    for path in used:
        digest.update(f"{path[len(base):]}\t{file_sha256(path)}\n".encode())
    notes = []
    if bad:
        notes.append(f"skipped {len(bad)} unreadable site image(s) (--skip-bad-images)")
    if not_images:
        notes.append(f"left out {not_images} file(s) under {given} that are not images")
    if len(used) < 30:
        notes.append(f"only {len(used)} site image(s): every estimate's interval is wide")
    return SiteImages(root, tuple(used), digest.hexdigest(),
                      tuple((p[len(base):], w) for p, w in bad.items()), not_images, tuple(notes))
