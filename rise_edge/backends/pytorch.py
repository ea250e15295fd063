"""The PyTorch student in eager mode: the reference every artefact is compared with (never exported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rise_edge.backend_table import Backend
from rise_edge.backends.base import Runner, resolve_device
from rise_edge.errors import UserError


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
        self.device = resolve_device(device)
        if precision == "fp16" and self.device != "cuda":
            raise UserError("PyTorch fp16 inference is for CUDA; on the CPU use fp32")
        self.precision = precision
        self.name = "pytorch"
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        module = module.eval().to(self.device, self._dtype)
        if self.device == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.torch_stream = self.device == "cuda"

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


BACKEND = Backend(
    format="pytorch", name="pytorch", summary="the trained student in PyTorch eager mode (reference)",
    runner=TorchRunner, devices=("auto", "cpu", "cuda"), unavailable=lambda: None,
    aliases=("torch",), exportable=False)
