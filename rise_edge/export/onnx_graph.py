"""Reading and folding an exported ONNX graph: the module a node came from, intermediate tensors
along the graph (one walker, for the shape check and the INT8 error ranking), the check that two
graphs of one model compute the same shapes, and constant folding after export."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn


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
