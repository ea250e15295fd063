"""The backends: one module (or subpackage) per deployable format, each holding all of it.

    base.py            what every runner shares (images -> logits, staged runs for timing)
    latency.py         timing a runner: the clocks bench reports and the INT8 budget compares with
    pytorch.py         the PyTorch reference (bench's first row; not exported)
    onnxruntime/       ONNX Runtime: the FP32/INT8 makers, its runner, its INT8 quantizer and budget
    tensorrt/          TensorRT: the makers and runner, and the engine build
    torch_tensorrt.py  Torch-TensorRT: the compile step and its runner

Each module defines `BACKEND`; the table of them is rise_edge.backend_table (names re-exported
here, where plugins have always found `register_backend`).
"""

from rise_edge.backend_table import (BUILT_IN, Artefact, Backend, artefacts, backend_for_engine,
                                     backends, export_formats, plan_formats, register_backend,
                                     runner_for, why_unavailable)

__all__ = ["BUILT_IN", "Artefact", "Backend", "artefacts", "backend_for_engine", "backends",
           "export_formats", "plan_formats", "register_backend", "runner_for", "why_unavailable"]
