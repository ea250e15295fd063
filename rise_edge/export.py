"""`rise-edge export`: turn a trained run into deployable artefacts, all recorded in export/export.json.

    RUN_DIR/export/
      export.json                       every artefact with its status, checks and provenance
      model.onnx                        FP32, image (N, 3, S, S) float -> logits (N, C), dynamic batch
      model.uint8-nhwc.onnx             the same with preprocessing folded in: uint8 (N, S, S, 3) input
      model.int8-cpu.onnx               INT8 QDQ for ONNX Runtime on the CPU (after the accuracy budget)
      model.int8-qat.onnx               QAT: explicit symmetric Q/DQ (TensorRT's form; runs anywhere)
      model.int8-qat-cpu.onnx           QAT's weights with ONNX Runtime's CPU Q/DQ placement
      qat/<key>/                        QAT state (resume after a kill) and its best step
      model.int8-qdq-tensorrt.onnx      INT8 Q/DQ placed for TensorRT (nvidia-modelopt)
      model.{fp32,fp16,int8}.engine     TensorRT engines (built on the device that runs them)
      model.{fp32,fp16}.torch-trt.ep    Torch-TensorRT ExportedPrograms
      calibration-<sha>.npy, cache/     calibration tensors for the device, range and timing caches

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
import difflib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rise_edge.calibration import (CalibrationSet, balanced_val_samples, file_sha256,
                                   load_images, select_calibration_set, select_fidelity_samples)
from rise_edge.config import ExportConfig, parse_override, recipe_from_dict, recipe_to_dict
from rise_edge.engines import META_PREFIX, ENGINES, GPU_FORMATS, OnnxRuntimeRunner, TorchRunner
from rise_edge.errors import UserError, missing_extra
from rise_edge.graph_form import fold_constants, module_of_onnx_node, with_static_padding
from rise_edge.paths import cache_key
from rise_edge.quantize import FidelitySet, sqnr_db
from rise_edge.resources import software_versions
from rise_edge.run_dir import (EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, TrainedRun, atomic_path, open_run,
                               read_export_record, run_lock, run_splits, write_json_atomic)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PARITY_IMAGES = 32  # source-val images for ONNX / engine vs PyTorch checks
FORMATS = ("onnx", "tensorrt", "torch-tensorrt")


@dataclass(frozen=True)
class ArtefactSpec:
    format: str       # a key of engines.ENGINES: which runner loads it
    precision: str
    filename: str
    target: str       # what it is meant to run on
    needs: tuple[str, ...] = ()


ARTEFACTS: dict[str, ArtefactSpec] = {
    "onnx-fp32": ArtefactSpec("onnx", "fp32", "model.onnx", "any ONNX runtime"),
    "onnx-fp32-uint8": ArtefactSpec("onnx", "fp32", "model.uint8-nhwc.onnx", "any ONNX runtime"),
    "onnx-int8": ArtefactSpec("onnx", "int8", "model.int8-cpu.onnx", "onnxruntime-cpu", ("onnx-fp32",)),
    "onnx-int8-tensorrt": ArtefactSpec("onnx", "int8", "model.int8-qdq-tensorrt.onnx", "tensorrt",
                                       ("onnx-fp32",)),
    "onnx-int8-qat": ArtefactSpec("onnx", "int8", "model.int8-qat.onnx",
                                  "tensorrt (strongly typed) and any ONNX runtime", ("onnx-fp32",)),
    "onnx-int8-qat-cpu": ArtefactSpec("onnx", "int8", "model.int8-qat-cpu.onnx", "onnxruntime-cpu",
                                      ("onnx-int8-qat",)),
    "tensorrt-fp32": ArtefactSpec("tensorrt", "fp32", "model.fp32.engine", "tensorrt", ("onnx-fp32",)),
    "tensorrt-fp16": ArtefactSpec("tensorrt", "fp16", "model.fp16.engine", "tensorrt", ("onnx-fp32",)),
    "tensorrt-int8": ArtefactSpec("tensorrt", "int8", "model.int8.engine", "tensorrt", ("onnx-fp32",)),
    "torch-tensorrt-fp32": ArtefactSpec("torch-tensorrt", "fp32", "model.fp32.torch-trt.ep", "tensorrt"),
    "torch-tensorrt-fp16": ArtefactSpec("torch-tensorrt", "fp16", "model.fp16.torch-trt.ep", "tensorrt"),
}
assert all(spec.format in ENGINES for spec in ARTEFACTS.values())


def plan_artefacts(cfg: ExportConfig) -> list[str]:
    """The artefacts a config asks for, prerequisites first."""
    formats = set(FORMATS) if "all" in cfg.formats else set(cfg.formats)
    unknown = sorted(formats - set(FORMATS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*FORMATS, "all"], n=1)
        raise UserError(f"unknown export format '{unknown[0]}'"
                        + (f"; did you mean '{close[0]}'?" if close else "")
                        + f"; formats: {', '.join(FORMATS)}, all")
    if len(cfg.batch_profile) != 3 or not 1 <= cfg.batch_profile[0] <= cfg.batch_profile[1] <= \
            cfg.batch_profile[2]:
        raise UserError(f"export.batch_profile must be three batch sizes min <= opt <= max, "
                        f"got {list(cfg.batch_profile)}")
    names = ["onnx-fp32"]
    if "onnx" in formats:
        names += ["onnx-fp32-uint8"] if cfg.fold_preprocessing else []
        names += ["onnx-int8"] if cfg.int8 else []
        names += ["onnx-int8-qat", "onnx-int8-qat-cpu"] if cfg.int8 and cfg.qat != "off" else []
    if "tensorrt" in formats:
        if cfg.int8 and cfg.qat != "off" and "onnx-int8-qat" not in names:
            names += ["onnx-int8", "onnx-int8-qat"]  # the engine is built from QAT's Q/DQ graph
        names += ["onnx-int8-tensorrt", "tensorrt-int8"] if cfg.int8 else []
        names += ["tensorrt-fp16"] if cfg.fp16 else []
        names += ["tensorrt-fp32"] if not (cfg.int8 or cfg.fp16) else []
    if "torch-tensorrt" in formats:
        names += ["torch-tensorrt-fp16" if cfg.fp16 else "torch-tensorrt-fp32"]
    return names


@dataclass
class ExportResult:
    """What an export produced: this run's records (name -> record) and where export.json is."""

    artefacts: dict[str, dict[str, Any]]
    path: Path
    attempted: list[str] = field(default_factory=list)

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
# ONNX graph export


