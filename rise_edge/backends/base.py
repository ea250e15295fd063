"""What every backend's runner shares: one call, images -> logits, and staged runs for timing.

    runner = runner_for(record, export_dir)   # rise_edge.backend_table
    logits = runner(images)             # images: float32 NCHW, normalised as the student expects
                                        # logits: float32 (N, C) numpy

For pure-compute timing every runner can also stage its input where the backend reads it (device
memory, an IOBinding) once, and run on it repeatedly:

    staged = runner.prepare(images)
    runner.run_staged(staged); runner.synchronize()
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import torch

from rise_edge.errors import UserError


def have(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


def cuda_backend_unavailable(what: str, package: str, pip_name: str) -> str | None:
    """None when a CUDA GPU and `package` are both here, else one sentence saying what is missing."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to PyTorch")
    if not have(package):
        missing.append(f"the '{pip_name}' package is not installed")
    if not missing:
        return None
    return (f"{what} needs a CUDA GPU with {pip_name}, but here {' and '.join(missing)}; make and "
            "run it on the device, with pip install 'rise-edge[gpu]' there.")


def physical_cores() -> int:
    """Physical cores (hyper-threads share FMA units, so more threads than cores only adds contention)."""
    try:
        import psutil
        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def resolve_device(device: str) -> str:
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
    # True when its CUDA work is queued on PyTorch's current stream, so CUDA events can time it.
    torch_stream: bool = False

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
