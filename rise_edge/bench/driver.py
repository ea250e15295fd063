"""`rise-edge bench`: accuracy and latency of every artefact of a run, per domain, in one report.

    report = bench_run("runs/pacs-sketch-seed0", BenchConfig(domains=("all",)))
    print(report.table())          # and RUN_DIR/bench/{report.json, report.md, *.png}

One row per engine x precision: the PyTorch student in eager FP32 (always: the reference every drop is
measured against), then every artefact in RUN_DIR/export/export.json (or those `engines` names). A row
that cannot run still appears, with its status and the reason:

    ok            accuracy and latency measured
    partial       accuracy measured; some batch size could not be timed (see its latency entry)
    unavailable   this machine cannot run it (no CUDA GPU, no TensorRT, a graph meant for TensorRT)
    not-exported  export.json records it, but its export did not succeed (export's status + reason)
    stale         made from an earlier student.safetensors than the run holds now; re-export it
    missing       asked for, or listed in export.json, but the file is not there
    load-failed   the file is there but does not load (damaged, or an engine built for another GPU
                  or TensorRT version)
    run-failed    it loaded but failed while running

Engines are benched one after another (load, accuracy over every chosen domain, latency at every
batch size, unload), so each row's memory peak is its own and a failing engine stops only its row.
Accuracy: top-1 on the target domain's images (all of them: the unseen test set) and on each source
domain's validation split (held out from training), with the confusion matrix and the agreement with
the reference's predictions. Images are decoded and preprocessed in the main thread, timed apart
from inference: that is the decode + preprocess figure. Latency: see rise_edge.backends.latency.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import gc
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rise_edge.backend_table import artefacts, backend_for_engine, backends, runner_for
from rise_edge.backends.base import Runner
from rise_edge.backends.latency import PERCENTILE_DEFINITION, TimingPlan, mlperf_style, time_runner
from rise_edge.backends.pytorch import TorchRunner
from rise_edge.bench.resources import GpuMemory, HostMemory, TegraStats, machine_info
from rise_edge.config import BenchConfig, recipe_from_dict, recipe_to_dict
from rise_edge.data.domains import DomainSplits, Sample, load_rgb
from rise_edge.data.transforms import eval_transform
from rise_edge.errors import UserError
from rise_edge.files import is_plain_file_name, run_lock
from rise_edge.run_dir import (EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, TrainedRun, open_run,
                               read_export_record, run_splits, software_versions)

BENCH_DIR = "bench"
REFERENCE = "pytorch"
BEFORE_ADAPT = "before-adapt"  # an adapted run's parent student, benched beside it
ACCURACY_BATCH = 32
SCHEMA = 1

FAILED = frozenset({"missing", "load-failed", "run-failed", "tampered", "unverified"})


def _log(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)
    return log


# ---------------------------------------------------------------------------------------------------
# Configuration and domains


def resolve_bench_config(run: TrainedRun, **flags: Any) -> BenchConfig:
    """The run's recipe.bench with command-line flags (None = not given) on top, validated like a recipe."""
    values = recipe_to_dict(run.recipe)["bench"]
    values.update({k: v for k, v in flags.items() if v is not None})
    return recipe_from_dict({"bench": values}, "bench options").bench


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


# ---------------------------------------------------------------------------------------------------
# Which engines: the reference + export.json's artefacts, each with what stops it from running here


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


def _ort_has(provider: str) -> bool:
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


def _check_record(spec: EngineSpec, student_sha: str | None) -> None:
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
        if _ort_has("TensorrtExecutionProvider"):
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
        _check_record(spec, student_sha)
        spec.recommendation = _recommendation(export, name)
        specs.append(spec)
    return specs + [m for m in missing if m.name not in seen]


# ---------------------------------------------------------------------------------------------------
# Decoding (timed apart from inference) and accuracy


