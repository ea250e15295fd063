"""The one ONNX Runtime session wrapper: an ONNX file on the CPU, CUDA or TensorRT execution
provider, as a runner (normalised images (N, 3, S, S) float32 -> logits (N, C) float32).

Export's parity and fidelity checks, the INT8 quantizer's trials and budget timing, and bench all
run ONNX files through it, so they all see the same session options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.backends.base import Runner, physical_cores
from rise_edge.errors import UserError, missing_extra
from rise_edge.export.session import META_PREFIX, PLACED_FOR


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
            # onnxruntime-gpu lists its CUDA provider on machines without a GPU too.
            device = "cuda" if "CUDAExecutionProvider" in available and torch.cuda.is_available() else "cpu"
        if device not in wanted:
            raise UserError(f"ONNX Runtime device must be cpu, cuda or tensorrt, not '{device}'")
        if wanted[device][0] not in available:
            raise UserError(f"ONNX Runtime here has no {wanted[device][0]} (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu for GPU execution")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # A Q/DQ graph placed for TensorRT stands, on the CPU, for the engine's arithmetic: int8
        # products summed in int32. ONNX Runtime's fused x86 kernels without VNNI add pairs of u8 x s8
        # products in a saturating int16 (vpmaddubsw), which 8-bit weights overflow (measured:
        # benchmarks/results/int8_target.md, and a PACS Lite0 Q/DQ graph that agreed with FP32 on
        # 63 % of unseen images that way). With graph optimisations off every Q/DQ pair is computed
        # as written: dequantized, then the layer in float, exact up to float summation order.
        self.qdq_as_written = device == "cpu" and self.metadata.get(PLACED_FOR) == "tensorrt"
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                                            if self.qdq_as_written else
                                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.session = ort.InferenceSession(str(path), options, providers=wanted[device])
        # What runs, not what was asked: onnxruntime-gpu on a machine whose CUDA cannot start logs
        # an error and silently builds a CPU-only session.
        self.provider = self.session.get_providers()[0]
        self.device = "cpu" if self.provider == "CPUExecutionProvider" else "cuda"
        self.fallback = (None if self.provider == wanted[device][0] else
                         f"asked ONNX Runtime for {wanted[device][0]}, it ran {self.provider} (the "
                         "provider is installed but could not start here: no GPU, or no CUDA/"
                         "TensorRT libraries it needs)")
        self.name = {"CPUExecutionProvider": "onnxruntime", "CUDAExecutionProvider": "onnxruntime-cuda",
                     "TensorrtExecutionProvider": "onnxruntime-trt"}.get(self.provider, "onnxruntime")
        if self.qdq_as_written:
            self.name = "onnxruntime (Q/DQ as written)"
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
