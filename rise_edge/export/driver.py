"""`rise-edge export`: turn a trained run into deployable artefacts, all recorded in export/export.json.

Which artefacts exist, how each is made and what runs it is the backend registry's business
(rise_edge.backend_table, one module per backend); this module plans what a config asks for, makes each
artefact under a temporary name, and keeps export.json (every artefact with its status, checks and
provenance) in RUN_DIR/export/, beside the artefacts; each backend module lists the files it writes.

Every graph has constant pads (graph_form.with_static_padding), so no quantizer rounds shape
arithmetic. Every file is written under a temporary name and renamed once it passed its checks, so a
failing or interrupted export never replaces a good artefact; each artefact is attempted on its own,
so one failing format gets a status and a reason while the others complete. export.json is rewritten
atomically after every artefact and merged with earlier records; a failed remake keeps the ok record
of an intact earlier file. The target domain plays no part.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.logs import stage_lines
from rise_edge.backend_table import artefacts, backends, plan_formats, why_unavailable
from rise_edge.config import ExportConfig, parse_override, recipe_from_dict, recipe_to_dict
from rise_edge.errors import UserError, missing_extra
from rise_edge.export.recommend import recommendation
from rise_edge.export.session import ExportSession
from rise_edge.files import atomic_path, file_sha256, run_lock, write_json_atomic
from rise_edge.run_dir import (EXPORT_JSON, STUDENT_FILE, TrainedRun, open_run, read_export_record,
                               software_versions)


def plan_artefacts(cfg: ExportConfig) -> list[str]:
    """The artefacts a config asks for, prerequisites first: the FP32 ONNX, then each requested
    format's own plan (rise_edge.backend_table), in table order, each name once."""
    formats = plan_formats(cfg.formats)
    if len(cfg.batch_profile) != 3 or not 1 <= cfg.batch_profile[0] <= cfg.batch_profile[1] <= \
            cfg.batch_profile[2]:
        raise UserError(f"export.batch_profile must be three batch sizes min <= opt <= max, "
                        f"got {list(cfg.batch_profile)}")
    table = backends()
    names = ["onnx-fp32"]
    for fmt in formats:
        names += [n for n in table[fmt].plan(cfg) if n not in names]
    return names


@dataclass
class ExportResult:
    """What an export produced: this run's records (name -> record) and where export.json is."""

    artefacts: dict[str, dict[str, Any]]
    path: Path
    attempted: list[str] = field(default_factory=list)
    recommended: dict[str, Any] = field(default_factory=dict)  # export.json's `recommended`
    config: ExportConfig | None = None  # the settings this export ran with

    @property
    def failed(self) -> list[str]:
        return [n for n in self.attempted if self.artefacts[n]["status"] == "failed"]

    def table(self) -> str:
        rows = [("artefact", "precision", "status", "size", "file / reason")]
        for name in self.attempted:
            r = self.artefacts[name]
            size = f"{r['bytes'] / 1e6:.1f} MB" if r.get("bytes") else "-"
            where = r["path"] if r["status"] == "ok" else r.get("reason", "")
            rows.append((name, r["precision"], r["status"] + (" (reused)" if r.get("reused") else ""),
                         size, where))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
                         for row in rows)


# ---------------------------------------------------------------------------------------------------
# The driver


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _kept_if_intact(s: ExportSession, name: str, previous: dict[str, Any], record: dict[str, Any]
                    ) -> dict[str, Any]:
    """The record export.json keeps for `name`: a failed or skipped remake never downgrades the
    record of an earlier artefact of this student whose file is intact (bench goes on using it);
    the record says what the last attempt did."""
    if record["status"] not in ("failed", "skipped") or previous.get("status") != "ok":
        return record
    path = s.path_of(name)
    if not (previous.get("sha256") and previous.get("student_sha256") == s.student_sha256
            and path.is_file() and file_sha256(path) == previous["sha256"]):
        return record
    kept = {k: v for k, v in previous.items() if k not in ("last_attempt", "reused")}
    return {**kept, "last_attempt": {k: record[k] for k in ("status", "reason", "updated")}}


