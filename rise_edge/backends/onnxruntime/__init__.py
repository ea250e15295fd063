"""ONNX and ONNX Runtime: the FP32 graph every other format starts from, ONNX Runtime's INT8 for
the CPU (post-training, within the accuracy budget) and the QAT graphs, and the runner that runs any
ONNX file on ONNX Runtime's CPU, CUDA or TensorRT execution providers.

    model.onnx                 FP32, image (N, 3, S, S) float -> logits (N, C), dynamic batch
    model.uint8-nhwc.onnx      the same with preprocessing folded in: uint8 (N, S, S, 3) input
    model.int8-cpu.onnx        INT8 QDQ for ONNX Runtime on the CPU (after the accuracy budget)
    model.int8-qat.onnx        QAT: explicit symmetric Q/DQ (TensorRT's form; runs anywhere)
    model.int8-qat-cpu.onnx    QAT's weights with ONNX Runtime's CPU Q/DQ placement
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.backend_table import Artefact, Backend
from rise_edge.backends.base import have
from rise_edge.backends.onnxruntime.runner import OnnxRuntimeRunner, onnx_metadata  # noqa: F401
from rise_edge.config import ExportConfig
from rise_edge.errors import UserError
from rise_edge.export import int8_target
from rise_edge.export.fidelity import sqnr_db
from rise_edge.export.judge import verdict
from rise_edge.export.graph_form import with_static_padding
from rise_edge.export.onnx_graph import module_of_onnx_node
from rise_edge.export.session import (INPUT_NAME, ExportSession, FoldedPreprocessing, export_graph,
                                      stamp_metadata)
from rise_edge.files import file_sha256
from rise_edge.train.methods import method_of

# ---------------------------------------------------------------------------------------------------
# Making the artefacts


def fidelity_reference(s: ExportSession) -> dict[str, np.ndarray]:
    """The FP32 ONNX's logits on the fidelity images (ONNX Runtime, CPU), once per export: what every
    INT8 artefact, whichever backend made it, is judged against."""
    return s._once("fidelity_reference", lambda: s.fidelity.logits_of(
        OnnxRuntimeRunner(s.path_of("onnx-fp32"), device="cpu")))


def stress_judgement(s: ExportSession, runner: Any) -> dict[str, Any]:
    """An INT8 model against FP32 on the stress set (rise_edge.export.stress: the judge's images,
    shifted), with the judge's verdict on it: reported beside the clean judgement, deciding nothing
    until it is shown to predict the unseen domain better (docs/export.md)."""
    from rise_edge.export.fidelity import measure_fidelity
    from rise_edge.export.judge import verdict

    reference = s._once("stress_reference", lambda: s.stress.logits_of(
        OnnxRuntimeRunner(s.path_of("onnx-fp32"), device="cpu")))
    fidelity = measure_fidelity(reference, runner, s.stress)
    judged = verdict(fidelity, s.cfg.accuracy_budget)
    return {"images": "the judge images, each under one shift in turn: grayscale, line drawing, "
                      "posterised, blurred", "drop_points": judged.drop,
            "drop_upper95": judged.upper95, "worst_domain_drop_points": judged.worst_domain_drop,
            "within_budget": judged.met, "decides": False, "fidelity": fidelity.to_record()}


def cpu_quantizer(s: ExportSession, fp32: Path, work_dir: Path) -> Any:
    """ONNX Runtime's CPU quantizer for an FP32 graph (pre-processed into `work_dir`), calibrated
    on this export's calibration set, its ranges cached under export/cache/."""
    import onnxruntime

    from rise_edge.backends.onnxruntime.int8 import CpuQuantizer, cpu_quant_settings, preprocess

    pre = work_dir / f"{fp32.stem}-pre.onnx"
    preprocess(fp32, pre)
    (s.dir / "cache").mkdir(exist_ok=True)
    return CpuQuantizer(pre, INPUT_NAME, s.calibration_images, s.cfg.calibration_method,
                        cpu_quant_settings(s.cfg.int8_target), s.dir / "cache",
                        model_sha256=f"{file_sha256(fp32)}+ort{onnxruntime.__version__}",
                        calibration_sha256=s.calibration.sha256)