class FoldedPreprocessing(nn.Module):
    """uint8 (N, S, S, 3) camera pixels -> cast, scale to [0, 1], normalise, to NCHW -> student logits."""

    def __init__(self, student: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.student = student
        std_t, mean_t = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        return self.student(images)


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write `module` as ONNX with a dynamic batch axis; returns the exporter used.

    Constant sub-graphs are folded afterwards (graph_form.fold_constants), so pads and quantized
    weights are initializers, not arithmetic. The legacy TorchScript exporter (dynamo=False) comes first, deliberately: for timm CNNs on CPU it
    exports in a fraction of a second where the torch.export-based one takes seconds (0.1 s vs 3.5 s
    for test_resnet, 0.5 s vs 4.3 s for ResNet-18, torch 2.14), and it emits GlobalAveragePool +
    Flatten, which ONNX Runtime's quantizer and TensorRT both handle as pooling, where the dynamo
    exporter writes ReduceMean + Reshape. Both match PyTorch to ~1e-7. The dynamo exporter is the
    fallback when the legacy one fails (ops it cannot trace) or is gone from a future torch.
    """
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        fold_constants(path)
        return "torchscript"
    except Exception as legacy_error:  # the exporter raises many types; try the other one
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                  external_data=False, optimize=True)
        except Exception as dynamo_error:
            def first_line(error: Exception) -> str:  # the exporters append whole graph dumps
                return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise UserError(f"ONNX export failed with both exporters: legacy: "
                            f"{first_line(legacy_error)}; dynamo: {first_line(dynamo_error)}") from None
        fold_constants(path)
        return "dynamo"


def stamp_metadata(path: Path, values: dict[str, Any]) -> None:
    """Set rise_edge.* metadata_props (JSON values) on an ONNX file, in place, and check the model."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------------
# The export session: what every artefact maker shares (data loaded lazily, once)


class ExportSession:
    def __init__(self, run: TrainedRun, cfg: ExportConfig, log: Callable[[str], None],
                 data_root: str | None = None):
        self.run, self.cfg, self.log, self.data_root = run, cfg, log, data_root
        self.dir = run.path / EXPORT_DIR
        self.student_sha256 = file_sha256(run.path / STUDENT_FILE)
        self.pre = run.meta.preprocessing
        self._cache: dict[str, Any] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.previous_calibration: dict[str, Any] = {}

    def path_of(self, name: str) -> Path:
        return self.dir / ARTEFACTS[name].filename

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def splits(self) -> Any:
        """The splits training recorded (images it skipped stay out), re-rooted when data moved."""
        return self._once("splits", lambda: run_splits(self.run, self.data_root))

    @property
    def calibration(self) -> CalibrationSet:
        return self._once("calibration", lambda: select_calibration_set(
            self.splits, self.cfg.calibration_size, self.cfg.calibration_seed))

    @property
    def calibration_images(self) -> np.ndarray:
        def load() -> np.ndarray:
            self.log(f"loading {len(self.calibration.files)} calibration images")
            return load_images(self.calibration.paths, self.pre)
        return self._once("calibration_images", load)

    @property
    def fidelity(self) -> FidelitySet:
        """Source images on which INT8 is judged against FP32 (never the target domain)."""
        def load() -> FidelitySet:
            chosen = select_fidelity_samples(self.splits, self.cfg.fidelity_images,
                                             set(self.calibration.files))
            self.log(f"loading {sum(len(v) for v in chosen.values())} source images to judge INT8 on")
            return FidelitySet({d: (load_images([p for p, _ in v], self.pre),
                                    np.array([y for _, y in v])) for d, v in chosen.items()})
        return self._once("fidelity", load)

    @property
    def fidelity_reference(self) -> dict[str, np.ndarray]:
        """The FP32 ONNX's logits on the fidelity images: what every INT8 artefact is judged against."""
        return self._once("fidelity_reference",
                          lambda: self.fidelity.logits_of(self.path_of("onnx-fp32")))

    def cpu_quantizer(self, fp32: Path, work_dir: Path) -> Any:
        """ONNX Runtime's CPU quantizer for an FP32 graph (pre-processed into `work_dir`), calibrated
        on this export's calibration set, its ranges cached under export/cache/."""
        import onnxruntime

        from rise_edge.quantize import CpuQuantizer, cpu_quant_settings, preprocess

        pre = work_dir / f"{fp32.stem}-pre.onnx"
        preprocess(fp32, pre)
        (self.dir / "cache").mkdir(exist_ok=True)
        return CpuQuantizer(pre, INPUT_NAME, self.calibration_images, self.cfg.calibration_method,
                            cpu_quant_settings(), self.dir / "cache",
                            model_sha256=f"{file_sha256(fp32)}+ort{onnxruntime.__version__}",
                            calibration_sha256=self.calibration.sha256)

    @property
    def parity_images(self) -> np.ndarray:
        return self._once("parity", lambda: load_images(
            [p for p, _ in balanced_val_samples(self.splits, PARITY_IMAGES)], self.pre))

    def data_reachable(self) -> bool:
        try:
            self.calibration
        except UserError:
            return False
        return True

    def device_calibration(self) -> tuple[np.ndarray, str]:
        """Calibration images and their set's sha256: from the data set when it is here, else from
        the calibration-<sha>.npy an earlier export (on the workstation) left beside the ONNX."""
        if self.data_reachable():
            return self.calibration_images, self.calibration.sha256
        sha = self.previous_calibration.get("sha256", "")
        path = self.dir / f"calibration-{sha[:16]}.npy"
        if not sha or not path.is_file():
            self.calibration  # raises the data set's own UserError, which says what is missing
        return np.load(path).astype(np.float32), sha

    def reference_logits(self) -> np.ndarray:
        return self._once("reference", lambda: TorchRunner(module=self.run.student, device="cpu")(
            self.parity_images))

    def metadata(self, precision: str, input_kind: str) -> dict[str, Any]:
        meta = self.run.meta
        return {"classes": list(meta.classes), "input_size": self.pre.input_size,
                "mean": list(self.pre.mean), "std": list(self.pre.std),
                "interpolation": self.pre.interpolation, "source_domains": list(meta.source_domains),
                "target_domain": meta.target_domain, "model": meta.model, "precision": precision,
                "input": input_kind, "student_sha256": self.student_sha256,
                "recipe": recipe_to_dict(self.run.recipe)}

    def check_parity(self, candidate: Callable[[np.ndarray], np.ndarray], what: str,
                     tolerance: float | None, *, needs_data: bool = True) -> dict[str, Any]:
        """Max |logit difference| and top-1 agreement vs PyTorch on real source-val images;
        a UserError past `tolerance` (None: record only, as for reduced precisions). With
        needs_data=False (engines built on a device without the data set) a missing data set is
        recorded as 'not checked' instead of failing the artefact."""
        if not needs_data and not self.data_reachable():
            return {"checked": False, "reason": "the data set is not reachable on this machine"}
        reference = self.reference_logits()
        logits = candidate(self.parity_images)
        diff = float(np.abs(logits - reference).max())
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
        record = {"images": len(reference), "max_abs_logit_diff": diff,
                  "top1_agreement": round(agreement, 4), "tolerance": tolerance}
        if tolerance is not None and not diff <= tolerance:
            raise UserError(f"{what} disagrees with PyTorch: max |logit difference| {diff:.3g} > "
                            f"export.parity_tolerance {tolerance:g} on {len(reference)} source-val "
                            f"images (top-1 agreement {agreement:.1%}); the artefact was not written")
        return record


# ---------------------------------------------------------------------------------------------------
# One function per artefact: write to `tmp` (renamed into place by the caller when it returns)


def make_onnx_fp32(s: ExportSession, tmp: Path) -> dict[str, Any]:
    size = s.pre.input_size
    student, static_pads = with_static_padding(s.run.student, size)
    exporter = export_graph(student, torch.randn(2, 3, size, size), tmp, s.cfg.opset)
    stamp_metadata(tmp, s.metadata("fp32", "float32-nchw"))
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the FP32 ONNX", s.cfg.parity_tolerance)
    return {"exporter": exporter, "opset": s.cfg.opset, "input": "float32-nchw",
            "input_shape": ["batch", 3, size, size], "parity": parity,
            "static_padding_layers": static_pads}


def make_onnx_fp32_uint8(s: ExportSession, tmp: Path) -> dict[str, Any]:
    size = s.pre.input_size
    folded = FoldedPreprocessing(with_static_padding(s.run.student, size)[0], s.pre.mean, s.pre.std)
    exporter = export_graph(folded, torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8), tmp,
                            s.cfg.opset)
    stamp_metadata(tmp, s.metadata("fp32", "uint8-nhwc"))
    runner = OnnxRuntimeRunner(tmp)  # feeds uint8 pixels made from the normalised images

    def torch_on_same_pixels(images: np.ndarray) -> np.ndarray:
        pixels = runner._to_model_input(images)
        with torch.no_grad():
            return folded(torch.from_numpy(pixels)).numpy()

    # Compared with PyTorch on the SAME uint8 pixels, so only the graph's arithmetic is judged.
    parity = s.check_parity(runner, "the uint8-input ONNX", None)
    exact = np.abs(runner(s.parity_images) - torch_on_same_pixels(s.parity_images)).max()
    if not exact <= s.cfg.parity_tolerance:
        raise UserError(f"the uint8-input ONNX disagrees with PyTorch on the same pixels: max |logit "
                        f"difference| {exact:.3g} > export.parity_tolerance {s.cfg.parity_tolerance:g}")
    parity["max_abs_logit_diff_same_pixels"] = float(exact)
    return {"exporter": exporter, "opset": s.cfg.opset, "input": "uint8-nhwc",
            "input_shape": ["batch", size, size, 3], "parity": parity}


