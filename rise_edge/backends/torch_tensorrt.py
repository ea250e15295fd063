"""Torch-TensorRT: the student compiled by torch_tensorrt (dynamo IR) and saved as an ExportedProgram.

    model.{fp32,fp16}.torch-trt.ep    Torch-TensorRT ExportedPrograms
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rise_edge.backend_table import Artefact, Backend
from rise_edge.backends.base import Runner, cuda_backend_unavailable
from rise_edge.config import ExportConfig
from rise_edge.errors import UserError, missing_extra
from rise_edge.export.session import ExportSession


class TorchTensorRTRunner(Runner):
    """A Torch-TensorRT compiled student saved as an ExportedProgram (.ep) or TorchScript (.ts)."""

    def __init__(self, path: str | Path, *, precision: str = "fp16"):
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
        self.torch_stream = True
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


def compile_torch_tensorrt(student: Any, out_path: Path, *, precision: str, input_size: int,
                           batch_profile: Sequence[int]) -> dict[str, Any]:
    """torch_tensorrt.compile (dynamo IR) with a dynamic batch, saved as an ExportedProgram."""
    try:
        import torch_tensorrt
    except ImportError:
        raise missing_extra("torch-tensorrt", "gpu", "Torch-TensorRT compilation") from None
    import torch

    low, opt, high = batch_profile
    shape = (3, input_size, input_size)
    model = student.eval().cuda()
    spec = torch_tensorrt.Input(min_shape=(low, *shape), opt_shape=(opt, *shape),
                                max_shape=(high, *shape), dtype=torch.float32)
    options, typing_mode = _precision_options(torch_tensorrt, precision)
    compiled = torch_tensorrt.compile(model, ir="dynamo", inputs=[spec], **options)
    example = torch.randn(opt, *shape, device="cuda")
    try:
        torch_tensorrt.save(compiled, str(out_path), output_format="exported_program",
                            arg_inputs=[example])
    except TypeError:  # releases before 2.5 name the example inputs `inputs`
        torch_tensorrt.save(compiled, str(out_path), output_format="exported_program", inputs=[example])
    return {"torch_tensorrt": torch_tensorrt.__version__, "ir": "dynamo",
            "batch_profile": list(batch_profile), "precision_mode": typing_mode}


def _precision_options(torch_tensorrt: Any, precision: str) -> tuple[dict[str, Any], str]:
    """compile() options that really give `precision`, and how. Releases with rule-based autocast
    default to explicit typing, where `enabled_precisions` alone leaves an FP32 model FP32: FP16
    then comes from autocast (use_explicit_typing + enable_autocast, low_precision_type fp16).
    Older releases only have TensorRT's weak typing, asked for through enabled_precisions."""
    import dataclasses

    import torch

    try:
        from torch_tensorrt.dynamo._settings import CompilationSettings
        fields = {f.name for f in dataclasses.fields(CompilationSettings)}
    except (ImportError, TypeError):
        fields = set()
    if "enable_autocast" in fields:
        if precision == "fp16":
            return ({"use_explicit_typing": True, "enable_autocast": True,
                     "low_precision_type": torch.float16}, "explicit typing, rule-based autocast to fp16")
        return {"use_explicit_typing": True}, "explicit typing, fp32"
    dtypes = {torch.float16, torch.float32} if precision == "fp16" else {torch.float32}
    weak = {"use_explicit_typing": False} if "use_explicit_typing" in fields else {}
    return {**weak, "enabled_precisions": dtypes}, "weak typing (enabled_precisions)"


def make_torch_tensorrt(s: ExportSession, tmp: Path, name: str) -> dict[str, Any]:
    precision = _ARTEFACTS[name].precision
    with tempfile.TemporaryDirectory(dir=s.dir, prefix=".work-") as work:
        program = Path(work) / _ARTEFACTS[name].filename  # saved under its real suffix, then moved
        info = compile_torch_tensorrt(s.run.student, program, precision=precision,
                                      input_size=s.pre.input_size, batch_profile=s.cfg.batch_profile)
        os.replace(program, tmp)
    s.run.student.cpu()
    parity = s.check_parity(TorchTensorRTRunner(tmp, precision=precision), f"the {name} program",
                            None, needs_data=False)
    return {**info, "parity": parity}


def plan(cfg: ExportConfig) -> list[str]:
    return ["torch-tensorrt-fp16" if cfg.fp16 else "torch-tensorrt-fp32"]


def _program(precision: str) -> Artefact:
    name = f"torch-tensorrt-{precision}"
    return Artefact(name, "torch-tensorrt", precision, f"model.{precision}.torch-trt.ep", "tensorrt",
                    lambda s, tmp: make_torch_tensorrt(s, tmp, name))


_ARTEFACTS = {a.name: a for a in (_program("fp32"), _program("fp16"))}

BACKEND = Backend(
    format="torch-tensorrt", name="torch-tensorrt",
    summary="Torch-TensorRT ExportedPrograms on an NVIDIA GPU",
    runner=TorchTensorRTRunner, devices=("cuda",),
    unavailable=lambda: cuda_backend_unavailable("a Torch-TensorRT program", "torch_tensorrt",
                                                 "torch-tensorrt"),
    plan=plan, artefacts=tuple(_ARTEFACTS.values()))
