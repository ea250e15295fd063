"""The form a student takes before it becomes a graph: static padding, folded BatchNorm, and a check
that two ONNX graphs of it compute the same shapes.

Why static padding. timm's TF-ported models (tf_efficientnet_lite0, tf_mobilenetv3, ...) pad 'same'
at run time: `pad_same` computes each pad from the input's size with float arithmetic (Shape, Div,
Ceil, Sub, Clip, Cast, Concat in ONNX). A post-training quantizer that wraps every float tensor in
Q/DQ rounds those pad sizes too, and the pads that run change (measured on PACS Lite0: 3 of 5
stride-2 convolutions, -10 points on the unseen sketch). An artefact is exported for one input size,
so every pad is known at export time: writing them as constants removes the arithmetic from the graph
for every backend (ONNX Runtime, TensorRT, the others) at once, instead of teaching each quantizer to
step around it. The quantizer still refuses to quantize shape arithmetic (quantize.py) for students
whose graphs keep some, and `same_shapes` proves the INT8 graph runs the FP32 graph's shapes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
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
        _replace(model, name, new.to(parameter.device))
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
        _replace(model, name, nn.Sequential(*rest) if rest else nn.Identity())
        folded += 1
    return model, folded


def module_of_onnx_node(model: nn.Module, node: str) -> str:
    """The module an ONNX node of the TorchScript exporter belongs to: '/backbone/conv1/conv1.0/Conv'
    is the module 'backbone.conv1.0' (a numbered child's scope repeats its parent's name)."""
    def scopes(name: str) -> str:
        parts, out = name.split("."), []
        for part in parts:
            out.append(f"{out[-1]}.{part}" if part.isdigit() and out else part)
        return "/" + "/".join(out)
    path = node.rsplit("/", 1)[0]
    for name, _ in model.named_modules():
        if name and scopes(name) == path:
            return name
    raise ValueError(f"no module of the model matches the ONNX node {node}")


# ---------------------------------------------------------------------------------------------------
# Shape check between two ONNX graphs of one model

SHAPED_OPS = ("Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "Pad")


def tensors_along_graph(path: Path, images: np.ndarray, names: Sequence[str],
                        input_name: str = "images") -> dict[str, np.ndarray]:
    """Values of the named intermediate tensors when the graph runs on `images` (N, 3, S, S).

    Graph optimisations are off: fusions would rename or remove the watched tensors, and every
    watched tensor must exist as it is in the file. Names that are no node's output are left out."""
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    present = {o for n in model.graph.node for o in n.output}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name in present and name not in existing:
            model.graph.output.add().name = name
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs() if o.name in set(names)]
    return dict(zip(outputs, session.run(outputs, {input_name: images})))


def node_output_shapes(path: Path, images: np.ndarray, input_name: str = "images"
                       ) -> dict[str, tuple[int, ...]]:
    """Node name -> output shape of every convolution, pool and pad when the graph runs on `images`.
    Names survive quantization (ONNX Runtime's quantizer keeps the compute nodes' names), so two
    graphs of one model can be compared node by node."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    existing = {o.name for o in graph.output}
    watched = {n.output[0]: n.name for n in graph.node
               if n.op_type in SHAPED_OPS and n.output and n.output[0] not in existing}
    values = tensors_along_graph(path, images.astype(np.float32), list(watched), input_name)
    return {watched[n]: tuple(v.shape) for n, v in values.items()}


def shape_mismatches(reference: Path, candidate: Path, images: np.ndarray,
                     input_name: str = "images") -> list[str]:
    """Nodes whose output shape differs between two graphs of one model (empty: same shapes)."""
    a = node_output_shapes(reference, images, input_name)
    b = node_output_shapes(candidate, images, input_name)
    return [f"{name}: {a[name]} -> {b[name]}" for name in a if name in b and a[name] != b[name]]


def fold_constants(path: Path) -> None:
    """Rewrite an ONNX file with its constant sub-graphs folded, in place.

    The TorchScript exporter writes a constant pad as a small int64 program (ConstantOfShape,
    Concat, Slice, Transpose, Reshape) and fake-quantized weights as Abs/ReduceMax/Div/Quantize on
    the float weight. ONNX Runtime's BASIC level folds both into initializers (int8 weights behind a
    DequantizeLinear, as TensorRT wants them) using only standard ONNX operators, so the file stays
    portable; the graph's metadata is kept and the opset imports it does not use are dropped.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    folded = path.with_name(path.name + ".folded")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    try:
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
    finally:
        folded.unlink(missing_ok=True)
    original = onnx.load(str(path), load_external_data=False)
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