def make_onnx_int8(s: ExportSession, tmp: Path) -> dict[str, Any]:
    from rise_edge.graph_form import shape_mismatches
    from rise_edge.quantize import latency_ms, quantize_within_budget

    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        work_dir = Path(work)
        quantizer = s.cpu_quantizer(s.path_of("onnx-fp32"), work_dir)
        settings, pre = quantizer.settings, quantizer.pre_path
        budget = quantize_within_budget(quantizer, tmp, s.fidelity, s.fidelity_reference,
                                        s.cfg.accuracy_budget, s.cfg.max_fallback_layers, work_dir,
                                        s.log)
        mismatches = shape_mismatches(pre, tmp, s.parity_images[:1], INPUT_NAME)
        if mismatches:
            raise UserError(f"the INT8 graph computes other shapes than the FP32 graph "
                            f"({len(mismatches)} node(s), first: {mismatches[0]}); not written")
        models = {"fp32": pre, "int8": work_dir / "int8-all.onnx"}
        if budget.kept_fp32:
            models["int8_with_fallback"] = tmp
        latency = latency_ms(models, s.parity_images[:1])
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"),
                         "kept_fp32_layers": budget.kept_fp32, "quantization": settings.to_record()})
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the INT8 ONNX", None)
    if not budget.met:
        s.log(f"INT8 misses the accuracy budget ({budget.final.worst_drop:.2f} > "
              f"{s.cfg.accuracy_budget:g} points on a source domain) with {len(budget.kept_fp32)} "
              "layer(s) in FP32: quantization-aware fine-tuning usually recovers it: "
              "rise-edge export RUN --int8 --qat (or set export.qat: auto)")
    return {"tool": "onnxruntime.quantization.quantize_static", "format_detail": "QDQ",
            "calibration_method": s.cfg.calibration_method, "calibration_sha256": s.calibration.sha256,
            "quantization": settings.to_record(), "accuracy_budget": budget.to_record(),
            "shapes_checked": "every Conv/Pool/Pad output shape equals the FP32 graph's",
            "latency_batch1_ms": latency, "parity": parity}


