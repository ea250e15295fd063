"""Which engines bench runs and on which images: the domains a run is scored on, and the reference
plus export.json's artefacts, each verified (status, reason, device) before anything loads.

predict (rise_edge.predict) chooses its artefact through the same checks, so an artefact bench
would mark stale, tampered, missing or unavailable is refused there for the same reason.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rise_edge.backend_table import artefacts, backend_for_engine, backends
from rise_edge.data.domains import DomainSplits, Sample
from rise_edge.errors import UserError
from rise_edge.files import is_plain_file_name
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, TrainedRun, open_run

REFERENCE = "pytorch"
BEFORE_ADAPT = "before-adapt"  # an adapted run's parent student, benched beside it


@dataclass(frozen=True)
class DomainSet:
    """The images one domain is scored on. `split` says which: the target's all, a source's val."""

    name: str
    role: str               # "target" or "source"
    split: str
    samples: tuple[Sample, ...]
    available: int          # images in that split before any max_images subset


def select_domains(run: TrainedRun, requested: Sequence[str]) -> list[str]:
    """Domain names to score: the target by default, 'all' for the run's every domain, else as named."""
    meta = run.meta
    known = [*meta.source_domains, meta.target_domain]
    if not requested:
        return [meta.target_domain]
    if "all" in requested:
        return sorted(known)
    chosen: list[str] = []
    for name in requested:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listing = ", ".join([*(f"{d} (source)" for d in meta.source_domains),
                                 f"{meta.target_domain} (target)"])
            raise UserError(f"unknown domain '{name}'{hint}; this run's domains: {listing}, or 'all'")
        if name not in chosen:
            chosen.append(name)
    return chosen


def domain_sets(run: TrainedRun, splits: DomainSplits, names: Sequence[str], max_images: int
                ) -> list[DomainSet]:
    sets = []
    for name in names:
        if name == run.meta.target_domain:
            samples, role, split = splits.test, "target", "all images (unseen target)"
        else:
            samples, role, split = splits.val[name], "source", "validation split (held out from training)"
        chosen = list(samples)
        if max_images and len(chosen) > max_images:  # seeded, in original order, same for every engine
            keep = sorted(random.Random(f"bench:{name}").sample(range(len(chosen)), max_images))
            chosen = [chosen[i] for i in keep]
        sets.append(DomainSet(name, role, split, tuple(chosen), len(samples)))
    return sets


@dataclass
class EngineSpec:
    name: str                      # row name: "pytorch" or the export artefact's name
    format: str                    # the format of the backend that runs it (rise_edge.backend_table)
    precision: str
    target: str
    record: dict[str, Any] | None  # export.json record (None for the reference)
    path: Path | None
    device: str = "auto"
    status: str = "pending"        # "pending": to be run
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    student: Any = None            # a PyTorch row's own student (the parent's, for before-adapt)
    recommendation: dict[str, Any] | None = None  # export.json's verdict on an INT8 artefact


QDQ_ON_CPU = ("the TensorRT INT8 Q/DQ graph, run on ONNX Runtime's CPU provider with its Q/DQ computed as "
              "written: its accuracy is what a TensorRT INT8 engine built from it computes, up to "
              "kernel rounding; its speed says nothing about TensorRT's (build the engine on the "
              "device for that)")