def cpu_speed(s: ExportSession, int8: Path, target: str) -> dict[str, Any]:
    """An ONNX Runtime INT8 graph's batch-1 speed against the FP32 ONNX on this CPU
    (rise_edge.backends.latency.int8_speed)."""
    from rise_edge.backends.latency import int8_speed

    return int8_speed(OnnxRuntimeRunner(s.path_of("onnx-fp32"), device="cpu"),
                      OnnxRuntimeRunner(int8, precision="int8", device="cpu"), s.parity_images[:1],
                      target)


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
    from rise_edge.backends.onnxruntime.int8 import latency_ms, quantize_within_budget
    from rise_edge.export.onnx_graph import shape_mismatches

    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        work_dir = Path(work)
        quantizer = cpu_quantizer(s, s.path_of("onnx-fp32"), work_dir)
        settings, pre = quantizer.settings, quantizer.pre_path
        budget = quantize_within_budget(quantizer, tmp, s.fidelity, fidelity_reference(s),
                                        s.cfg.accuracy_budget, s.cfg.max_fallback_layers, work_dir,
                                        s.log, s.cfg.min_agreement)
        mismatches = shape_mismatches(pre, tmp, s.parity_images[:1], INPUT_NAME)
        if mismatches:
            raise UserError(f"the INT8 graph computes other shapes than the FP32 graph "
                            f"({len(mismatches)} node(s), first: {mismatches[0]}); not written")
        models = {"fp32": pre, "int8": work_dir / "int8-all.onnx"}
        if budget.kept_fp32:
            models["int8_with_fallback"] = tmp
        latency = latency_ms(models, s.parity_images[:1])
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"), "int8_target": settings.target,
                         "kept_fp32_layers": budget.kept_fp32, "quantization": settings.to_record()})
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the INT8 ONNX", None)
    speed = cpu_speed(s, tmp, settings.target)
    if not budget.met:
        judged = verdict(budget.final, s.cfg.accuracy_budget)
        s.log(f"INT8 misses the accuracy budget (drop {judged.drop:.2f} points, 95 % upper bound "
              f"{judged.upper95:.2f}; budget {s.cfg.accuracy_budget:g}) with {len(budget.kept_fp32)} "
              "layer(s) in FP32: quantization-aware fine-tuning usually recovers it: "
              "rise-edge export RUN --int8 --qat (or set export.qat: auto)")
    return {"tool": "onnxruntime.quantization.quantize_static", "format_detail": "QDQ",
            "calibration_method": s.cfg.calibration_method, "calibration_sha256": s.calibration.sha256,
            "quantization": settings.to_record(), "int8_target": int8_target.record(s.cfg.int8_target),
            "accuracy_budget": {**budget.to_record(),
                                "stress": stress_judgement(s, OnnxRuntimeRunner(tmp))},
            "shapes_checked": "every Conv/Pool/Pad output shape equals the FP32 graph's",
            "latency_batch1_ms": latency, "speed": speed, "parity": parity}


# Fake-quant PyTorch vs the Q/DQ graph in ONNX Runtime: its fused integer kernels round a few
# activations one step differently, and in a deep network those steps add up (Lite0: 5.7 % of the
# largest logit at worst, about 30 dB), while a wrong scale or placement costs far more. Judged on
# the logits' SQNR and top-1 agreement over the parity images.
QAT_PARITY_MIN_SQNR_DB = 20.0
QAT_PARITY_MIN_AGREEMENT = 0.9


def _qat(s: ExportSession) -> Any:
    """Run (or resume) quantization-aware fine-tuning once per export; see rise_edge/export/qat.py."""
    def run() -> Any:
        from rise_edge.export.qat import qat_finetune

        result = qat_finetune(s.run, s.splits, s.cfg, s.calibration_images, s.dir / "qat",
                              {"student": s.student_sha256, "calibration": s.calibration.sha256},
                              s.log, keep_fp32=_edge_layers_in_fp32(s),
                              selection=s.qat_selection)
        s.run.student.cpu()
        return result
    return s._once("qat", run)


def _edge_layers_in_fp32(s: ExportSession) -> list[str]:
    """Module names of the first/last layers that post-training INT8 measured better in FP32
    (export.json's edge_policy), so QAT keeps the same policy."""
    policy = s.records.get("onnx-int8", {}).get("accuracy_budget", {}).get("edge_policy", {})
    layers = [v["layer"] for v in policy.values() if isinstance(v, dict) and v.get("decision") == "fp32"]
    return [module_of_onnx_node(s.run.student, layer) for layer in layers]


def qat_objective(s: ExportSession) -> str:
    """What QAT fine-tuned towards, in words (export.qat_objective)."""
    if s.cfg.qat_objective == "fp32":
        return ("fp32: distillation from the FP32 student's logits alone, the step selected by "
                "agreement with it")
    return (f"run ({s.run.recipe.method}): the run's own objective with its teacher"
            if method_of(s.run.recipe).uses_teacher
            else "run: cross-entropy + distillation from the FP32 student")


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
            "objective": qat_objective(s),
            "calibration_sha256": s.calibration.sha256, "parity": parity}


