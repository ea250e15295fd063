"""One small runner per inference backend, all with the same call: images -> logits.

    runner = ENGINES[record["format"]](path, precision=record["precision"], device="auto")
    logits = runner(images)             # images: float32 NCHW, normalised as the student expects
                                        # logits: float32 (N, C) numpy

For pure-compute timing every runner can also stage its input where the backend reads it (device
memory, an IOBinding) once, and run on it repeatedly:

    staged = runner.prepare(images)
    runner.run_staged(staged); runner.synchronize()

`ENGINES` (artefact format -> runner class) is the one table shared by export (accuracy checks) and
bench. Heavy optional backends (tensorrt, torch_tensorrt, CUDA) are imported where used; their absence
is one UserError sentence.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.errors import UserError, missing_extra

# ONNX metadata_props keys written by export (rise_edge.export) and read back here.
META_PREFIX = "rise_edge."


def physical_cores() -> int:
    """Physical cores (hyper-threads share FMA units, so more threads than cores only adds contention)."""
    try:
        import psutil
        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but PyTorch sees no CUDA GPU on this machine")
    return device


class Runner:
    """The common interface. Subclasses set name/precision/device and implement prepare/run_staged."""

    name: str = "runner"
    precision: str = "fp32"
    device: str = "cpu"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 normalised images -> (N, C) float32 logits (host memory)."""
        return self.to_numpy(self.run_staged(self.prepare(images)))

    def prepare(self, images: np.ndarray) -> Any:
        """Stage a batch where the backend reads it (host array, device tensor, IOBinding)."""
        raise NotImplementedError

    def run_staged(self, staged: Any) -> Any:
        """Run on a staged batch; the result may stay on the device (see `to_numpy`)."""
        raise NotImplementedError

    def to_numpy(self, outputs: Any) -> np.ndarray:
        if isinstance(outputs, torch.Tensor):
            return outputs.detach().float().cpu().numpy()
        return np.asarray(outputs, dtype=np.float32)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def time_staged(self, staged: Any) -> float:
        """Milliseconds of one run on a staged batch: CUDA events on the GPU, a wall clock on the CPU."""
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.run_staged(staged)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        self.run_staged(staged)
        self.synchronize()
        return (time.perf_counter() - begin) * 1e3

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "precision": self.precision, "device": self.device}


# ---------------------------------------------------------------------------------------------------
# PyTorch eager


