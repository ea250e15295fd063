"""`rise-edge adapt`: a child run adapted to a site, beside its parent, which is never changed.

    <child>/adapt.json           the parent (path, student sha256), the site (folder, images, sha256),
                                 the method and what it did, INT8 calibration source, the estimates
                                 before and after
    <child>/student.safetensors  the adapted student (header: the parent's metadata, its recipe)
    <child>/recipe.yaml, splits.json, text_embeddings/   copied from the parent byte for byte

The child is assembled in a work folder beside it and renamed into place at the end, so a kill at
any moment leaves either no child or a whole one; it is then exported through the normal export
path (INT8 calibrated on the site's images when asked), and bench treats it like any run.
--method distill (rise_edge.site.distill) trains before that, keeping its resumable state in a work
folder of its own beside the child, removed once the child is in place.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rise_edge.logs import logger
from rise_edge.errors import DamagedFile, UserError
from rise_edge.files import (RUN_MARKER, check_destination, copy_for_write, file_sha256, read_lock,
                             run_lock, write_failure, write_json_atomic, write_text_atomic)
from rise_edge.run_dir import (ADAPT_FILE, STUDENT_FILE, TrainedRun, open_run, read_adapt_record,
                               run_splits, save_student)
from rise_edge.data.site_images import SiteImages, find_site_images
from rise_edge.site.assess import decoder
from rise_edge.site.distill import DistillSettings, check_teacher, checkpoint_dir

CALIBRATION_SOURCES = ("sources", "site")
HARM_POINTS = 1.0  # adapt warns when ATC predicts a fall of more than this many points
COPIED = ("recipe.yaml", "splits.json")


def default_child_dir(parent: Path, method: str, site: SiteImages, calibration: str) -> Path:
    suffix = "" if calibration == "sources" else "-int8site"
    return parent.parent / f"{parent.name}-{method}{suffix}-{site.sha256[:8]}"


def _estimates(run: TrainedRun, student: Any, site: SiteImages, data_root: str | None,
               keep: dict[str, Any] | None = None, key: str = "") -> dict[str, Any] | None:
    """The site record (rise_edge.site.assess) of `student`, or None when the sources' validation
    images cannot be read here (the estimators are calibrated on them). `keep`, when given,
    receives the site logits under `key` (for benchmarks that score them against held-out labels)."""
    from rise_edge.site.assess import SiteInputs, assess, source_validation

    try:
        splits = run_splits(run, data_root)
        source = source_validation(splits)
        if not source or not all(os.path.isfile(p) for p, _, _ in source[:1]):
            return None
    except DamagedFile:
        raise  # a damaged splits.json is named, never taken for data that is not here
    except UserError:
        return None
    from rise_edge.site.inference import fast_model

    inputs = SiteInputs(source, site.paths)
    decode = decoder(run.meta.preprocessing)
    with fast_model(student, run.meta.preprocessing.input_size,
                    run.recipe.export.opset) as (model, _):
        src, at_site = inputs.logits(model, decode)
    if keep is not None:
        keep[key] = at_site
    return assess(inputs, src, at_site, run.meta.classes)


def _atc(record: dict[str, Any] | None) -> float | None:
    if not record:
        return None
    return next((e["estimate"] for e in record.get("estimates", []) if e["method"] == "ATC"), None)


def _elsewhere(given: bool) -> str:
    """How to put the child somewhere else, naming --run-dir as the user gave it or not."""
    return "choose another --run-dir" if given else "give --run-dir DIR to put it elsewhere"


def _assemble(work: Path, parent: Path, run: TrainedRun, student: Any,
              record: dict[str, Any]) -> None:
    """Write the child's files into the new folder `work` (the parent's only read)."""
    work.mkdir(parents=True)
    (work / RUN_MARKER).write_text("rise-edge run directory (adapted)\n")
    for name in COPIED:
        if (parent / name).is_file():
            copy_for_write(parent / name, work / name)
    if (parent / "text_embeddings").is_dir():
        copy_for_write(parent / "text_embeddings", work / "text_embeddings")
    save_student(work, student, run.meta, run.recipe)
    write_json_atomic(work / ADAPT_FILE, record)
    site = record["site"]
    write_text_atomic(work / "README.txt",
                      f"Adapted from {parent} with {record['method']} on {site['images']} "
                      f"images of {site['folder']} (sha256 {site['sha256'][:16]}).\n")


def _write_child(child: Path, parent: Path, run: TrainedRun, student: Any,
                 record: dict[str, Any], given: bool) -> None:
    """Assemble the child in a work folder beside it and rename it into place: all or nothing."""
    with run_lock(child, "adapt", clean=False):
        if child.exists():
            raise UserError(f"{child} already exists; adapt never overwrites: {_elsewhere(given)}")
        work = child.parent / f".{child.name}.work-adapt"
        shutil.rmtree(work, ignore_errors=True)  # a killed adapt's leftovers: we hold the lock
        try:
            _assemble(work, parent, run, student, record)
            os.rename(work, child)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise UserError(write_failure(exc, "the adapted run", child, work,
                                            _elsewhere(given))) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _check_run(run: TrainedRun, method: str) -> None:
    """Refuse, before anything is written, a run the method cannot adapt."""
    from rise_edge.site.adapt import batchnorm_layers

    if method == "distill":  # a run without a teacher
        check_teacher(run)
    if method == "adabn" and not batchnorm_layers(run.student):
        raise UserError(f"--method adabn re-estimates BatchNorm statistics, and {run.path}'s "
                        f"student ({run.meta.model}) has no BatchNorm layer; use --method t3a")


def _adapted(run: TrainedRun, method: str, site: SiteImages, child: Path, data_root: str | None,
             settings: DistillSettings | None, log: Callable[[str], None]
             ) -> tuple[Any, dict[str, Any]]:
    """(the adapted copy of the run's student, in eval mode; what was done, for adapt.json). The
    site's size is checked first: nothing is written when it is too small for the method."""
    import copy

    from rise_edge.site.adapt import adapt, path_batches
    from rise_edge.site.distill import describe, distill, plan_distill

    if method == "adabn" and len(site.paths) < 2:
        raise UserError("--method adabn estimates BatchNorm statistics from the site's images "
                        f"and --site {site.folder} holds {len(site.paths)}; give at least 2 (a "
                        "few hundred for stable statistics), or use --method t3a")
    plan = plan_distill(run, site, data_root, settings or DistillSettings()) \
        if method == "distill" else None
    log(f"adapting {run.path.name} with {method} on {len(site.paths)} site image(s)")
    student = copy.deepcopy(run.student)
    if plan is not None:
        done = distill(plan, student, child, log)
        log(describe(done))
    else:
        done = adapt(student, method, path_batches(list(site.paths),
                                                   decoder(run.meta.preprocessing)))
    return student.eval(), done


def adapt_run(parent_dir: str | Path, site_dir: str | Path, method: str, *,
              child_dir: str | Path | None = None, int8_calibration: str = "sources",
              skip_bad: bool = False, data_root: str | None = None, command: str = "",
              log: Callable[[str], None] = logger("site").info,
              keep: dict[str, Any] | None = None, distill: DistillSettings | None = None
              ) -> tuple[Path, dict[str, Any]]:
    """Make the adapted child run of `parent_dir` for the images of `site_dir`; returns its path and
    adapt.json's content. The parent is only read. `keep`: see _estimates ("before", "after");
    `distill`: the settings of --method distill (default DistillSettings())."""
    from rise_edge.site.adapt import METHODS

    if method not in METHODS:
        raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if int8_calibration not in CALIBRATION_SOURCES:
        raise UserError(f"--int8-calibration {int8_calibration}: choose one of "
                        f"{', '.join(CALIBRATION_SOURCES)}")
    parent = Path(os.path.abspath(parent_dir))
    if child_dir is not None:  # before anything is written (the default place is beside it)
        check_destination(child_dir, parent, command="adapt", writes="the adapted run",
                          reads="the parent run", given="--run-dir",
                          fix=f"choose a new folder apart from {parent} (by default the child "
                              "goes beside it)")
    with read_lock(parent, "adapt"):  # a shared lock, where one can be had: adapt only reads
        run = open_run(parent)
        parent_sha = file_sha256(parent / STUDENT_FILE)
        _check_run(run, method)
        if read_adapt_record(parent) is not None:
            log(f"note: {parent} is itself an adapted run; its child adapts it further")
        site = find_site_images(site_dir, runs=(parent,) + ((Path(child_dir),) if child_dir else ()),
                                skip_bad=skip_bad)
        for note in site.notes:
            log(f"note: {note}")
        child = Path(os.path.abspath(child_dir)) if child_dir else \
            default_child_dir(parent, method, site, int8_calibration)
        if child.exists():
            raise UserError(f"{child} already exists; adapt never overwrites: "
                            f"{_elsewhere(child_dir is not None)}")
        student, done = _adapted(run, method, site, child, data_root, distill, log)
        before = _estimates(run, run.student, site, data_root, keep, "before")
        after = before if method == "none" else _estimates(run, student, site, data_root, keep,
                                                            "after")
        if keep is not None and method == "none" and "before" in keep:
            keep["after"] = keep["before"]
        record = {"schema": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "command": command, "parent": {"run_dir": str(parent), "student_sha256": parent_sha},
                  "site": site.to_record(), "method": method, "adaptation": done,
                  **({"selection": done.pop("selection")} if "selection" in done else {}),
                  "int8_calibration": int8_calibration,
                  "estimates": {"before": before, "after": after}}
        warning = None
        a, b = _atc(before), _atc(after)
        if a is not None and b is not None and b < a - HARM_POINTS:
            warning = (f"the estimates predict that {method} hurts on this site (ATC {a:.1f} % "
                       f"before, {b:.1f} % after); keep the parent, or check with labelled site "
                       "images")
        record["warning"] = warning
        _write_child(child, parent, run, student, record, given=child_dir is not None)
        if method == "distill":  # the child is whole: the distillation's resumable state is done
            shutil.rmtree(checkpoint_dir(child), ignore_errors=True)
    if warning:
        log(f"warning: {warning}")
    return child, record
