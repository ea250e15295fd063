"""Torch-TensorRT: the student compiled by torch_tensorrt (dynamo IR) and saved as an ExportedProgram.

    model.{fp32,fp16}.torch-trt.ep    Torch-TensorRT ExportedPrograms
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Collection, Sequence
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
    """Torch-TensorRT (dynamo) with a dynamic batch, saved as an ExportedProgram that keeps it."""
    try:
        import torch_tensorrt
    except ImportError:
        raise missing_extra("torch-tensorrt", "gpu", "Torch-TensorRT compilation") from None

    low, opt, high = batch_profile
    shape = (3, input_size, input_size)
    model = student.eval().cuda()
    # Exported here, not by torch_tensorrt, so that the batch range is rise-edge's own (and tested on
    # the CPU); the dynamo compiler takes an ExportedProgram in every release from 2.4.
    program = export_dynamic_batch(model, input_size, batch_profile)
    spec = torch_tensorrt.Input(min_shape=(low, *shape), opt_shape=(opt, *shape),
                                max_shape=(high, *shape), dtype=torch.float32)
    keywords, typing_mode = _compile_keywords(_settings_fields(), precision, spec)
    compiled = torch_tensorrt.dynamo.compile(program, **keywords)
    example = _example_images(model, input_size, batch_profile)
    save_parameters = inspect.signature(torch_tensorrt.save).parameters
    torch_tensorrt.save(compiled, str(out_path),
                        **_save_keywords(save_parameters, example, batch_profile))
    return {"torch_tensorrt": torch_tensorrt.__version__, "ir": "dynamo",
            "batch_profile": list(batch_profile), "precision_mode": typing_mode}


def _example_batch(batch_profile: Sequence[int]) -> int:
    """The batch to trace with: the profile's opt, but never 1 where the profile goes past 1, since
    torch.export turns a dimension it sees at size 1 into the constant 1."""
    low, opt, high = batch_profile
    return opt if opt > 1 or high == low else 2


def _dynamic_batch(batch_profile: Sequence[int]) -> tuple[dict[int, Any]] | None:
    """torch.export dynamic_shapes for the one positional input: batch in [min, max] of the profile.
    A tuple, not a dict by argument name: the name differs between the student and the graph
    torch_tensorrt.save re-exports. None for a one-batch profile (nothing is dynamic)."""
    low, _, high = batch_profile
    if low == high:
        return None
    return ({0: torch.export.Dim("batch", min=low, max=high)},)


def _example_images(model: torch.nn.Module, input_size: int, batch_profile: Sequence[int]
                    ) -> torch.Tensor:
    """Random images of the batch to trace with, on the model's device."""
    device = next(model.parameters()).device
    return torch.randn(_example_batch(batch_profile), 3, input_size, input_size, device=device)


def export_dynamic_batch(model: torch.nn.Module, input_size: int, batch_profile: Sequence[int]
                         ) -> torch.export.ExportedProgram:
    """The student as an ExportedProgram that takes every batch from the profile's min to its max,
    on the device its parameters are on."""
    example = _example_images(model, input_size, batch_profile)
    # Non-strict, as torch_tensorrt's own tracer exports (strict was the default before torch 2.7).
    return torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch(batch_profile),
                               strict=False)


def _save_keywords(parameters: Collection[str], example: torch.Tensor, batch_profile: Sequence[int]
                   ) -> dict[str, Any]:
    """torch_tensorrt.save keywords that keep the profile's batch range in the saved program, for
    the save of this release (`parameters`: its parameter names).

    From 2.10 save re-exports the compiled graph with torch.export (retrace=True is the default),
    and an example tensor alone fixes the batch at the example's. 2.11 and later take
    `dynamic_shapes` for that re-export. Before them there is no way to pass a range to the
    re-export, so the legacy exporter (retrace=False, the default before 2.10) serialises the
    compiled graph as it is, its inputs still carrying the symbolic batch of the ExportedProgram it
    was compiled from; 2.4's legacy exporter also runs a shape analysis on example `inputs`."""
    keywords: dict[str, Any] = {"output_format": "exported_program"}
    if "dynamic_shapes" in parameters:
        return {**keywords, "arg_inputs": [example], "dynamic_shapes": _dynamic_batch(batch_profile),
                "retrace": True}
    keywords["retrace"] = False
    if "arg_inputs" not in parameters:
        keywords["inputs"] = [example]
    return keywords


def _settings_fields() -> frozenset[str]:
    """The fields of the installed torch_tensorrt.dynamo CompilationSettings (torch_tensorrt is
    imported by the caller)."""
    import dataclasses

    from torch_tensorrt.dynamo._settings import CompilationSettings

    return frozenset(f.name for f in dataclasses.fields(CompilationSettings))


def _compile_keywords(fields: Collection[str], precision: str, spec: Any
                      ) -> tuple[dict[str, Any], str]:
    """Keywords for torch_tensorrt.dynamo.compile: the input range `spec` and the settings that
    really give `precision` in the release whose CompilationSettings has `fields`; and how."""
    options, mode = _precision_options(fields, precision)
    return {"inputs": [spec], **options}, mode


def _precision_options(fields: Collection[str], precision: str) -> tuple[dict[str, Any], str]:
    """The CompilationSettings that make `precision` happen, read from the release's `fields`.

    Every keyword must be a field: the dynamo compiler takes **kwargs and drops the ones it does
    not know, so a misspelt or retired setting leaves an FP32 model FP32 without a word.
    - 2.10 and later type explicitly by default (2.13 removed weak typing and enabled_precisions,
      and the top-level compile drops enabled_precisions on the dynamo path): FP16 comes from
      rule-based autocast, enable_autocast with autocast_low_precision_type float16, which turns
      explicit typing on by itself. FP32 needs nothing: the FP32 graph stays FP32.
    - 2.4 to 2.9 only have TensorRT's weak typing: enabled_precisions lets it pick FP16 kernels
      (and use_explicit_typing, from 2.6, must stay off, as it is by default)."""
    if {"enable_autocast", "autocast_low_precision_type"} <= set(fields):
        if precision == "fp16":
            return ({"enable_autocast": True, "autocast_low_precision_type": torch.float16},
                    "explicit typing, rule-based autocast to fp16")
        return {}, "explicit typing, fp32"
    if "enabled_precisions" not in fields:
        if precision == "fp16":
            raise UserError("this torch-tensorrt release has neither the autocast nor the "
                            "enabled_precisions setting, the two ways rise-edge knows to ask for "
                            "FP16 (releases 2.4 to 2.14); install one of those, or export with "
                            "--no-fp16")
        return {}, "explicit typing, fp32"
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