# Fake-quant PyTorch vs the Q/DQ graph in ONNX Runtime: its fused integer kernels round a few
# activations one step differently, and in a deep network those steps add up (Lite0: 5.7 % of the
# largest logit at worst, about 30 dB), while a wrong scale or placement costs far more. Judged on
# the logits' SQNR and top-1 agreement over the parity images.
QAT_PARITY_MIN_SQNR_DB = 20.0
QAT_PARITY_MIN_AGREEMENT = 0.9


def _qat(s: ExportSession) -> Any:
    """Run (or resume) quantization-aware fine-tuning once per export; see rise_edge/qat.py."""
    def run() -> Any:
        from rise_edge.qat import qat_finetune

        result = qat_finetune(s.run, s.splits, s.cfg, s.calibration_images, s.dir / "qat",
                              {"student": s.student_sha256, "calibration": s.calibration.sha256},
                              s.log, keep_fp32=_edge_layers_in_fp32(s))
        s.run.student.cpu()
        return result
    return s._once("qat", run)


def _edge_layers_in_fp32(s: ExportSession) -> list[str]:
    """Module names of the first/last layers that post-training INT8 measured better in FP32
    (export.json's edge_policy), so QAT keeps the same policy."""
    policy = s.records.get("onnx-int8", {}).get("accuracy_budget", {}).get("edge_policy", {})
    layers = [v["layer"] for v in policy.values() if isinstance(v, dict) and v.get("decision") == "fp32"]
    return [module_of_onnx_node(s.run.student, layer) for layer in layers]


