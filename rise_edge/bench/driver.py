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

The jobs live apart: which engines and images (rise_edge.bench.plan), accuracy
(rise_edge.bench.scoring), latency (rise_edge.bench.timing), the written report
(rise_edge.bench.report); this module runs one engine after another and assembles report.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.logs import stage_lines
from rise_edge.logs import progress as progress_bar
from rise_edge.backend_table import backends, runner_for
from rise_edge.backends.base import Runner
from rise_edge.backends.latency import PERCENTILE_DEFINITION, mlperf_style
from rise_edge.backends.pytorch import TorchRunner
from rise_edge.bench.plan import (REFERENCE, DomainSet, EngineSpec, before_adapt, domain_sets,
                                  plan_engines, select_domains)
from rise_edge.bench.resources import GpuMemory, HostMemory, machine_info
from rise_edge.bench.scoring import Decoder, finish_accuracy, int8_judge, predict_domains, untimed
from rise_edge.bench.timing import latency_entries, max_batch
from rise_edge.config import BenchConfig, recipe_from_dict, recipe_to_dict
from rise_edge.data.domains import DomainSplits
from rise_edge.errors import UserError
from rise_edge.files import run_lock
from rise_edge.run_dir import (EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, TrainedRun, open_run,
                               read_export_record, run_splits, software_versions)

BENCH_DIR = "bench"
ACCURACY_BATCH = 32
SCHEMA = 1

FAILED = frozenset({"missing", "load-failed", "run-failed", "tampered", "unverified"})


def resolve_bench_config(run: TrainedRun, **flags: Any) -> BenchConfig:
    """The run's recipe.bench with command-line flags (None = not given) on top, validated like a recipe."""
    values = recipe_to_dict(run.recipe)["bench"]
    values.update({k: v for k, v in flags.items() if v is not None})
    return recipe_from_dict({"bench": values}, "bench options").bench


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


def _load(spec: EngineSpec, ctx: _Context) -> Runner:
    if spec.record is None:
        return TorchRunner(module=spec.student or ctx.run.student, device="auto")
    return runner_for(spec.record, ctx.run.path / EXPORT_DIR, device=spec.device)


def load_failure(spec: EngineSpec, exc: Exception) -> str:
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
        row.update(status="load-failed", reason=load_failure(spec, exc))
        ctx.log(f"{spec.name}: {row['reason']}")
        return row
    row.update(backend=runner.name, device=runner.device, precision=runner.precision)
    if getattr(runner, "fallback", None):  # the row says what ran, and that it was not what was asked
        row["warnings"].append(runner.fallback)
    loaded = ctx.host.current_bytes()
    total = sum(len(d.samples) for d in ctx.domains)
    batch = min(ACCURACY_BATCH, max_batch(spec) or ACCURACY_BATCH)
    try:
        with progress_bar(total=total, desc=f"{spec.name} accuracy", unit="img",
                          enabled=ctx.progress, leave=False) as bar:
            predictions[spec.name] = predict_domains(runner, ctx.domains, ctx.decode if spec.name == REFERENCE
                                             else untimed(ctx.decode), batch, bar)
        if ctx.site is not None:
            with progress_bar(total=len(ctx.site.source) + len(ctx.site.site_paths),
                              desc=f"{spec.name} site", unit="img", enabled=ctx.progress,
                              leave=False) as bar:
                ctx.site_logits[spec.name] = ctx.site.logits(
                    runner, lambda paths: ctx.decode([(p, 0) for p in paths], None), batch,
                    bar.update)
        row["latency"] = latency_entries(runner, spec, ctx.cfg, ctx.latency_images, ctx.log)
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
    log = stage_lines("bench", "bench", progress)
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {list(cfg.batch_sizes)}")
    run = open_run(run_dir)
    with run_lock(run_dir, "bench"):
        return _bench(run, cfg, log, progress, command, data_root, site, skip_bad_site)


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
    specs[1:1] = before_adapt(run, notes)
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
    finish_accuracy(rows, predictions, domains, len(run.meta.classes))
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
