"""Building TensorRT engines: ModelOpt's explicit INT8 Q/DQ, FP16, the engine build, close to the APIs.

- INT8 is EXPLICIT: nvidia-modelopt's ONNX quantizer writes Q/DQ nodes placed by TensorRT's rules
  (calibrating on the CPU through ONNX Runtime), and the engine is built from that graph as a strongly
  typed network. The implicit calibrator (IInt8EntropyCalibrator2 + a calibration cache) is only a
  fallback for TensorRT <= 10 without modelopt: TensorRT deprecated it in 10.1 and removed it in 11.
- FP16: TensorRT 10 takes the FP32 ONNX with BuilderFlag.FP16; TensorRT 11 has no such flag, so the
  ONNX is first converted to mixed precision by modelopt's AutoCast and built strongly typed.
- Engines are bound to the GPU and TensorRT version: they are built on the device that runs them,
  with a dynamic-batch optimisation profile and a timing cache named after GPU + TensorRT version.

Nothing here runs on a machine without CUDA and TensorRT; the backend (rise_edge.backends.tensorrt)
says why in one sentence. Torch-TensorRT's compile step lives with its own backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.backends.base import have
from rise_edge.errors import UserError, missing_extra


def modelopt_unavailable() -> str | None:
    if have("modelopt"):
        return None
    return ("the TensorRT Q/DQ ONNX needs nvidia-modelopt, which is not installed; install it with: "
            "pip install 'rise-edge[gpu]'")


def import_tensorrt(purpose: str = "building TensorRT engines") -> Any:
    try:
        import tensorrt
    except ImportError:
        raise missing_extra("tensorrt", "gpu", purpose) from None
    return tensorrt


def tensorrt_major() -> int:
    return int(import_tensorrt().__version__.split(".")[0])


# ---------------------------------------------------------------------------------------------------
# Explicit quantization (modelopt) and FP16 conversion for TensorRT 11


MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}  # modelopt's int8 calibration methods


def modelopt_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str,
                 input_name: str) -> dict[str, Any]:
    """Q/DQ ONNX for TensorRT from modelopt (symmetric int8, per-channel weights, per-tensor
    activations, placed where TensorRT fuses them). Calibrates on the CPU through ONNX Runtime."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise missing_extra("nvidia-modelopt", "gpu", "the TensorRT Q/DQ ONNX") from None
    used = MODELOPT_METHODS.get(method)
    note = None
    if used is None:  # percentile: modelopt's int8 offers max and entropy only
        used, note = "entropy", f"modelopt has no '{method}' int8 calibration; used entropy"
    # The layers left unquantized stay FP32: modelopt's default (high_precision_dtype='fp16' where
    # the argument exists) would make this "INT8" engine an INT8 + FP16 one, and its accuracy
    # against FP32 would mix two roundings. Releases without the argument keep FP32 already.
    import inspect

    keep = ({"high_precision_dtype": "fp32"}
            if "high_precision_dtype" in inspect.signature(quantize).parameters else {})
    # modelopt rewrites the ONNX it is given (measured with 0.47: the FP32 artefact's bytes changed,
    # and bench then refused it as tampered) and writes its intermediate graphs beside its output:
    # it works on a copy, in a folder of its own that goes whatever happens.
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".modelopt-") as work:
        given, made = Path(work) / "fp32.onnx", Path(work) / "int8-qdq.onnx"
        shutil.copyfile(fp32_path, given)
        quantize(str(given), quantize_mode="int8", calibration_data={input_name: calibration},
                 calibration_method=used, calibration_eps=["cpu"], output_path=str(made), **keep)
        shutil.move(made, out_path)
    return {"tool": "nvidia-modelopt", "calibration_method": used, "note": note,
            "unquantized_layers": keep.get("high_precision_dtype", "fp32 (this modelopt's only)")}


def autocast_fp16(fp32_path: Path, out_path: Path) -> None:
    """TensorRT 11: FP16 comes from the graph's types (modelopt AutoCast), keeping FP32 I/O."""
    try:
        import modelopt.onnx.autocast as autocast
    except ImportError:
        raise missing_extra("nvidia-modelopt", "gpu", "FP16 engines on TensorRT 11") from None
    import onnx

    onnx.save(autocast.convert_to_mixed_precision(onnx_path=str(fp32_path), low_precision_type="fp16",
                                                  keep_io_types=True), str(out_path))


# ---------------------------------------------------------------------------------------------------
# Engine build


def device_tag() -> str:
    """GPU name + compute capability + TensorRT version: what an engine or timing cache is bound to."""
    import torch

    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return f"{gpu}-sm{major}{minor}-trt{trt.__version__}"


def timing_cache_path(export_dir: Path) -> Path:
    return export_dir / "cache" / f"timing-{device_tag()}.cache"


def build_engine(onnx_path: Path, engine_path: Path, *, input_name: str, input_shape: Sequence[int],
                 batch_profile: Sequence[int], fp16_flag: bool = False, strongly_typed: bool = True,
                 timing_cache: Path | None = None, calibrator: Any = None) -> dict[str, Any]:
    """Parse ONNX, build a serialized engine with a (min, opt, max) batch profile, write it.

    input_shape: (C, H, W) for float NCHW or (H, W, C) for uint8 NHWC; batch goes in front.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    low, opt, high = batch_profile
    profile.set_shape(input_name, (low, *input_shape), (opt, *input_shape), (high, *input_shape))
    config.add_optimization_profile(profile)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if calibrator is not None:  # legacy implicit INT8 (TensorRT <= 10 only)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    cache = None
    if timing_cache is not None:
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if cache is not None and timing_cache is not None:
        from rise_edge.files import atomic_path

        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "device": device_tag(), "strongly_typed": bool(flags),
            "batch_profile": list(batch_profile),
            "timing_cache": timing_cache.name if timing_cache is not None else None}


def legacy_entropy_calibrator(images: np.ndarray, cache_file: Path, batch: int = 8) -> Any:
    """IInt8EntropyCalibrator2 over (N, 3, H, W) images, with its calibration cache in `cache_file`
    (whose name the caller keys on the calibration set's hash, the method and the model's hash)."""
    trt = import_tensorrt()
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.position = 0
            self.device_batch: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.position + batch > len(images):
                return None
            chunk = images[self.position:self.position + batch]
            self.position += batch
            self.device_batch = torch.from_numpy(np.ascontiguousarray(chunk, np.float32)).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            from rise_edge.files import atomic_path

            with atomic_path(cache_file) as tmp:
                tmp.write_bytes(bytes(cache))

    return EntropyCalibrator()