def ort_has(provider: str) -> bool:
    """Whether ONNX Runtime here can run `provider`: onnxruntime-gpu lists its CUDA and TensorRT
    providers on machines without a GPU too, where a session asked for them runs on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        return False
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and \
            not torch.cuda.is_available():
        return False
    return provider in onnxruntime.get_available_providers()


def check_record(spec: EngineSpec, student_sha: str | None) -> None:
    """Set spec.status/reason/device from its export record and this machine."""
    record = spec.record or {}
    if record.get("status") != "ok":
        spec.status = "not-exported"
        spec.reason = f"export status '{record.get('status')}': {record.get('reason', 'no reason given')}"
        return
    if student_sha and record.get("student_sha256") not in (None, student_sha):
        spec.status, spec.reason = "stale", (f"made from an earlier {STUDENT_FILE} than this run holds; "
                                             "re-export it with `rise-edge export`")
        return
    if not is_plain_file_name(record.get("path")):  # rise_edge.run_dir.artefact_file's rule
        spec.status, spec.reason = "tampered", (
            f"{EXPORT_JSON} names {record.get('path')!r} for it, which is not a file in {EXPORT_DIR}/; "
            "re-export it with `rise-edge export`")
        return
    if spec.path is not None and not record.get("sha256"):
        # Without its recorded hash a file cannot be told from any other model of that shape.
        spec.status, spec.reason = "unverified", (
            f"{EXPORT_JSON} records no sha256 for {spec.path.name}, so it cannot be verified as this "
            "run's export; re-export it with `rise-edge export` (which records one)")
        return
    if spec.path is not None:
        # Verified before it runs: a file swapped for another model of the same shape would
        # otherwise be benchmarked and reported as this run's.
        from rise_edge.files import file_sha256
        if spec.path.is_file() and file_sha256(spec.path) != record["sha256"]:
            spec.status, spec.reason = "tampered", (
                f"{spec.path.name} does not match the sha256 {EXPORT_JSON} recorded for it: it was "
                "changed or replaced after export; re-export it with `rise-edge export`")
            return
        # An artefact of several files (an IR and its weights file): every one is verified.
        for name, sha in dict(record.get("files", {})).items():
            part = spec.path.parent / Path(name).name
            if not part.is_file() or file_sha256(part) != sha:
                spec.status, spec.reason = "tampered", (
                    f"{Path(name).name}, part of {spec.path.name}, is missing or does not match the "
                    f"sha256 {EXPORT_JSON} recorded for it; re-export it with `rise-edge export`")
                return
    backend = backends().get(spec.format)
    if backend is None:
        spec.status, spec.reason = "unavailable", (
            f"no runner for artefact format '{spec.format}' (a backend not installed here?); "
            f"backends: {', '.join(backends())}")
        return
    reason = backend.unavailable()
    if reason:
        spec.status, spec.reason = "unavailable", f"{reason.rstrip('.')}; bench it where it can run."
        return
    if spec.format == "onnx" and spec.target == "tensorrt":
        if ort_has("TensorrtExecutionProvider"):
            spec.device = "tensorrt"
        else:
            # The Q/DQ graph is what a TensorRT INT8 engine computes, up to kernel rounding: its
            # accuracy per domain holds for the engine; its CPU speed says nothing about TensorRT's.
            spec.device = "cpu"
            spec.warnings.append(QDQ_ON_CPU)
    if spec.format == "onnx" and spec.target.endswith("-cpu"):
        # A graph placed for CPU kernels (U8S8 for x86, S8S8 for ARM) on a GPU provider measures
        # neither: it runs where its export record says it belongs.
        spec.device = "cpu"
    target = record.get("int8_target")
    built_for = target.get("kind") if isinstance(target, dict) else None
    if built_for:
        from rise_edge.export.int8_target import mismatch

        warning = mismatch(str(built_for))
        if warning:
            spec.warnings.append(warning)
    if spec.path is None or not spec.path.is_file():
        spec.status = "missing"
        spec.reason = f"{EXPORT_DIR}/{record.get('path')} is listed in {EXPORT_JSON} but not on disk"


def plan_engines(run: TrainedRun, export: dict[str, Any], requested: Sequence[str],
                 student_sha: str | None = None) -> list[EngineSpec]:
    """The reference first, then the chosen artefacts in export's table order, each with a status."""
    records: dict[str, dict[str, Any]] = dict(export.get("artefacts", {}))
    known = artefacts()
    order = {name: i for i, name in enumerate(known)}
    ordered = sorted(records, key=lambda n: (order.get(n, len(order)), n))
    engine_names = [b.name for b in backends().values() if b.name != REFERENCE]
    items = [t.strip().lower() for item in requested for t in item.split(",") if t.strip()]

    chosen: list[str] = []
    missing: list[EngineSpec] = []
    if not items:
        chosen = list(ordered)
    for item in items:
        backend = backend_for_engine(item) if item not in records else None
        if backend is not None and backend.name == REFERENCE:
            continue
        if backend is not None:
            found = [n for n in ordered if records[n].get("format") == backend.format]
            chosen += found
            if not found:
                fmt = backend.format
                missing.append(EngineSpec(backend.name, fmt, "-", "-", None, None, status="missing",
                                          reason=f"no {fmt} artefact in {EXPORT_DIR}/{EXPORT_JSON}; "
                                          f"make one with `rise-edge export {run.path} --format {fmt}`"))
        elif item in records:
            chosen.append(item)
        elif item in order:
            missing.append(EngineSpec(item, known[item].runs_on, known[item].precision, "-", None, None,
                                      status="missing",
                                      reason=f"not exported: {EXPORT_DIR}/{EXPORT_JSON} has no "
                                      f"'{item}'; make it with `rise-edge export {run.path}`"))
        else:
            valid = [REFERENCE, *engine_names, *ordered, *(n for n in order if n not in records)]
            close = difflib.get_close_matches(item, valid, n=1, cutoff=0.5)
            raise UserError(f"unknown engine '{item}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                            + f"; engines: {', '.join(valid)}")

    specs = [EngineSpec(REFERENCE, "pytorch", "fp32", "reference", None, run.path / STUDENT_FILE)]
    seen = set()
    for name in chosen:
        if name in seen:
            continue
        seen.add(name)
        record = records[name]
        spec = EngineSpec(name, str(record.get("format", "?")), str(record.get("precision", "?")),
                          str(record.get("target", "")), record,
                          run.path / EXPORT_DIR / record["path"]
                          if is_plain_file_name(record.get("path")) else None)
        check_record(spec, student_sha)
        spec.recommendation = recommendation(export, name)
        specs.append(spec)
    return specs + [m for m in missing if m.name not in seen]


def recommendation(export: dict[str, Any], name: str) -> dict[str, Any] | None:
    """export.json's verdict on artefact `name` (rise_edge.export.recommend), if it holds one."""
    recommended = export.get("recommended")
    candidates = recommended.get("candidates") if isinstance(recommended, dict) else None
    verdict = candidates.get(name) if isinstance(candidates, dict) else None
    return verdict if isinstance(verdict, dict) and isinstance(verdict.get("verdict"), str) else None


def before_adapt(run: TrainedRun, notes: list[str]) -> list[EngineSpec]:
    """For an adapted run (rise-edge adapt), its parent's student as a row: the 'before'."""
    from rise_edge.files import file_sha256
    from rise_edge.run_dir import read_adapt_record

    record = read_adapt_record(run.path)
    if record is None:
        return []
    parent = Path(record["parent"]["run_dir"])
    weights = parent / STUDENT_FILE
    if not weights.is_file() or file_sha256(weights) != record["parent"].get("student_sha256"):
        notes.append(f"this run was adapted from {parent}, whose student is gone or has changed "
                     "since: no before-adapt row")
        return []
    return [EngineSpec(BEFORE_ADAPT, "pytorch", "fp32", "the parent run's student", None, weights,
                       student=open_run(parent).student)]