class Decoder:
    """Decode + preprocess exactly as at inference, in this thread, timing it per domain."""

    def __init__(self, preprocessing: Any):
        self.transform = eval_transform(preprocessing)
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}

    def __call__(self, samples: Sequence[Sample], domain: str | None = None) -> np.ndarray:
        # preprocess_images is predict's path too (rise_edge.predict): one code for both.
        from rise_edge.data.transforms import preprocess_images

        begin = time.perf_counter()
        try:
            batch = preprocess_images(self.transform, (load_rgb(path) for path, _ in samples))
        except OSError as exc:
            raise UserError(f"cannot read an image of domain '{domain}': {exc}; fix or remove it "
                            "(or set data.skip_bad_images=true and re-train)") from None
        if domain is not None:
            self.seconds[domain] = self.seconds.get(domain, 0.0) + time.perf_counter() - begin
            self.images[domain] = self.images.get(domain, 0) + len(samples)
        return batch

    def figure(self) -> dict[str, Any]:
        seconds, images = sum(self.seconds.values()), sum(self.images.values())
        per_domain = {d: {"images": self.images[d], "seconds": self.seconds[d],
                          "images_per_s": self.images[d] / self.seconds[d] if self.seconds[d] else None}
                      for d in self.seconds}
        return {"what": "decode (PIL) + resize + to tensor + normalise, one thread, timed during the "
                        "reference engine's accuracy pass",
                "images": images, "seconds": seconds,
                "images_per_s": images / seconds if seconds else None,
                "ms_per_image": 1e3 * seconds / images if images else None, "per_domain": per_domain}


def predict(runner: Runner, domains: Sequence[DomainSet], decode: Decoder, batch: int,
            bar: tqdm) -> dict[str, np.ndarray]:
    """Predicted class per image, per domain (runs every image once)."""
    predictions = {}
    for domain in domains:
        found = []
        for start in range(0, len(domain.samples), batch):
            chunk = domain.samples[start:start + batch]
            logits = runner(decode(chunk, domain.name))
            found.append(np.asarray(logits).argmax(axis=1))
            bar.update(len(chunk))
        predictions[domain.name] = np.concatenate(found) if found else np.zeros(0, np.int64)
    return predictions


def score(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
          reference: np.ndarray | None) -> dict[str, Any]:
    """Top-1 (percent), confusion matrix (rows: true class, columns: predicted) and agreement."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    correct = int((predictions == labels).sum())
    images = int(labels.size)
    agreement = None if reference is None else float((predictions == reference).mean()) if images else None
    return {"top1": 100.0 * correct / images if images else None, "correct": correct, "images": images,
            "agreement_with_reference": agreement, "confusion_matrix": confusion.tolist()}


# ---------------------------------------------------------------------------------------------------
# One engine


@dataclass
class _Context:
    run: TrainedRun
    cfg: BenchConfig
    domains: list[DomainSet]
    latency_images: np.ndarray
    decode: Decoder
    log: Callable[[str], None]
    progress: bool
    host: HostMemory
    gpu: GpuMemory
    site: Any = None  # rise_edge.site.assess.SiteInputs when --site was given
    site_logits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _recommendation(export: dict[str, Any], name: str) -> dict[str, Any] | None:
    """export.json's verdict on artefact `name` (rise_edge.export.recommend), if it holds one."""
    recommended = export.get("recommended")
    candidates = recommended.get("candidates") if isinstance(recommended, dict) else None
    verdict = candidates.get(name) if isinstance(candidates, dict) else None
    return verdict if isinstance(verdict, dict) and isinstance(verdict.get("verdict"), str) else None


