"""TensorRT engines: built on the device that runs them, from the FP32 ONNX (FP32, FP16) or from an
explicit Q/DQ ONNX (INT8: QAT's graph, else nvidia-modelopt's), and run with torch CUDA tensors as
I/O on PyTorch's current stream (see rise_edge.backends.tensorrt.build for the builder).

    model.int8-qdq-tensorrt.onnx      INT8 Q/DQ placed for TensorRT (nvidia-modelopt), made on any machine
    model.{fp32,fp16,int8}.engine     TensorRT engines (built on the device that runs them)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.backend_table import Artefact, Backend
from rise_edge.backends.base import Runner, cuda_backend_unavailable
from rise_edge.backends.tensorrt.build import import_tensorrt, modelopt_unavailable
from rise_edge.config import ExportConfig
from rise_edge.errors import UserError
from rise_edge.export.session import INPUT_NAME, ExportSession, stamp_metadata
from rise_edge.files import cache_key, file_sha256


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, run with torch CUDA tensors as I/O on torch's current stream.

    Engines are bound to the GPU architecture and TensorRT version that built them; a mismatch fails
    to deserialize, with a sentence saying to rebuild on this device.
    """

    def __init__(self, path: str | Path, *, precision: str = "int8"):
        trt = import_tensorrt("running TensorRT engines")
        if not torch.cuda.is_available():
            raise UserError("TensorRT engines need a CUDA GPU, and PyTorch sees none on this machine")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"TensorRT engine {path} not found")
        self.path, self.precision, self.device, self.name = path, precision, "cuda", "tensorrt"
        self.torch_stream = True
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path} could not be loaded by TensorRT {trt.__version__} on "
                            f"{torch.cuda.get_device_name()}: engines are bound to the GPU and "
                            "TensorRT version that built them; rebuild it here with `rise-edge export`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                        trt.int32: torch.int32}
        if hasattr(trt, "uint8"):
            self._dtypes[trt.uint8] = torch.uint8
        self.input_dtype = self._dtypes[self.engine.get_tensor_dtype(self.input_name)]

    def prepare(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage a batch on the device and bind it (shape and addresses: host work, done here so
        that a timed run_staged is the enqueue and the engine's execution alone)."""
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to("cuda",
                                                                                     self.input_dtype)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = self._dtypes[self.engine.get_tensor_dtype(self.output_name)]
        output = torch.empty(out_shape, dtype=out_dtype, device="cuda")
        self._bind(batch, output)
        return batch, output

    def _bind(self, batch: torch.Tensor, output: torch.Tensor) -> None:
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self.context.set_tensor_address(self.input_name, batch.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        self._bound = (batch.data_ptr(), tuple(batch.shape), output.data_ptr())

    def run_staged(self, staged: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, output = staged
        if getattr(self, "_bound", None) != (batch.data_ptr(), tuple(batch.shape), output.data_ptr()):
            self._bind(batch, output)  # another staged batch than the last one prepared
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        return output

    def synchronize(self) -> None:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Making the artefacts


def make_onnx_int8_tensorrt(s: ExportSession, tmp: Path) -> dict[str, Any]:
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
    from rise_edge.export.session import PLACED_FOR
    from rise_edge.backends.tensorrt.build import modelopt_qdq

    fp32 = s.path_of("onnx-fp32")
    info = modelopt_qdq(fp32, tmp, s.calibration_images, s.cfg.calibration_method, INPUT_NAME)
    stamp_metadata(tmp, {**s.metadata("int8", "float32-nchw"), PLACED_FOR: "tensorrt"})
    # Judged here, on any machine: the Q/DQ graph's arithmetic is the engine's up to kernel rounding,
    # and ONNX Runtime's CPU provider computes it as written (the runner turns off the fusions whose
    # x86 kernels would saturate: see PLACED_FOR's use in the runner).
    graph = OnnxRuntimeRunner(tmp, precision="int8", device="cpu")
    judged = _judge_int8(s, graph, "the TensorRT INT8 Q/DQ graph (ONNX Runtime, CPU)")
    return {**info, "from_sha256": file_sha256(fp32), "calibration_sha256": s.calibration.sha256,
            "calibration_method_requested": s.cfg.calibration_method,
            "judged_as": "the Q/DQ graph on ONNX Runtime's CPU provider, Q/DQ computed as written "
                         "(graph optimisations off), standing for the TensorRT INT8 engine built "
                         "from it", "accuracy_budget": judged}


def make_engine(s: ExportSession, tmp: Path, name: str) -> dict[str, Any]:
    from rise_edge.backends.tensorrt.build import (autocast_fp16, build_engine,
                                                   legacy_entropy_calibrator, tensorrt_major,
                                                   timing_cache_path)

    precision = BACKEND_ARTEFACTS[name].precision
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
    judged = ({"accuracy_budget": _judge_int8(s, TensorRTRunner(tmp, precision="int8"),
                                              "the TensorRT INT8 engine")}
              if precision == "int8" else {})
    return {**info, "built_from": how, "parity": parity, **judged}


def _judge_int8(s: ExportSession, runner: Any, what: str) -> dict[str, Any]:
    """An INT8 engine or graph judged as every INT8 artefact is (rise_edge.export.judge), on the same
    judge images against the same FP32 reference, when the data set is on this machine; said plainly
    when it is not (an engine built on a device from the calibration tensors alone)."""
    from rise_edge.backends.onnxruntime import fidelity_reference, stress_judgement
    from rise_edge.export.fidelity import measure_fidelity
    from rise_edge.export.judge import JUDGE_IMAGES, verdict

    budget = s.cfg.accuracy_budget
    if not s.data_reachable():
        return {"budget_points": budget, "met": None, "judged_on": None,
                "not_judged": f"the data set is not reachable on this machine, so {what} was not "
                              "judged against FP32; run `rise-edge bench` here for its accuracy per "
                              "domain, or export where the data is"}
    fidelity = measure_fidelity(fidelity_reference(s), runner, s.fidelity)
    judged = verdict(fidelity, budget)
    if not judged.met:
        s.log(f"{what} misses the accuracy budget (drop 95 % upper bound {judged.upper95:.2f} > "
              f"{budget:g} points on the source validation images)")
    return {"budget_points": budget, "met": judged.met, "judge": judged.to_record(),
            "judged_on": JUDGE_IMAGES, "fidelity": fidelity.to_record(),
            "stress": stress_judgement(s, runner)}


def plan(cfg: ExportConfig) -> list[str]:
    names = ["onnx-int8", "onnx-int8-qat"] if cfg.int8 and cfg.qat != "off" else []  # QAT's Q/DQ first
    names += ["onnx-int8-tensorrt", "tensorrt-int8"] if cfg.int8 else []
    names += ["tensorrt-fp16"] if cfg.fp16 else []
    names += ["tensorrt-fp32"] if not (cfg.int8 or cfg.fp16) else []
    return names


def _unavailable() -> str | None:
    return cuda_backend_unavailable("a TensorRT engine", "tensorrt", "tensorrt")


def _engine_artefact(precision: str) -> Artefact:
    name = f"tensorrt-{precision}"
    return Artefact(name, "tensorrt", precision, f"model.{precision}.engine", "tensorrt",
                    lambda s, tmp: make_engine(s, tmp, name), needs=("onnx-fp32",))


BACKEND_ARTEFACTS = {a.name: a for a in (
    Artefact("onnx-int8-tensorrt", "onnx", "int8", "model.int8-qdq-tensorrt.onnx", "tensorrt",
             make_onnx_int8_tensorrt, needs=("onnx-fp32",), unavailable=modelopt_unavailable),
    _engine_artefact("fp32"), _engine_artefact("fp16"), _engine_artefact("int8"))}

BACKEND = Backend(
    format="tensorrt", name="tensorrt", summary="TensorRT engines on an NVIDIA GPU (built on the device)",
    runner=TensorRTRunner, devices=("cuda",), unavailable=_unavailable, aliases=("trt",), plan=plan,
    artefacts=tuple(BACKEND_ARTEFACTS.values()))