def make_onnx_int8_qat(s: ExportSession, tmp: Path) -> dict[str, Any]:
    """The fake-quant student as an explicit Q/DQ graph: symmetric INT8, per-channel weights, Q/DQ on
    every weighted layer's input (TensorRT's placement: it builds this as a strongly typed engine)."""
    qat = _qat(s)
    size = s.pre.input_size
    exporter = export_graph(qat.model, torch.randn(2, 3, size, size), tmp, s.cfg.opset)
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"), "quantization": "qat"})
    with torch.no_grad():
        fake_quant = qat.model(torch.from_numpy(s.parity_images)).numpy()
    onnx_logits = OnnxRuntimeRunner(tmp)(s.parity_images)
    sqnr = sqnr_db(fake_quant, onnx_logits)
    agreement = float((onnx_logits.argmax(1) == fake_quant.argmax(1)).mean())
    if not (sqnr >= QAT_PARITY_MIN_SQNR_DB and agreement >= QAT_PARITY_MIN_AGREEMENT):
        raise UserError(f"the QAT Q/DQ ONNX disagrees with its fake-quant PyTorch model on "
                        f"{len(fake_quant)} source images: logit SQNR {sqnr:.1f} dB (at least "
                        f"{QAT_PARITY_MIN_SQNR_DB:g} needed), top-1 agreement {agreement:.1%} (at "
                        f"least {QAT_PARITY_MIN_AGREEMENT:.0%}); not written")
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the QAT INT8 ONNX", None)
    parity["fake_quant_vs_onnxruntime"] = {
        "logit_sqnr_db": round(sqnr, 2), "top1_agreement": round(agreement, 4),
        "relative_max_diff": float(np.abs(onnx_logits - fake_quant).max()
                                   / max(np.abs(fake_quant).max(), 1e-12)),
        "tolerance": {"min_sqnr_db": QAT_PARITY_MIN_SQNR_DB,
                      "min_top1_agreement": QAT_PARITY_MIN_AGREEMENT}}
    return {"tool": "torch fake-quant ops -> ONNX Q/DQ", "exporter": exporter, "opset": s.cfg.opset,
            "scheme": "symmetric int8, per-channel weights, per-tensor activations on the inputs of "
                      "every Conv/Gemm but the first/last layers post-training INT8 measured better "
                      "in FP32; BatchNorm folded, static pads",
            "kept_fp32_modules": list(qat.kept_fp32),
            "qat": qat.to_record(),
            "objective": (f"{s.run.recipe.method}: the run's own objective with its teacher"
                          if s.run.recipe.uses_teacher
                          else "cross-entropy + distillation from the FP32 student"),
            "calibration_sha256": s.calibration.sha256, "parity": parity}