def _row(spec: EngineSpec, run_dir: Path) -> dict[str, Any]:
    record = spec.record or {}
    size = record.get("bytes") or record.get("size_bytes")
    if size is None and spec.path is not None and spec.path.is_file():
        size = spec.path.stat().st_size
    rel = None
    if spec.path is not None:
        try:
            rel = spec.path.relative_to(run_dir).as_posix()
        except ValueError:
            rel = str(spec.path)
    backend = backends().get(spec.format)
    return {"engine": spec.name, "backend": backend.name if backend else spec.format,
            "format": spec.format, "precision": spec.precision, "device": None, "target": spec.target,
            "path": rel, "status": spec.status, "reason": spec.reason, "warnings": list(spec.warnings),
            "size_bytes": size, "sha256": record.get("sha256"), "accuracy": {}, "latency": [],
            "mlperf": None, "resources": {}, "seconds": 0.0,
            **({"int8_judge": {**int8_judge(record), "recommendation": spec.recommendation or {
                "recommended": False, "verdict": "export.json holds no recommendation for it "
                                                 "(exported before recommendations): re-export"}}}
               if spec.precision == "int8" else {})}


def int8_judge(record: dict[str, Any]) -> dict[str, Any]:
    """The judge's verdict export recorded for an INT8 artefact (rise_edge.export.judge: budget,
    bound, rule), or a plain statement that it has none."""
    judged = record.get("accuracy_budget", {}).get("judge") or record.get("judge")
    stress = record.get("accuracy_budget", {}).get("stress") or record.get("stress")
    if judged:
        return {"judged": True, **judged, **({"stress": {k: v for k, v in stress.items()
                                                         if k != "fidelity"}} if stress else {})}
    why = record.get("accuracy_budget", {}).get("not_judged") or (
        "export.json holds no judgement of it (exported before rise-edge judged Q/DQ graphs: "
        "re-export to have it judged)")
    return {"judged": False, "reason": f"{why}: its accuracy per domain is in this report"}


def _load(spec: EngineSpec, ctx: _Context) -> Runner:
    if spec.record is None:
        return TorchRunner(module=spec.student or ctx.run.student, device="auto")
    return runner_for(spec.record, ctx.run.path / EXPORT_DIR, device=spec.device)


def _load_failure(spec: EngineSpec, exc: Exception) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())[:600]
    expected = (spec.record or {}).get("sha256")
    if expected and spec.path is not None and spec.path.is_file():
        from rise_edge.files import file_sha256
        if file_sha256(spec.path) != expected:
            text += f" ({spec.path.name} no longer matches the sha256 in {EXPORT_JSON}: it changed or " \
                    "was damaged after export; re-export it)"
    built_on = (spec.record or {}).get("device")
    if spec.format == "tensorrt" and built_on:
        try:
            from rise_edge.backends.tensorrt.build import device_tag
            here = device_tag()
        except Exception:  # no TensorRT or no GPU: the runner's own message already says so
            here = None
        if here and here != built_on:
            text += f" (built on {built_on}, this machine is {here}: rebuild the engine here with " \
                    "`rise-edge export --format tensorrt`)"
    return f"could not load {spec.path.name if spec.path else spec.name}: {text}"


def _max_batch(spec: EngineSpec) -> int | None:
    profile = (spec.record or {}).get("batch_profile")
    return int(profile[-1]) if isinstance(profile, list) and profile else None


def _latency_entries(runner: Runner, spec: EngineSpec, ctx: _Context) -> list[dict[str, Any]]:
    plan = TimingPlan(ctx.cfg.warmup, ctx.cfg.iterations, ctx.cfg.duration_s)
    entries = []
    for batch in ctx.cfg.batch_sizes:
        limit = _max_batch(spec)
        if limit is not None and batch > limit:
            entries.append({"batch_size": batch, "status": "unsupported",
                            "reason": f"beyond the engine's batch profile (max {limit})"})
            continue
        images = np.resize(ctx.latency_images, (batch, *ctx.latency_images.shape[1:]))
        ctx.log(f"{spec.name}: timing batch {batch} ({plan.describe()})")
        try:
            with TegraStats() as power:
                stats = time_runner(runner, images, plan, cuda_graphs=ctx.cfg.cuda_graphs)
        except Exception as exc:  # a backend failing at one shape must not lose the others
            entries.append({"batch_size": batch, "status": "failed",
                            "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"})
            continue
        stats["power"] = power.summary(stats["total_ms"] / 1e3, stats["count"] * batch)
        entries.append({"status": "ok", **stats})
    return entries