def _reusable(s: ExportSession, name: str, previous: dict[str, Any]) -> bool:
    """An earlier artefact can stand in for a prerequisite when it is intact and made from this
    student (the device case: the workstation exported ONNX + Q/DQ ONNX, the device builds engines)."""
    path = s.path_of(name)
    if not (previous.get("status") == "ok" and previous.get("student_sha256") == s.student_sha256
            and path.is_file() and previous.get("sha256") == file_sha256(path)):
        return False
    if name == "onnx-fp32":
        return previous.get("opset") == s.cfg.opset
    if name == "onnx-int8-tensorrt":  # the same FP32 graph, method and calibration images
        fp32 = s.path_of("onnx-fp32")
        same_calibration = (previous.get("calibration_sha256") == s.calibration.sha256
                            if s.data_reachable() else True)  # the device may not have the data set
        # and one that says what it was placed for: made before that, bench and the judge would
        # run it through ONNX Runtime's saturating x86 kernels instead of as written.
        return (fp32.is_file() and previous.get("from_sha256") == file_sha256(fp32)
                and previous.get("calibration_method_requested") == s.cfg.calibration_method
                and same_calibration and _placed_for_tensorrt(path))
    return False


def _placed_for_tensorrt(path: Path) -> bool:
    from rise_edge.export.session import placed_for

    return placed_for(path) == "tensorrt"


def _make(s: ExportSession, name: str, previous: dict[str, Any], record: dict[str, Any],
          log: Callable[[str], None]) -> dict[str, Any]:
    """Make one artefact under a temporary name and rename it into place once its maker returned
    (its checks passed); on failure the record says why, and whether the earlier file was kept."""
    spec = artefacts()[name]
    path = s.path_of(name)
    log(f"{name}: making {spec.filename}")
    try:
        with atomic_path(path) as tmp:
            details = spec.make(s, tmp)
        size = path.stat().st_size + sum((path.parent / part).stat().st_size
                                         for part in details.get("files", {}))
        return {**record, "status": "ok", "sha256": file_sha256(path), "bytes": size, **details}
    except UserError as exc:
        reason = str(exc)
    except Exception as exc:  # any other failure of one format must not stop the others
        reason = f"{type(exc).__name__}: {exc}"
    log(f"{name}: FAILED: {reason}")
    record = {**record, "status": "failed", "reason": reason}
    # the last good file is still in place: say so (across repeated failures too)
    good = previous if previous.get("status") == "ok" else previous.get("previous", {})
    if path.is_file() and good.get("sha256"):
        record["previous"] = {k: good[k] for k in ("sha256", "updated") if k in good}
        record["reason"] += f" (the earlier {spec.filename} was kept)"
    return record


def export_run(run_dir: str | Path, cfg: ExportConfig, *, progress: bool = True,
               data_root: str | None = None) -> ExportResult:
    """Export a trained run's student as `cfg` asks; returns the records and export.json's path.

    A failing artefact does not stop the others: it gets status 'failed' and a reason (artefacts that
    need it get 'skipped'); one that this machine cannot make gets 'unavailable' and a sentence why.
    """
    run = open_run(run_dir)  # says what is missing before anything is locked or written
    with run_lock(run.path, "export"):
        result = _export(run, cfg, progress, data_root)
        from rise_edge.track import log_run_files  # export.json to the run's trackers (log:), if any
        log_run_files(run.path, run.recipe, "export", [result.path])
        return result


def _marked_stale(records: dict[str, dict[str, Any]], student_sha256: str
                  ) -> dict[str, dict[str, Any]]:
    """Earlier records made from another student: said so, kept."""
    for record in records.values():
        if record.get("student_sha256") not in (None, student_sha256) and record.get("status") == "ok":
            record.update(status="stale", reason="made from an earlier student.safetensors")
    return records


def _check_adapted(session: ExportSession, names: Sequence[str]) -> None:
    """An adapted run's adapt.json is read (checked field by field) before anything is made, and so
    are its site images when its INT8 is calibrated on them: a damaged or tampered record, or a site
    that changed since adapt, is one line naming it (exit 2), not an INT8 artefact that 'failed'."""
    from rise_edge.run_dir import read_adapt_record

    adapted = read_adapt_record(session.run.path)
    if adapted is not None and adapted.get("int8_calibration") == "site" and any(
            artefacts()[n].precision == "int8" for n in names):
        session.calibration  # noqa: B018 (finds, checks and hashes the site's images once)


