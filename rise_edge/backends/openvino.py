"""OpenVINO on Intel (and other x86/ARM) CPUs: the FP32 graph as OpenVINO IR, and INT8 from NNCF's
post-training quantization on the same source-only, domain-balanced calibration images as every other
INT8 artefact, judged by the same accuracy budget (worst paired drop against FP32 on source images).

    model.fp32-openvino.xml/.bin    FP32 IR converted from model.onnx
    model.int8-openvino.xml/.bin    INT8 IR (NNCF; with accuracy control when plain PTQ misses the budget)

An IR is two files; the record's sha256 covers the .xml and its `files` entry the .bin, and bench
verifies both before running either. Needs the optional extra: pip install 'rise-edge[openvino]'.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.backend_table import Artefact, Backend
from rise_edge.backends.base import Runner, have, physical_cores
from rise_edge.config import ExportConfig
from rise_edge.errors import UserError, missing_extra
from rise_edge.export.session import ExportSession
from rise_edge.files import file_sha256


class OpenVinoRunner(Runner):
    """An OpenVINO IR (or ONNX) file compiled for OpenVINO's CPU plugin.

    Latency hint, threads = physical cores, FP32 inference precision (no silent bf16 on CPUs that
    have it: the INT8 model's speed must come from INT8, and FP32's accuracy must be FP32's).
    """

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise missing_extra("openvino", "openvino", "running OpenVINO models") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"OpenVINO model {path} not found")
        self.path, self.precision, self.device, self.name = path, precision, "cpu", "openvino"
        core = ov.Core()
        self.model = core.read_model(str(path))
        self.compiled = core.compile_model(self.model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or physical_cores(),
            "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def prepare(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, dtype=np.float32)

    def run_staged(self, staged: np.ndarray) -> np.ndarray:
        self.request.infer({0: staged})
        return self.request.get_output_tensor(0).data.copy()


def _publish(staged: Path, tmp: Path, final: Path) -> dict[str, Any]:
    """Move a saved IR into place: its .bin beside `final` (atomically), its .xml to `tmp` (the caller
    renames it onto `final`). Returns the record's `files` entry for the .bin."""
    weights = final.with_suffix(".bin")
    os.replace(staged.with_suffix(".bin"), weights)
    os.replace(staged, tmp)
    return {weights.name: file_sha256(weights)}


def make_openvino_fp32(s: ExportSession, tmp: Path) -> dict[str, Any]:
    import openvino as ov

    final = s.path_of("openvino-fp32")
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        staged = Path(work) / final.name
        ov.save_model(ov.convert_model(str(s.path_of("onnx-fp32"))), str(staged), compress_to_fp16=False)
        parity = s.check_parity(OpenVinoRunner(staged), "the OpenVINO FP32 IR", s.cfg.parity_tolerance)
        files = _publish(staged, tmp, final)
    return {"tool": f"openvino.convert_model {ov.__version__} from model.onnx",
            "from_sha256": file_sha256(s.path_of("onnx-fp32")), "files": files, "parity": parity}


def quantizer_count(model: Any) -> int:
    """FakeQuantize operations in an OpenVINO model: 0 means it runs wholly in floating point (NNCF's
    accuracy control can revert every layer), and is no INT8 model at all."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _accuracy_controlled(nncf: Any, s: ExportSession, fp32: Any, calibration: Any) -> Any:
    """NNCF's accuracy-control proposal: the worst source domain's validation top-1 within the
    budget, the most harmful layers reverted to floating point."""
    items = [(x, y) for x, y in s.fidelity.domains.values()]

    def worst_domain_accuracy(compiled: Any, data: Any) -> tuple[float, None]:
        accuracy = []
        for images, labels in data:
            logits = np.concatenate([compiled(images[i:i + 32])[0] for i in range(0, len(images), 32)])
            accuracy.append(float((logits.argmax(1) == labels).mean()))
        return min(accuracy), None

    return nncf.quantize_with_accuracy_control(
        fp32, calibration, nncf.Dataset(items), worst_domain_accuracy,
        max_drop=s.cfg.accuracy_budget / 100, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(s.calibration_images), target_device=nncf.TargetDevice.CPU)


def make_openvino_int8(s: ExportSession, tmp: Path) -> dict[str, Any]:
    """NNCF post-training INT8 on the export's calibration images; when the judge
    (rise_edge.export.judge) says it misses the budget, NNCF's accuracy-control flow proposes a model
    with the most harmful layers in FP32. The judge decides which of the two ships, by the rule
    every INT8 artefact is chosen by."""
    try:
        import nncf
    except ImportError:
        raise missing_extra("nncf", "openvino", "OpenVINO INT8") from None
    import openvino as ov

    from rise_edge.backends.onnxruntime import fidelity_reference, stress_judgement
    from rise_edge.export.fidelity import measure_fidelity
    from rise_edge.export.judge import JUDGE_IMAGES, order_key, verdict

    fp32 = ov.convert_model(str(s.path_of("onnx-fp32")))
    calibration = nncf.Dataset([s.calibration_images[i:i + 1] for i in range(len(s.calibration_images))])
    budget = s.cfg.accuracy_budget
    final = s.path_of("openvino-int8")
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        work_dir = Path(work)

        def judged(model: Any, name: str) -> tuple[Path, Any]:
            path = work_dir / name / final.name
            path.parent.mkdir()
            ov.save_model(model, str(path), compress_to_fp16=False)
            return path, measure_fidelity(fidelity_reference(s), OpenVinoRunner(path), s.fidelity)

        s.log(f"NNCF post-training INT8 on {len(s.calibration_images)} calibration images")
        plain = nncf.quantize(fp32, calibration, subset_size=len(s.calibration_images),
                              target_device=nncf.TargetDevice.CPU)
        path, fidelity = judged(plain, "ptq")
        tried = [{"method": "nncf.quantize", "quantizers": quantizer_count(plain),
                  "fidelity": fidelity.to_record()}]
        chosen, chosen_fidelity, chosen_path = "nncf.quantize", fidelity, path
        s.log(f"OpenVINO INT8: drop 95 % upper bound {verdict(fidelity, budget).upper95:.2f} points "
              "on the source validation images")
        if not verdict(fidelity, budget).met:
            s.log(f"over the {budget:g}-point budget: NNCF quantization with accuracy control")
            controlled = _accuracy_controlled(nncf, s, fp32, calibration)
            path_c, fidelity_c = judged(controlled, "controlled")
            quantizers = quantizer_count(controlled)
            tried.append({"method": "nncf.quantize_with_accuracy_control", "quantizers": quantizers,
                          "fidelity": fidelity_c.to_record()})
            if not quantizers:
                # It matches FP32 because it is FP32: shipping it as INT8 would promise a speed-up
                # and a size that are not there.
                s.log("NNCF's accuracy control kept every layer in floating point: that is no INT8 "
                      "model, so NNCF's plain INT8 model stays")
            # NNCF proposes; the judge decides, by the rule every INT8 artefact is chosen by.
            elif order_key(fidelity_c, budget) < order_key(fidelity, budget):
                chosen, chosen_fidelity, chosen_path = ("nncf.quantize_with_accuracy_control",
                                                        fidelity_c, path_c)
        parity = s.check_parity(OpenVinoRunner(chosen_path), "the OpenVINO INT8 IR", None)
        stress = stress_judgement(s, OpenVinoRunner(chosen_path))
        speed = {"measured": False, "reason": "OpenVINO INT8 is not timed at export; bench times it"}
        files = _publish(chosen_path, tmp, final)
    judged = verdict(chosen_fidelity, budget)
    met = judged.met
    if not met:
        s.log(f"OpenVINO INT8 misses the accuracy budget (drop 95 % upper bound {judged.upper95:.2f} > "
              f"{budget:g} points on the source validation images)")
    from rise_edge.export.int8_target import record as target_record

    return {"tool": f"nncf {nncf.__version__} on openvino {ov.__version__}", "chosen": chosen,
            "int8_target": target_record(s.cfg.int8_target),
            "calibration_sha256": s.calibration.sha256, "files": files, "speed": speed,
            "accuracy_budget": {"budget_points": budget, "met": met, "judge": judged.to_record(),
                                "judged_on": JUDGE_IMAGES,
                                "fidelity": chosen_fidelity.to_record(), "tried": tried,
                                "stress": stress},
            "parity": parity}


def plan(cfg: ExportConfig) -> list[str]:
    return ["openvino-fp32"] + (["openvino-int8"] if cfg.int8 else [])


def _unavailable() -> str | None:
    if have("openvino"):
        return None
    return "OpenVINO is not installed; install it with: pip install 'rise-edge[openvino]'"


def _nncf_unavailable() -> str | None:
    if have("nncf"):
        return None
    return "OpenVINO INT8 needs NNCF, which is not installed; install it with: pip install 'rise-edge[openvino]'"


BACKEND = Backend(
    format="openvino", name="openvino", summary="OpenVINO IR on the CPU (FP32, and INT8 from NNCF)",
    runner=OpenVinoRunner, devices=("cpu",), unavailable=_unavailable, aliases=("ov",), plan=plan,
    artefacts=(
        Artefact("openvino-fp32", "openvino", "fp32", "model.fp32-openvino.xml", "openvino-cpu",
                 make_openvino_fp32, needs=("onnx-fp32",)),
        Artefact("openvino-int8", "openvino", "int8", "model.int8-openvino.xml", "openvino-cpu",
                 make_openvino_int8, needs=("onnx-fp32",), unavailable=_nncf_unavailable),
    ))
