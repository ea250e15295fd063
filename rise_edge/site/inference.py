"""Running a student over many site images fast on the machine at hand.

A label-free estimate needs the student's logits on every source validation and site image, before
and after adaptation: thousands of forward passes. On a CPU, ONNX Runtime runs these compact
students several times as fast as eager PyTorch (EfficientNet-Lite0 at 224 px: 0.68 s against 3.5 s
per 32 images on two busy cores), so the student is exported to a temporary ONNX graph and run
there; where that fails (an operator the exporter cannot take, no onnxruntime), PyTorch runs it,
channels-last. The adaptation passes themselves (BatchNorm statistics, T3A's features) need the
module and stay in PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

Model = Callable[[np.ndarray], np.ndarray]  # (N, 3, S, S) float32 -> (N, C) logits


def torch_model(module: nn.Module) -> Model:
    """A channels-last copy of the module (faster on CPUs; the module itself is left as it is) as
    an array -> logits function, in eval mode."""
    module = copy.deepcopy(module).eval().to(memory_format=torch.channels_last)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
            return module(x).float().numpy()
    return run


@contextlib.contextmanager
def fast_model(module: nn.Module, image_size: int, opset: int) -> Iterator[tuple[Model, str]]:
    """(logits function, what runs it) for the duration of the block: ONNX Runtime on the CPU when
    the module exports, else PyTorch. The graph is made by export's own path at the run's
    export.opset, so the estimates see the graph `rise-edge export` ships; it is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="rise-edge-site-") as tmp:
        try:
            from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
            from rise_edge.export.session import export_graph

            path = Path(tmp) / "student.onnx"
            export_graph(module, torch.randn(2, 3, image_size, image_size), path, opset)
            runner = OnnxRuntimeRunner(path, device="cpu")
        except Exception:  # the exporters and onnxruntime raise many types: PyTorch then
            yield torch_model(module), "pytorch"
            return
        yield (lambda images: np.asarray(runner(images), dtype=np.float32)), "onnxruntime"