def make_onnx_int8_qat_cpu(s: ExportSession, tmp: Path) -> dict[str, Any]:
    """QAT's fine-tuned weights quantized with ONNX Runtime's CPU placement (uint8 activations on this
    x86 CPU, Q/DQ around whole Conv+activation groups): the Q/DQ graph of make_onnx_int8_qat is
    symmetric INT8 for TensorRT, which ONNX Runtime's x86 kernels cannot fuse (measured slower than
    FP32), so the CPU gets its own placement of the same weights."""
    from rise_edge.qat import without_fake_quant
    from rise_edge.quantize import measure_fidelity

    qat = _qat(s)
    size = s.pre.input_size
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        float_path = Path(work) / "qat-fp32.onnx"
        export_graph(without_fake_quant(qat.model), torch.randn(2, 3, size, size), float_path,
                     s.cfg.opset)
        quantizer = s.cpu_quantizer(float_path, Path(work))
        quantizer.quantize(tmp)
    settings = quantizer.settings
    fidelity = measure_fidelity(s.fidelity_reference, tmp, s.fidelity)
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"), "quantization": "qat-cpu"})
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the QAT CPU INT8 ONNX", None)
    return {"tool": "onnxruntime.quantization.quantize_static on the QAT weights",
            "format_detail": "QDQ", "quantization": settings.to_record(),
            "fidelity_vs_fp32": fidelity.to_record(), "calibration_sha256": s.calibration.sha256,
            "parity": parity}


def make_onnx_int8_tensorrt(s: ExportSession, tmp: Path) -> dict[str, Any]:
    from rise_edge.tensorrt_build import modelopt_qdq

    fp32 = s.path_of("onnx-fp32")
    info = modelopt_qdq(fp32, tmp, s.calibration_images, s.cfg.calibration_method, INPUT_NAME)
    stamp_metadata(tmp, s.metadata("int8", "float32-nchw"))
    return {**info, "from_sha256": file_sha256(fp32), "calibration_sha256": s.calibration.sha256,
            "calibration_method_requested": s.cfg.calibration_method}


