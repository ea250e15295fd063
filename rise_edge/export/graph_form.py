"""The form a student takes before it becomes a graph: static padding and folded BatchNorm (and the
one helper that swaps a submodule, which fake quantization uses too).

Why static padding. timm's TF-ported models (tf_efficientnet_lite0, tf_mobilenetv3, ...) pad 'same'
at run time: `pad_same` computes each pad from the input's size with float arithmetic (Shape, Div,
Ceil, Sub, Clip, Cast, Concat in ONNX). A post-training quantizer that wraps every float tensor in
Q/DQ rounds those pad sizes too, and the pads that run change (measured on PACS Lite0: 3 of 5
stride-2 convolutions, -10 points on the unseen sketch). An artefact is exported for one input size,
so every pad is known at export time: writing them as constants removes the arithmetic from the graph
for every backend (ONNX Runtime, TensorRT, the others) at once, instead of teaching each quantizer to
step around it. The quantizer still refuses to quantize shape arithmetic
(backends/onnxruntime/int8.py) for students whose graphs keep some, and onnx_graph.shape_mismatches proves the INT8 graph runs the FP32 graph's
shapes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """TF 'same' pads for an (H, W) input -> (left, right, top, bottom), as timm's pad_same."""
    pads = []
    for x, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class StaticPadConv2d(nn.Conv2d):
    """A convolution whose 'same' pads were fixed for one input size: constant pad, then convolve."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                         conv.dilation, conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return super().forward(x)


class StaticPadMaxPool2d(nn.MaxPool2d):
    """timm's MaxPool2dSame with its pads fixed for one input size (padded with -inf, as timm does)."""

    def __init__(self, pool: nn.MaxPool2d, pads: tuple[int, int, int, int]):
        super().__init__(pool.kernel_size, pool.stride, 0, pool.dilation, ceil_mode=pool.ceil_mode)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=-float("inf"))
        return super().forward(x)


def _dynamic_same_layers() -> tuple[type, ...]:
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame
    return Conv2dSame, MaxPool2dSame


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted, as named_modules gives it) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def with_static_padding(model: nn.Module, input_size: int) -> tuple[nn.Module, int]:
    """A copy of `model` in eval mode whose run-time 'same' padding layers have constant pads for
    (N, 3, input_size, input_size) inputs; returns it and how many layers were replaced. The copy
    computes exactly what the original computes at that size (same pads, same weights)."""
    dynamic = _dynamic_same_layers()
    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, m in model.named_modules() if isinstance(m, dynamic)]
    if not hooks:
        return model, 0
    parameter = next(model.parameters())
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size, dtype=parameter.dtype,
                          device=parameter.device))
    for hook in hooks:
        hook.remove()
    for name, size in sizes.items():
        layer = model.get_submodule(name)
        pads = _same_pads(size, _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.dilation))
        new = (StaticPadConv2d(layer, pads) if isinstance(layer, nn.Conv2d)
               else StaticPadMaxPool2d(layer, pads))
        replace_module(model, name, new.to(parameter.device))
    return model, len(sizes)


def fold_batchnorm(model: nn.Module, input_size: int) -> tuple[nn.Module, int]:
    """Fold every BatchNorm that directly follows a convolution into that convolution's weight and
    bias (eval statistics), in place; returns the model and how many were folded.

    Pairs are found by running the model once and matching the convolution's output tensor with the
    BatchNorm's input tensor, so any timm CNN works without knowing its module names. A timm
    BatchNormAct2d keeps its activation (and dropout); a plain BatchNorm2d becomes an identity. Used
    before quantization-aware training: the deployed graph folds BN into the convolution, so the
    weights that are fake-quantized must be the folded ones.
    """
    model.eval()
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            calls.append((name, module, args[0], out))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    parameter = next(model.parameters())
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size, device=parameter.device))
    for hook in hooks:
        hook.remove()
    producer = {id(out): (name, m) for name, m, _, out in calls if isinstance(m, nn.Conv2d)}
    folded = 0
    for name, bn, inp, _ in calls:
        if not isinstance(bn, nn.BatchNorm2d) or id(inp) not in producer or not bn.track_running_stats:
            continue
        _, conv = producer[id(inp)]
        weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        replace_module(model, name, nn.Sequential(*rest) if rest else nn.Identity())
        folded += 1
    return model, folded