def bench_engine(spec: EngineSpec, ctx: _Context, predictions: dict[str, dict[str, np.ndarray]]
                 ) -> dict[str, Any]:
    """Load, score on every domain, time at every batch size; a row, whatever happens."""
    row = _row(spec, ctx.run.path)
    if spec.status != "pending":
        return row
    begin = time.perf_counter()
    ctx.host.reset()
    ctx.gpu.reset()
    before = ctx.host.current_bytes()
    ctx.log(f"{spec.name}: loading")
    try:
        runner = _load(spec, ctx)
    except Exception as exc:  # damaged files fail inside onnx/onnxruntime/tensorrt in many ways
        row.update(status="load-failed", reason=_load_failure(spec, exc))
        ctx.log(f"{spec.name}: {row['reason']}")
        return row
    row.update(backend=runner.name, device=runner.device, precision=runner.precision)
    if getattr(runner, "fallback", None):  # the row says what ran, and that it was not what was asked
        row["warnings"].append(runner.fallback)
    loaded = ctx.host.current_bytes()
    total = sum(len(d.samples) for d in ctx.domains)
    batch = min(ACCURACY_BATCH, _max_batch(spec) or ACCURACY_BATCH)
    try:
        with tqdm(total=total, desc=f"{spec.name} accuracy", unit="img", file=sys.stderr,
                  disable=not ctx.progress, leave=False) as bar:
            predictions[spec.name] = predict(runner, ctx.domains, ctx.decode if spec.name == REFERENCE
                                             else _untimed(ctx.decode), batch, bar)
        if ctx.site is not None:
            with tqdm(total=len(ctx.site.source) + len(ctx.site.site_paths), file=sys.stderr,
                      desc=f"{spec.name} site", unit="img", disable=not ctx.progress,
                      leave=False) as bar:
                ctx.site_logits[spec.name] = ctx.site.logits(
                    runner, lambda paths: ctx.decode([(p, 0) for p in paths], None), batch,
                    bar.update)
        row["latency"] = _latency_entries(runner, spec, ctx)
        row["status"] = "ok" if all(e["status"] == "ok" for e in row["latency"]) else "partial"
        if row["status"] == "partial":
            row["reason"] = "; ".join(f"batch {e['batch_size']}: {e['reason']}"
                                      for e in row["latency"] if e["status"] != "ok")
    except UserError:
        raise
    except Exception as exc:  # a backend's runtime error stops this row only
        row.update(status="run-failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}")
        ctx.log(f"{spec.name}: FAILED: {row['reason']}")
    row["mlperf"] = mlperf_style(row["latency"])
    row["resources"] = {"peak_host_rss_bytes": ctx.host.peak_bytes(), "peak_host_rss_scope": ctx.host.scope,
                        "host_rss_before_load_bytes": before, "host_rss_load_delta_bytes": loaded - before,
                        "peak_gpu_allocated_bytes": ctx.gpu.peak_bytes()}
    row["seconds"] = time.perf_counter() - begin
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _untimed(decode: Decoder) -> Callable[[Sequence[Sample], str | None], np.ndarray]:
    """The same decoding without adding to the decode figure (measured once, on the reference)."""
    return lambda samples, domain=None: decode(samples, None)


# ---------------------------------------------------------------------------------------------------
# The whole bench


@dataclass
class BenchReport:
    """report.json's content (`data`) and the folder it was written to (`path`)."""

    data: dict[str, Any]
    path: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    @property
    def failed(self) -> list[str]:
        return [r["engine"] for r in self.rows if r["status"] in FAILED]

    def table(self) -> str:
        from rise_edge.bench.report import format_table
        return format_table(self.data)


