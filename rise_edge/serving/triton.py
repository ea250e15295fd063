"""Triton Inference Server: one model folder per served artefact, its config.pbtxt written from the
graph's real I/O (names, data types, dims without the batch axis) and the export's batch profile.

    triton/<model>/config.pbtxt
    triton/<model>/labels.txt          class names, one a line (Triton's classification extension)
    triton/<model>/1/model.onnx        platform onnxruntime_onnx
    triton/<model>/1/model.plan        platform tensorrt_plan: written on the device by build_engine.sh

The text is written here rather than through Triton's protobuf so that packaging needs no Triton
package; the tests parse it with the ModelConfig protobuf that tritonclient ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rise_edge.serving.graphs import TensorSpec

LABELS_FILE = "labels.txt"
VERSION = "1"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# Longest a request waits for others to batch with: short, since a classifier's batch-1 latency is
# a few milliseconds; the preferred batch is the TensorRT profile's optimum.
MAX_QUEUE_DELAY_US = 500


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository: what it is called, runs on, and takes."""

    name: str
    runtime: str                  # "onnx" or "tensorrt" (PLATFORMS)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_profile: tuple[int, int, int]
    instance_kind: str            # KIND_CPU, KIND_GPU or KIND_AUTO

    @property
    def platform(self) -> str:
        return PLATFORMS[self.runtime][0]

    @property
    def filename(self) -> str:
        return PLATFORMS[self.runtime][1]


def _tensor(spec: TensorSpec, label: bool) -> str:
    if not spec.dims or spec.dims[0] != -1:
        raise ValueError(f"tensor '{spec.name}' has no dynamic batch axis (dims {list(spec.dims)}); "
                         "Triton's batching needs one")
    dims = ", ".join(str(d) for d in spec.dims[1:])
    extra = f'\n    label_filename: "{LABELS_FILE}"' if label else ""
    return (f'  {{\n    name: "{spec.name}"\n    data_type: {spec.triton_type}\n'
            f"    dims: [ {dims} ]{extra}\n  }}")


def config_pbtxt(model: TritonModel, logits_name: str = "logits") -> str:
    """The model's config.pbtxt: max_batch_size and dynamic batching from the batch profile (min,
    opt, max): requests are batched up to max, preferring opt; the logits carry the label file."""
    low, opt, high = model.batch_profile
    preferred = sorted({b for b in (opt, high) if low <= b <= high})
    inputs = ",\n".join(_tensor(s, False) for s in model.inputs)
    outputs = ",\n".join(_tensor(s, s.name == logits_name) for s in model.outputs)
    return (f'name: "{model.name}"\nplatform: "{model.platform}"\nmax_batch_size: {high}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: {model.instance_kind}\n  }}\n]\n"
            f'version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n')


def label_problem(name: str) -> str | None:
    """Why class `name` cannot be a line of Triton's label file (None when it can): Triton reads
    one label a line, in logit order, so a name that breaks the line shifts every later class."""
    if name.splitlines() != [name]:
        return ("holds a line break, and Triton's labels.txt holds one class a line (the classes "
                "after it would name the wrong logits)")
    return None


def labels_text(classes: Sequence[str]) -> str:
    """Triton's label file: one class a line, in logit order."""
    bad = [c for c in classes if label_problem(c)]
    if bad:  # package_run refuses such classes before writing anything; never write a wrong file
        raise ValueError(f"class name {bad[0]!r} {label_problem(bad[0])}")
    return "".join(f"{c}\n" for c in classes)