def _engine(s: ExportSession, tmp: Path, name: str) -> dict[str, Any]:
    from rise_edge.engines import TensorRTRunner
    from rise_edge.tensorrt_build import (autocast_fp16, build_engine, legacy_entropy_calibrator,
                                          tensorrt_major, timing_cache_path)

    precision = ARTEFACTS[name].precision
    source, fp16_flag, strongly_typed, calibrator, how = s.path_of("onnx-fp32"), False, True, None, ""
    size = s.pre.input_size
    work = tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-")
    if precision == "fp16":
        if tensorrt_major() <= 10:
            fp16_flag, strongly_typed, how = True, False, "BuilderFlag.FP16 on the FP32 ONNX"
        else:
            source = Path(work.name) / "fp16.onnx"
            autocast_fp16(s.path_of("onnx-fp32"), source)
            how = "modelopt AutoCast FP16 ONNX, strongly typed"
    elif precision == "int8":
        qdq = s.records.get("onnx-int8-tensorrt", {})
        if s.records.get("onnx-int8-qat", {}).get("status") == "ok":
            source, how = s.path_of("onnx-int8-qat"), "explicit Q/DQ from QAT, strongly typed"
        elif qdq.get("status") == "ok":
            source, how = s.path_of("onnx-int8-tensorrt"), "explicit Q/DQ (modelopt), strongly typed"
        elif tensorrt_major() <= 10:
            images, calibration_sha = s.device_calibration()
            key = cache_key(calibration=calibration_sha, method="entropy2", model=file_sha256(source))
            (s.dir / "cache").mkdir(exist_ok=True)
            calibrator = legacy_entropy_calibrator(images,
                                                   s.dir / "cache" / f"trt-calib-{key[:24]}.cache")
            strongly_typed, how = False, "legacy IInt8EntropyCalibrator2 (TensorRT <= 10, no modelopt)"
        else:
            raise UserError("an INT8 engine on TensorRT 11 needs the Q/DQ ONNX from nvidia-modelopt: "
                            "pip install 'rise-edge[gpu]'")
    try:
        info = build_engine(source, tmp, input_name=INPUT_NAME, input_shape=(3, size, size),
                            batch_profile=s.cfg.batch_profile, fp16_flag=fp16_flag,
                            strongly_typed=strongly_typed, timing_cache=timing_cache_path(s.dir),
                            calibrator=calibrator)
    finally:
        work.cleanup()
    # Recorded, not enforced: even FP32 engines may use TF32 tactics on Ampere and later GPUs.
    parity = s.check_parity(TensorRTRunner(tmp, precision=precision), f"the {name} engine", None,
                            needs_data=False)
    return {**info, "built_from": how, "parity": parity}


def make_torch_tensorrt(s: ExportSession, tmp: Path, name: str) -> dict[str, Any]:
    from rise_edge.engines import TorchTensorRTRunner
    from rise_edge.tensorrt_build import compile_torch_tensorrt

    precision = ARTEFACTS[name].precision
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        program = Path(work) / ARTEFACTS[name].filename  # saved under its real suffix, then moved
        info = compile_torch_tensorrt(s.run.student, program, precision=precision,
                                      input_size=s.pre.input_size, batch_profile=s.cfg.batch_profile)
        os.replace(program, tmp)
    s.run.student.cpu()
    parity = s.check_parity(TorchTensorRTRunner(tmp, precision=precision), f"the {name} program",
                            None, needs_data=False)
    return {**info, "parity": parity}


MAKERS: dict[str, Callable[[ExportSession, Path], dict[str, Any]]] = {
    "onnx-fp32": make_onnx_fp32,
    "onnx-fp32-uint8": make_onnx_fp32_uint8,
    "onnx-int8": make_onnx_int8,
    "onnx-int8-qat": make_onnx_int8_qat,
    "onnx-int8-qat-cpu": make_onnx_int8_qat_cpu,
    "onnx-int8-tensorrt": make_onnx_int8_tensorrt,
    "tensorrt-fp32": lambda s, tmp: _engine(s, tmp, "tensorrt-fp32"),
    "tensorrt-fp16": lambda s, tmp: _engine(s, tmp, "tensorrt-fp16"),
    "tensorrt-int8": lambda s, tmp: _engine(s, tmp, "tensorrt-int8"),
    "torch-tensorrt-fp32": lambda s, tmp: make_torch_tensorrt(s, tmp, "torch-tensorrt-fp32"),
    "torch-tensorrt-fp16": lambda s, tmp: make_torch_tensorrt(s, tmp, "torch-tensorrt-fp16"),
}
assert set(MAKERS) == set(ARTEFACTS)


def _unavailable(name: str) -> str | None:
    """Why `name` cannot be made on this machine (one sentence), or None."""
    from rise_edge.tensorrt_build import gpu_unavailable, modelopt_unavailable

    spec = ARTEFACTS[name]
    if name == "onnx-int8-tensorrt":
        return modelopt_unavailable()
    if spec.format in GPU_FORMATS:
        return gpu_unavailable(spec.format)
    return None


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
        return (fp32.is_file() and previous.get("from_sha256") == file_sha256(fp32)
                and previous.get("calibration_method_requested") == s.cfg.calibration_method
                and same_calibration)
    return False


def export_run(run_dir: str | Path, cfg: ExportConfig, *, progress: bool = True,
               data_root: str | None = None) -> ExportResult:
    """Export a trained run's student as `cfg` asks; returns the records and export.json's path.

    A failing artefact does not stop the others: it gets status 'failed' and a reason (artefacts that
    need it get 'skipped'); one that this machine cannot make gets 'unavailable' and a sentence why.
    """
    run = open_run(run_dir)  # says what is missing before anything is locked or written
    with run_lock(run.path, "export"):
        return _export(run, cfg, progress, data_root)