def _finish_accuracy(rows: list[dict[str, Any]], predictions: dict[str, dict[str, np.ndarray]],
                     domains: Sequence[DomainSet], num_classes: int) -> None:
    reference = predictions.get(REFERENCE)
    for row in rows:
        found = predictions.get(row["engine"])
        if found is None or row["status"] == "run-failed":
            continue
        for domain in domains:
            labels = np.array([y for _, y in domain.samples], dtype=np.int64)
            ref = reference.get(domain.name) if reference else None
            entry = score(found[domain.name], labels, num_classes, ref)
            ref_top1 = 100.0 * float((ref == labels).mean()) if ref is not None and labels.size else None
            entry["drop_points"] = (ref_top1 - entry["top1"]) if ref_top1 is not None else None
            row["accuracy"][domain.name] = entry


def default_command(run_dir: Path, cfg: BenchConfig) -> str:
    """The `rise-edge bench` command that repeats this bench (every option spelled out)."""
    parts = ["rise-edge", "bench", str(run_dir)]
    for domain in cfg.domains:
        parts += ["--domain", domain]
    if cfg.engines:
        parts += ["--engines", ",".join(cfg.engines)]
    for batch in cfg.batch_sizes:
        parts += ["--batch", str(batch)]
    parts += (["--duration", f"{cfg.duration_s:g}"] if cfg.duration_s > 0
              else ["--iterations", str(cfg.iterations)])
    parts += ["--warmup", str(cfg.warmup)]
    if cfg.max_images:
        parts += ["--max-images", str(cfg.max_images)]
    if cfg.cuda_graphs:
        parts.append("--cuda-graphs")
    return shlex.join(parts)


def bench_run(run_dir: str | Path, cfg: BenchConfig, *, progress: bool = True,
              command: str | None = None, data_root: str | None = None,
              site: str | Path | None = None, skip_bad_site: bool = False) -> BenchReport:
    """Bench every chosen engine of a run on the chosen domains; write RUN_DIR/bench/ and return it."""
    run_dir = Path(run_dir)
    log = _log(progress)
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {list(cfg.batch_sizes)}")
    run = open_run(run_dir)
    with run_lock(run_dir, "bench"):
        return _bench(run, cfg, log, progress, command, data_root, site, skip_bad_site)


def _before_adapt(run: TrainedRun, notes: list[str]) -> list[EngineSpec]:
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


def _site_inputs(run: TrainedRun, splits: DomainSplits, site: str | Path, skip_bad: bool,
                 progress: bool, notes: list[str]) -> Any:
    from rise_edge.site.assess import SiteInputs, source_validation
    from rise_edge.data.site_images import find_site_images

    images = find_site_images(site, runs=(run.path,), skip_bad=skip_bad, progress=progress)
    notes.extend(images.notes)
    source = source_validation(splits)
    if not source:
        raise UserError("--site: the run's source domains have no validation images, and the "
                        "estimators are calibrated on them")
    return images, SiteInputs(source, images.paths)