class TorchRunner(Runner):
    """The student in PyTorch eager mode (the reference every other engine is compared against).

    `path`: a run directory or its student.safetensors. `module`: an already loaded student instead.
    """

    def __init__(self, path: str | Path | None = None, *, precision: str = "fp32", device: str = "auto",
                 module: torch.nn.Module | None = None):
        if module is None:
            if path is None:
                raise ValueError("TorchRunner needs a run directory path or a module")
            from rise_edge.run_dir import open_run
            run_path = Path(path)
            module = open_run(run_path.parent if run_path.is_file() else run_path).student
        if precision not in ("fp32", "fp16"):
            raise UserError(f"TorchRunner runs fp32 or fp16, not {precision}")
        self.device = _resolve_device(device)
        if precision == "fp16" and self.device != "cuda":
            raise UserError("PyTorch fp16 inference is for CUDA; on the CPU use fp32")
        self.precision = precision
        self.name = "pytorch"
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        module = module.eval().to(self.device, self._dtype)
        if self.device == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = module

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        staged = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device,
                                                                                      self._dtype)
        return staged.contiguous(memory_format=torch.channels_last) if self.device == "cuda" else staged

    def run_staged(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(staged)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The rise_edge.* metadata_props of an exported ONNX file, JSON values decoded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                found[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                found[prop.key[len(META_PREFIX):]] = prop.value
    return found


class OnnxRuntimeRunner(Runner):
    """An ONNX file in ONNX Runtime: CPU execution provider, or CUDA / TensorRT EPs where installed.

    Session: intra-op threads = physical cores, sequential execution, all graph optimisations.
    A graph exported with folded preprocessing (uint8 NHWC input) is fed by turning the normalised
    float NCHW batch back into uint8 NHWC pixels, so it answers the same call as the others.
    """

    def __init__(self, path: str | Path, *, precision: str | None = None, device: str = "cpu",
                 threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_extra("onnxruntime", "cpu", "running ONNX models") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX file {path} not found")
        self.path = path
        self.metadata = onnx_metadata(path)
        self.precision = precision or str(self.metadata.get("precision", "fp32"))
        available = ort.get_available_providers()
        wanted = {"cpu": ["CPUExecutionProvider"],
                  "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                  "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                               "CPUExecutionProvider"]}
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device not in wanted:
            raise UserError(f"ONNX Runtime device must be cpu, cuda or tensorrt, not '{device}'")
        if wanted[device][0] not in available:
            raise UserError(f"ONNX Runtime here has no {wanted[device][0]} (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu for GPU execution")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=wanted[device])
        self.device = "cpu" if device == "cpu" else "cuda"
        self.provider = self.session.get_providers()[0]
        self.name = {"CPUExecutionProvider": "onnxruntime", "CUDAExecutionProvider": "onnxruntime-cuda",
                     "TensorrtExecutionProvider": "onnxruntime-trt"}.get(self.provider, "onnxruntime")
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.uint8_input = model_input.type == "tensor(uint8)"

    def _to_model_input(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if not self.uint8_input:
            return images
        mean = np.asarray(self.metadata["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.metadata["std"], np.float32).reshape(1, 3, 1, 1)
        pixels = np.clip(np.rint((images * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))

    def prepare(self, images: np.ndarray) -> Any:
        batch = self._to_model_input(images)
        if self.device == "cpu":
            return batch
        import onnxruntime as ort
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        return binding

    def run_staged(self, staged: Any) -> Any:
        if self.device == "cpu":
            return self.session.run([self.output_name], {self.input_name: staged})[0]
        self.session.run_with_iobinding(staged)
        return staged

    def to_numpy(self, outputs: Any) -> np.ndarray:
        if self.device != "cpu":
            outputs = outputs.copy_outputs_to_cpu()[0]
        return np.asarray(outputs, dtype=np.float32)

    def synchronize(self) -> None:
        if self.device == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# TensorRT (engine file)


def _import_tensorrt(purpose: str) -> Any:
    try:
        import tensorrt
    except ImportError:
        raise missing_extra("tensorrt", "gpu", purpose) from None
    return tensorrt


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, run with torch CUDA tensors as I/O on torch's current stream.

    Engines are bound to the GPU architecture and TensorRT version that built them; a mismatch fails
    to deserialize, with a sentence saying to rebuild on this device.
    """

    def __init__(self, path: str | Path, *, precision: str = "int8", device: str = "cuda"):
        trt = _import_tensorrt("running TensorRT engines")
        if not torch.cuda.is_available():
            raise UserError("TensorRT engines need a CUDA GPU, and PyTorch sees none on this machine")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"TensorRT engine {path} not found")
        self.path, self.precision, self.device, self.name = path, precision, "cuda", "tensorrt"
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
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to("cuda",
                                                                                     self.input_dtype)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = self._dtypes[self.engine.get_tensor_dtype(self.output_name)]
        output = torch.empty(out_shape, dtype=out_dtype, device="cuda")
        return batch, output

    def run_staged(self, staged: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, output = staged
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self.context.set_tensor_address(self.input_name, batch.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        return output

    def synchronize(self) -> None:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Torch-TensorRT (ExportedProgram)


class TorchTensorRTRunner(Runner):
    """A Torch-TensorRT compiled student saved as an ExportedProgram (.ep) or TorchScript (.ts)."""

    def __init__(self, path: str | Path, *, precision: str = "fp16", device: str = "cuda"):
        try:
            import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops for loading)
        except ImportError:
            raise missing_extra("torch-tensorrt", "gpu", "running Torch-TensorRT programs") from None
        if not torch.cuda.is_available():
            raise UserError("Torch-TensorRT programs need a CUDA GPU, and PyTorch sees none here")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Torch-TensorRT program {path} not found")
        self.path, self.precision, self.device, self.name = path, precision, "cuda", "torch-tensorrt"
        if path.suffix == ".ts":
            self.module = torch.jit.load(str(path)).cuda().eval()
        else:
            self.module = torch.export.load(str(path)).module()
        # The compiled program takes fp32 input and casts internally where it was built for fp16.
        self._dtype = torch.float32

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to("cuda", self._dtype)

    def run_staged(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(staged)
        return out[0] if isinstance(out, (tuple, list)) else out

    def synchronize(self) -> None:
        torch.cuda.synchronize()


# Artefact format (export.json record "format") -> runner class. The one table export and bench share.
ENGINES: dict[str, type[Runner]] = {
    "pytorch": TorchRunner,
    "onnx": OnnxRuntimeRunner,
    "tensorrt": TensorRTRunner,
    "torch-tensorrt": TorchTensorRTRunner,
}

# Formats that need a CUDA GPU to run (bench and export skip them, with a reason, where there is none).
GPU_FORMATS = frozenset({"tensorrt", "torch-tensorrt"})


def runner_for(record: dict[str, Any], base: str | Path, *, device: str = "auto") -> Runner:
    """The runner for one export.json artefact record (its "path" is relative to `base`)."""
    fmt = record["format"]
    if fmt not in ENGINES:
        raise UserError(f"no runner for artefact format '{fmt}'; known: {', '.join(ENGINES)}")
    path = Path(base) / record["path"]
    kwargs: dict[str, Any] = {"precision": record.get("precision", "fp32")}
    if fmt in ("pytorch", "onnx"):
        kwargs["device"] = device
    return ENGINES[fmt](path, **kwargs)