def _export(run: TrainedRun, cfg: ExportConfig, progress: bool, data_root: str | None
            ) -> ExportResult:
    log = stage_lines("export", "export", progress)

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise missing_extra(exc.name or "onnx", "cpu", "rise-edge export") from None
    names = plan_artefacts(cfg)
    table = artefacts()
    session = ExportSession(run, cfg, log, data_root)
    # Every artefact is checked on the run's images: a data set that moved or a damaged splits.json
    # is the user's to fix (one line, exit 2) before anything is written, not a failed artefact.
    session.splits  # noqa: B018 (loads and checks them once, for every maker)
    _check_adapted(session, names)
    session.dir.mkdir(parents=True, exist_ok=True)
    json_path = session.dir / EXPORT_JSON
    document = read_export_record(run.path, advice="move it aside to start a fresh export")
    records = _marked_stale(dict(document.get("artefacts", {})), session.student_sha256)
    session.records = records
    session.previous_calibration = dict(document.get("calibration", {}))
    # Prerequisites of the GPU formats are reused when intact (the device builds engines from what
    # the workstation exported); what the user asked for by format is made afresh.
    reusable = {"onnx-int8-tensorrt"} | ({"onnx-fp32"} if not {"onnx", "all"} & set(cfg.formats)
                                         else set())

    def save() -> None:
        document.update({
            "schema": 1, "updated": _now(), "versions": software_versions(),
            "student": {"file": STUDENT_FILE, "sha256": session.student_sha256, "model": run.meta.model,
                        "classes": list(run.meta.classes), "source_domains": list(run.meta.source_domains),
                        "target_domain": run.meta.target_domain,
                        "preprocessing": run.meta.preprocessing.to_dict()},
            "export_config": dataclasses.asdict(cfg), "artefacts": records, "recommended":
            recommendation(records, cfg.int8_min_speedup)})
        if "calibration" in session._cache:
            document["calibration"] = {**session.calibration.to_record(run.meta.classes),
                                       "method": cfg.calibration_method,
                                       "dataset_dir": str(session.calibration.dataset_dir)}
        if "fidelity_samples" in session._cache:  # what every INT8 decision was made on
            document["int8_images"] = session.image_sets_record()
        write_json_atomic(json_path, document)

    outcomes: dict[str, dict[str, Any]] = {}  # what this export did; records: what export.json keeps
    for name in names:
        spec, previous = table[name], records.get(name, {})
        record: dict[str, Any] = {"format": spec.runs_on, "precision": spec.precision,
                                  "path": spec.filename, "target": spec.target,
                                  "student_sha256": session.student_sha256, "updated": _now()}
        failed_needs = [n for n in spec.needs if records.get(n, {}).get("status") != "ok"]
        reason = why_unavailable(name)
        ptq = records.get("onnx-int8", {})
        if name.startswith("onnx-int8-qat") and cfg.qat == "auto" and ptq.get("status") == "ok" \
                and ptq.get("accuracy_budget", {}).get("met"):
            record.update(status="skipped", reason="post-training INT8 met the accuracy budget "
                          "(export.qat=auto)")
        elif name in reusable and _reusable(session, name, previous):
            record = {**previous, "reused": True}
            log(f"{name}: reusing {spec.filename} (hash matches)")
        elif failed_needs:
            record.update(status="skipped", reason=f"needs {', '.join(failed_needs)}, which "
                          f"{'was' if len(failed_needs) == 1 else 'were'} not made")
        elif reason is not None:
            record.update(status="unavailable", reason=reason)
            log(f"{name}: unavailable: {reason}")
        else:
            record = _make(session, name, previous, record, log)
        outcomes[name] = record
        records[name] = _kept_if_intact(session, name, previous, record)
        save()
    if not names:
        save()
    if "calibration" in session._cache and cfg.int8 and "tensorrt" in plan_formats(cfg.formats):
        _write_calibration_tensors(session)
    return ExportResult({**records, **outcomes}, json_path, names, document.get("recommended", {}),
                        cfg)


def resolve_export_config(run: TrainedRun, overrides: Sequence[str] = (), **flags: Any) -> ExportConfig:
    """The run's recipe.export, then `export.key=value` overrides, then command-line flags (None =
    not given), all validated as a recipe is (unknown keys get a suggestion)."""
    values = recipe_to_dict(run.recipe)["export"]
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "export" or not name:
            raise UserError(f"--set {text}: export takes export.key=value overrides, "
                            "e.g. --set export.calibration_size=256")
        values[name] = value
    values.update({k: v for k, v in flags.items() if v is not None})
    return recipe_from_dict({"export": values}, "export options").export


def _write_calibration_tensors(s: ExportSession) -> None:
    """The preprocessed calibration images as float32 .npy (what the calibrator is fed: float16
    would round the images the ranges are taken from), named by the calibration hash, so a
    device without the data set can still run TensorRT's legacy calibrator from them."""
    path = s.dir / f"calibration-{s.calibration.sha256[:16]}.npy"
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, s.calibration_images.astype(np.float32))
