"""Fake quantization for quantization-aware training, written with PyTorch's own fake-quant ops so the
trained model exports as an explicit Q/DQ ONNX graph (QuantizeLinear/DequantizeLinear) that TensorRT
builds as a strongly typed INT8 engine and ONNX Runtime runs with its INT8 kernels.

Why PyTorch's ops and not nvidia-modelopt: modelopt's PyTorch quantization pulls in CUDA-oriented
dependencies and is kept out of the CPU install (deploy-notes); `torch.fake_quantize_per_*_affine`
ship with torch, run on any CPU, have straight-through gradients, and the ONNX exporter writes them as
Q/DQ pairs. The scheme is TensorRT's: symmetric INT8 (zero point 0), per-channel weights, per-tensor
activations, Q/DQ on the inputs of every weighted layer (convolution, linear).

    quantize_model(student, input_size)       static pads, BN folded, Conv/Linear -> Quant*
    calibrate(model, batches)                 activation ranges (max |x|) from source images
    model.train() ... fine-tune ...           weights learn around the fixed ranges
    export_graph(model, ...)                  Q/DQ ONNX
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rise_edge.export.graph_form import fold_batchnorm, replace_module, with_static_padding

# Symmetric int8: scale = amax / 127, values clamped to [-128, 127] * scale, as the exported
# QuantizeLinear clamps them (ONNX and TensorRT alike): the fake-quant model computes what the
# Q/DQ graph computes. -128 is reached only below -amax, e.g. an activation past its range.
QMAX = 127
QMIN = -128


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax / QMAX).clamp(min=1e-8)


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric INT8 of a (O, ...) weight, range = that channel's max |w|.
    The range follows the weight as it trains (no state to save)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    scale = _scale(amax).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, QMIN, QMAX)


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric INT8 of an activation. `amax` comes from calibration (max |x| over the
    calibration images) and stays fixed during fine-tuning, as in TensorRT's QAT recipe."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.tensor(0.0))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.amax = torch.maximum(self.amax, x.detach().abs().max().float())
            return x
        scale = _scale(self.amax).float()
        # The zero point on the activation's device: a CPU scalar beside a CUDA activation fails.
        return torch.fake_quantize_per_tensor_affine(
            x, scale.to(x.device), torch.zeros((), dtype=torch.int32, device=x.device), QMIN, QMAX)


class QuantConv2d(nn.Module):
    """A convolution (static pads) whose input and weight are fake-quantized to INT8."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.input_quantizer = ActivationQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x = self.input_quantizer(x)
        if any(getattr(c, "pads", ())):
            x = F.pad(x, c.pads)
        return F.conv2d(x, fake_quantize_weight(c.weight), c.bias, c.stride, c.padding, c.dilation,
                        c.groups)


class QuantLinear(nn.Module):
    """A linear layer whose input and weight are fake-quantized to INT8."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.input_quantizer = ActivationQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), fake_quantize_weight(self.linear.weight),
                        self.linear.bias)


def quantize_model(model: nn.Module, input_size: int, keep_fp32: Iterable[str] = ()) -> nn.Module:
    """A copy of `model` ready for QAT: static pads, BatchNorm folded into convolutions, and every
    Conv2d / Linear (except the module names in `keep_fp32`) wrapped with INT8 fake quantization."""
    model, _ = with_static_padding(model, input_size)
    fold_batchnorm(model, input_size)
    keep = set(keep_fp32)
    for name, module in list(model.named_modules()):
        if name in keep or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        replace_module(model, name,
                       QuantConv2d(module) if isinstance(module, nn.Conv2d) else QuantLinear(module))
    return model


def quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set every activation range to the max |x| seen over `batches` of (B, 3, S, S) images."""
    model.eval()
    for q in quantizers(model):
        q.amax.zero_()
        q.calibrating = True
    try:
        for images in batches:
            model(images)
    finally:
        for q in quantizers(model):
            q.calibrating = False