def make_onnx_int8_qat_cpu(s: ExportSession, tmp: Path) -> dict[str, Any]:
    """QAT's fine-tuned weights quantized with ONNX Runtime's CPU placement (uint8 activations on this
    x86 CPU, Q/DQ around whole Conv+activation groups): the Q/DQ graph of make_onnx_int8_qat is
    symmetric INT8 for TensorRT, which ONNX Runtime's x86 kernels cannot fuse (measured slower than
    FP32), so the CPU gets its own placement of the same weights. It goes through the same budget
    loop as post-training INT8 (the first/last-layer policy decided by measurement, fallbacks grown
    from the best model, the judge's rule), on the same judge images, against the FP32 student."""
    from rise_edge.backends.onnxruntime.int8 import quantize_within_budget
    from rise_edge.export.qat import without_fake_quant

    qat = _qat(s)
    size = s.pre.input_size
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        float_path = Path(work) / "qat-fp32.onnx"
        export_graph(without_fake_quant(qat.model), torch.randn(2, 3, size, size), float_path,
                     s.cfg.opset)
        quantizer = cpu_quantizer(s, float_path, Path(work))
        budget = quantize_within_budget(quantizer, tmp, s.fidelity, fidelity_reference(s),
                                        s.cfg.accuracy_budget, s.cfg.max_fallback_layers,
                                        Path(work), s.log, s.cfg.min_agreement)
    settings = quantizer.settings
    fidelity = budget.final
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"), "quantization": "qat-cpu",
                         "int8_target": settings.target, "kept_fp32_layers": budget.kept_fp32})
    parity = s.check_parity(OnnxRuntimeRunner(tmp), "the QAT CPU INT8 ONNX", None)
    return {"speed": cpu_speed(s, tmp, settings.target),"tool": "onnxruntime.quantization.quantize_static on the QAT weights",
            "format_detail": "QDQ", "quantization": settings.to_record(),
            "int8_target": int8_target.record(s.cfg.int8_target),
            "fidelity_vs_fp32": fidelity.to_record(),
            "accuracy_budget": budget.to_record(),
            "judge": verdict(fidelity, s.cfg.accuracy_budget).to_record(),
            "stress": stress_judgement(s, OnnxRuntimeRunner(tmp)),
            "calibration_sha256": s.calibration.sha256, "parity": parity}


def plan(cfg: ExportConfig) -> list[str]:
    names = ["onnx-fp32"]
    names += ["onnx-fp32-uint8"] if cfg.fold_preprocessing else []
    names += ["onnx-int8"] if cfg.int8 else []
    names += ["onnx-int8-qat", "onnx-int8-qat-cpu"] if cfg.int8 and cfg.qat != "off" else []
    return names


def _unavailable() -> str | None:
    if have("onnxruntime") and have("onnx"):
        return None
    return "ONNX export needs the 'onnx' and 'onnxruntime' packages: pip install 'rise-edge[cpu]'"


BACKEND = Backend(
    format="onnx", name="onnxruntime", summary="ONNX graphs; ONNX Runtime (CPU, CUDA or TensorRT EP)",
    runner=OnnxRuntimeRunner, devices=("cpu", "auto", "cuda", "tensorrt"), unavailable=_unavailable,
    aliases=("ort",), plan=plan, artefacts=(
        Artefact("onnx-fp32", "onnx", "fp32", "model.onnx", "any ONNX runtime", make_onnx_fp32),
        Artefact("onnx-fp32-uint8", "onnx", "fp32", "model.uint8-nhwc.onnx", "any ONNX runtime",
                 make_onnx_fp32_uint8),
        Artefact("onnx-int8", "onnx", "int8", "model.int8-cpu.onnx", "onnxruntime-cpu", make_onnx_int8,
                 needs=("onnx-fp32",)),
        Artefact("onnx-int8-qat", "onnx", "int8", "model.int8-qat.onnx",
                 "tensorrt (strongly typed) and any ONNX runtime", make_onnx_int8_qat,
                 needs=("onnx-fp32",)),
        Artefact("onnx-int8-qat-cpu", "onnx", "int8", "model.int8-qat-cpu.onnx", "onnxruntime-cpu",
                 make_onnx_int8_qat_cpu, needs=("onnx-int8-qat",)),
    ))