def _export(run: TrainedRun, cfg: ExportConfig, progress: bool, data_root: str | None
            ) -> ExportResult:
    def log(message: str) -> None:
        if progress:
            print(f"[export] {message}", file=sys.stderr, flush=True)

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise missing_extra(exc.name or "onnx", "cpu", "rise-edge export") from None
    names = plan_artefacts(cfg)
    session = ExportSession(run, cfg, log, data_root)
    session.dir.mkdir(parents=True, exist_ok=True)
    json_path = session.dir / EXPORT_JSON
    document = read_export_record(run.path, advice="move it aside to start a fresh export")
    records: dict[str, dict[str, Any]] = dict(document.get("artefacts", {}))
    for name, record in records.items():  # made from an earlier student: say so, keep the record
        if record.get("student_sha256") not in (None, session.student_sha256) and \
                record.get("status") == "ok":
            record.update(status="stale", reason="made from an earlier student.safetensors")
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
            "export_config": dataclasses.asdict(cfg), "artefacts": records})
        if "calibration" in session._cache:
            document["calibration"] = {**session.calibration.to_record(run.meta.classes),
                                       "method": cfg.calibration_method,
                                       "dataset_dir": str(session.calibration.dataset_dir)}
        write_json_atomic(json_path, document)

    outcomes: dict[str, dict[str, Any]] = {}  # what this export did; records: what export.json keeps
    for name in names:
        spec, previous = ARTEFACTS[name], records.get(name, {})
        record: dict[str, Any] = {"format": spec.format, "precision": spec.precision,
                                  "path": spec.filename, "target": spec.target,
                                  "student_sha256": session.student_sha256, "updated": _now()}
        failed_needs = [n for n in spec.needs if records.get(n, {}).get("status") != "ok"]
        reason = _unavailable(name)
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
            log(f"{name}: making {spec.filename}")
            try:
                with atomic_path(session.path_of(name)) as tmp:
                    details = MAKERS[name](session, tmp)
                path = session.path_of(name)
                record.update(status="ok", sha256=file_sha256(path), bytes=path.stat().st_size, **details)
            except UserError as exc:
                record.update(status="failed", reason=str(exc))
            except Exception as exc:  # any other failure of one format must not stop the others
                record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            if record["status"] == "failed":
                log(f"{name}: FAILED: {record['reason']}")
                # the last good file is still in place: say so (across repeated failures too)
                good = previous if previous.get("status") == "ok" else previous.get("previous", {})
                if session.path_of(name).is_file() and good.get("sha256"):
                    record["previous"] = {k: good[k] for k in ("sha256", "updated") if k in good}
                    record["reason"] += f" (the earlier {spec.filename} was kept)"
        outcomes[name] = record
        records[name] = _kept_if_intact(session, name, previous, record)
        save()
    if not names:
        save()
    if "calibration" in session._cache and cfg.int8 and "tensorrt" in (set(cfg.formats) | (
            set(FORMATS) if "all" in cfg.formats else set())):
        _write_calibration_tensors(session)
    return ExportResult({**records, **outcomes}, json_path, names)


def recommended_int8(records: dict[str, dict[str, Any]]) -> str | None:
    """The INT8 artefact export recommends for ONNX Runtime on the CPU: of post-training INT8 and
    QAT's CPU model, the one with the smaller worst accuracy drop against FP32 on the source-domain
    fidelity images (the target domain plays no part); None when neither was made."""
    drops = {}
    if records.get("onnx-int8", {}).get("status") == "ok":
        drops["onnx-int8"] = records["onnx-int8"]["accuracy_budget"]["fidelity"]["worst_drop_points"]
    if records.get("onnx-int8-qat-cpu", {}).get("status") == "ok":
        drops["onnx-int8-qat-cpu"] = records["onnx-int8-qat-cpu"]["fidelity_vs_fp32"]["worst_drop_points"]
    return min(drops, key=lambda name: (drops[name], name != "onnx-int8")) if drops else None


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
    """The preprocessed calibration images as float16 .npy, named by the calibration hash, so a
    device without the data set can still run TensorRT's legacy calibrator from them."""
    path = s.dir / f"calibration-{s.calibration.sha256[:16]}.npy"
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, s.calibration_images.astype(np.float16))
