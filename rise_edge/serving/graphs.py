"""The ONNX side of a bundle: read a graph's real I/O (what Triton's config must declare), add an
embedding output beside the logits, and fold the run's normalisation into a float-pixel graph for
DeepStream.

Why a float-pixel graph and not export's uint8 one: nvinfer hands the engine float planar RGB,
y = net-scale-factor * (x - offsets) per pixel, never uint8. With the normalisation inside the graph
(pixels * 1/(255 std) - mean/std, the arithmetic of export's FoldedPreprocessing) nvinfer's scale is
1 and its offsets 0, which reproduce the camera's uint8 values exactly; a per-channel std cannot be
written as nvinfer's single scale any other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ONNX TensorProto element types -> (numpy name, Triton data type). Only what a classifier has.
ONNX_TYPES = {1: ("float32", "TYPE_FP32"), 2: ("uint8", "TYPE_UINT8"), 3: ("int8", "TYPE_INT8"),
              6: ("int32", "TYPE_INT32"), 7: ("int64", "TYPE_INT64"), 10: ("float16", "TYPE_FP16")}

PIXELS_NAME = "pixels"              # DeepStream graph input: float RGB 0..255, NCHW
PROBABILITIES_NAME = "probabilities"  # DeepStream graph output: softmax (nvinfer thresholds it)
EMBEDDING_NAME = "embedding"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, numpy dtype name and dims (-1 where symbolic)."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def triton_type(self) -> str:
        return next(t for d, t in ONNX_TYPES.values() if d == self.dtype)


def _spec(value_info) -> TensorSpec:
    tensor = value_info.type.tensor_type
    if tensor.elem_type not in ONNX_TYPES:
        raise ValueError(f"graph tensor '{value_info.name}' has ONNX type {tensor.elem_type}, which "
                         "a served classifier does not use")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value_info.name, ONNX_TYPES[tensor.elem_type][0], dims)


def io_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX file, initializers excluded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in weights]
    return inputs, [_spec(v) for v in model.graph.output]


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def add_embedding_output(src: Path, dst: Path, logits_name: str = "logits") -> int:
    """Copy `src` to `dst` with a second output `embedding` (N, D): the input of the classifier layer
    that makes the logits (z for the rise head, the pooled backbone feature h for linear and split
    heads, whose projection the exported graph never computes), traced back through Q/DQ pairs so an INT8 graph serves
    its float embedding. Returns D. A graph whose logits do not come from a Gemm or MatMul raises."""
    import onnx
    from onnx import helper, shape_inference

    model = onnx.load(str(src))
    producers = _producers(model.graph)
    node = producers.get(logits_name)
    if node is not None and node.op_type == "Add":  # MatMul + Add form of a linear layer
        node = next((producers[i] for i in node.input if i in producers
                     and producers[i].op_type == "MatMul"), node)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise ValueError(f"{src.name}: the logits are not made by a Gemm or MatMul layer, so there "
                         "is no classifier input to serve as the embedding")
    tensor = node.input[0]
    while tensor in producers and producers[tensor].op_type in ("DequantizeLinear", "QuantizeLinear"):
        tensor = producers[tensor].input[0]
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input]}
    dims = [d.dim_value for d in shapes[tensor].type.tensor_type.shape.dim] if tensor in shapes else []
    if len(dims) != 2 or not dims[1]:
        raise ValueError(f"{src.name}: the classifier input '{tensor}' has no (batch, D) shape")
    model.graph.node.append(helper.make_node("Identity", [tensor], [EMBEDDING_NAME],
                                             name="rise_edge_embedding"))
    model.graph.output.append(helper.make_tensor_value_info(
        EMBEDDING_NAME, onnx.TensorProto.FLOAT, [model.graph.input[0].type.tensor_type.shape.dim[0]
                                                 .dim_param or "batch", dims[1]]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return int(dims[1])


def fold_for_deepstream(src: Path, dst: Path, mean: Sequence[float], std: Sequence[float],
                        input_name: str = "images", logits_name: str = "logits") -> None:
    """Copy `src` (float NCHW normalised images -> logits) to `dst`: float NCHW pixels 0..255 ->
    softmax probabilities. Prepends pixels * 1/(255 std) - mean/std; appends Softmax over classes,
    because nvinfer's classifier thresholds the output as probabilities."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}] != \
            [input_name]:
        raise ValueError(f"{src.name}: expected one input '{input_name}'")
    std_a = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    mean_a = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    scale = (np.float32(1.0) / (np.float32(255.0) * std_a)).astype(np.float32)
    shift = (mean_a / std_a).astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(scale, "rise_edge_pixel_scale"),
                              numpy_helper.from_array(shift, "rise_edge_pixel_shift")])
    # The old input's name now names the normalised tensor the two new nodes make, so every
    # consumer of it is left as it was.
    scaled = "rise_edge_scaled_pixels"
    graph.node.insert(0, helper.make_node("Mul", [PIXELS_NAME, "rise_edge_pixel_scale"], [scaled],
                                          name="rise_edge_scale"))
    graph.node.insert(1, helper.make_node("Sub", [scaled, "rise_edge_pixel_shift"], [input_name],
                                          name="rise_edge_normalise"))
    old_input = graph.input[0]
    dims = old_input.type.tensor_type.shape.dim
    new_input = helper.make_tensor_value_info(
        PIXELS_NAME, onnx.TensorProto.FLOAT,
        [d.dim_param if d.dim_param else d.dim_value for d in dims])
    graph.input.remove(old_input)
    graph.input.insert(0, new_input)
    out = next(o for o in graph.output if o.name == logits_name)
    graph.node.append(helper.make_node("Softmax", [logits_name], [PROBABILITIES_NAME], axis=1,
                                       name="rise_edge_softmax"))
    out_dims = [d.dim_param if d.dim_param else d.dim_value for d in out.type.tensor_type.shape.dim]
    graph.output.remove(out)
    graph.output.insert(0, helper.make_tensor_value_info(PROBABILITIES_NAME, onnx.TensorProto.FLOAT,
                                                         out_dims))
    for prop in model.metadata_props:
        if prop.key == "rise_edge.input":
            prop.value = '"float32-nchw-pixels-0-255"'
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