def _site_record(ctx: _Context, images: Any, splits: DomainSplits, rows: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    """report.json's "site": the images, the teacher's view, and each engine's estimates."""
    from rise_edge.site.assess import assess, teacher_view

    decode = lambda paths: ctx.decode([(p, 0) for p in paths], None)  # noqa: E731
    teacher = teacher_view(ctx.run.recipe, splits, ctx.site, decode, ctx.run.meta.preprocessing,
                           [ctx.run.path / "text_embeddings"], log=ctx.log)
    for row in rows:
        if row["engine"] in ctx.site_logits and row["status"] != "run-failed":
            row["site"] = assess(ctx.site, *ctx.site_logits[row["engine"]], ctx.run.meta.classes,
                                 teacher)
    return {**images.to_record(),
            "teacher": None if teacher is None else {
                "model": teacher["model"], "source_error": round(100 * teacher["source_error"], 2)},
            "calibration": f"{len(ctx.site.source)} source validation images",
            "what": "estimates from unlabelled images, not measurements; each estimator's measured "
                    "error is in docs/site.md"}


def _bench(run: TrainedRun, cfg: BenchConfig, log: Callable[[str], None], progress: bool,
           command: str | None, data_root: str | None, site: str | Path | None = None,
           skip_bad_site: bool = False) -> BenchReport:
    from rise_edge.bench.report import write_report
    from rise_edge.files import file_sha256

    run_dir = run.path
    names = select_domains(run, cfg.domains)
    export = read_export_record(run_dir, advice=f"re-run `rise-edge export {run_dir}`")
    student_sha256 = file_sha256(run_dir / STUDENT_FILE)
    specs = plan_engines(run, export, cfg.engines, student_sha256)
    notes: list[str] = []
    specs[1:1] = _before_adapt(run, notes)
    splits = run_splits(run, data_root)
    if tuple(splits.classes) != tuple(run.meta.classes):
        raise UserError(f"the data set's classes ({', '.join(splits.classes)}) differ from the student's "
                        f"({', '.join(run.meta.classes)}); is data.root pointing at the right folder?")
    domains = domain_sets(run, splits, names, cfg.max_images)
    if not any(d.samples for d in domains):
        raise UserError(f"no images to score in domain(s) {', '.join(names)}")
    decode = Decoder(run.meta.preprocessing)
    first = next(d for d in domains if d.samples)
    wanted = min(max(cfg.batch_sizes), len(first.samples))
    latency_images = decode(first.samples[:wanted])
    ctx = _Context(run, cfg, domains, latency_images, decode, log, progress, HostMemory(), GpuMemory())
    site_images = None
    if site is not None:
        site_images, ctx.site = _site_inputs(run, splits, site, skip_bad_site, progress, notes)
    if not export:
        notes.append(f"no {EXPORT_DIR}/{EXPORT_JSON}: only the PyTorch student was benched; make artefacts "
                     f"with `rise-edge export {run_dir}`")
    log(f"{len(specs)} engine(s) x {len(domains)} domain(s) "
        f"({', '.join(f'{d.name}: {len(d.samples)} images' for d in domains)})")

    started = datetime.datetime.now(datetime.timezone.utc)
    predictions: dict[str, dict[str, np.ndarray]] = {}
    rows = [bench_engine(spec, ctx, predictions) for spec in specs]
    _finish_accuracy(rows, predictions, domains, len(run.meta.classes))
    site_record = None if site_images is None else _site_record(ctx, site_images, splits, rows)

    data = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": command or default_command(run_dir, cfg) + (
            f" --site {shlex.quote(str(site))}" if site is not None else ""),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],  # the program by name, not its install path
        "run_dir": str(run_dir),
        "student": {"model": run.meta.model, "classes": list(run.meta.classes),
                    "source_domains": list(run.meta.source_domains),
                    "target_domain": run.meta.target_domain,
                    "preprocessing": run.meta.preprocessing.to_dict(),
                    "sha256": student_sha256},
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "versions": software_versions(),
        "reference": REFERENCE,
        "domains": [{"name": d.name, "role": d.role, "split": d.split, "images": len(d.samples),
                     "available": d.available} for d in domains],
        "preprocess": decode.figure(),
        "latency_input": {"domain": first.name, "distinct_images": int(latency_images.shape[0]),
                          "note": "real images of that domain, repeated to fill larger batches"},
        "definitions": {
            "top1": "percent of images whose arg-max logit is the true class",
            "drop_points": "reference top-1 minus this engine's top-1, in points (positive: worse)",
            "latency": "pure inference of one staged batch (run_staged), synchronised after every run",
            "percentiles": PERCENTILE_DEFINITION,
            "images_per_s": "batch size x runs / sum of the timed runs",
            "mlperf": "SingleStream: p90 of batch-1 runs one after another; Offline: best images/s over "
                      "the batch sizes; MLPerf-style, not LoadGen-driven",
        },
        "notes": notes,
        "rows": rows,
        **({"site": site_record} if site_record is not None else {}),
    }
    out_dir = run_dir / BENCH_DIR
    write_report(data, out_dir)  # adds data["files"]
    from rise_edge.track import log_run_files  # the report to the run's trackers (log:), if any
    log_run_files(run_dir, run.recipe, "bench", [out_dir / name for name in data["files"].values()])
    return BenchReport(data, out_dir)
