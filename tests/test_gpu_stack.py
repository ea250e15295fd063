"""The GPU-side packages that install without a GPU, run for real on the CPU (`pytest -m gpu_stack`
in .ci/run's venv with nvidia-modelopt[onnx], onnxruntime-gpu and torch-tensorrt's files): modelopt's
Q/DQ graph for TensorRT made from a tiny run, judged and benched on ONNX Runtime's CPU provider;
AutoCast FP16; onnxruntime-gpu listing CUDA and TensorRT providers on a machine with no GPU.

Elsewhere (the default venv, with onnxruntime and no modelopt) each test skips with its reason.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rise_edge.bench.driver import BenchConfig, bench_run
from rise_edge.config import ExportConfig
from rise_edge.export.driver import export_run
from rise_edge.export.judge import RULE
from rise_edge.run_dir import EXPORT_DIR

pytestmark = pytest.mark.gpu_stack


def _require_modelopt() -> None:
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("needs nvidia-modelopt[onnx] (the gpu_stack venv of .ci/run: "
                    "pip install 'nvidia-modelopt[onnx]' onnxruntime-gpu)")


def _require_onnxruntime_gpu() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (its CUDA provider is not listed by this onnxruntime)")
    if torch.cuda.is_available():
        pytest.skip("checks a machine where onnxruntime-gpu lists providers that cannot start: "
                    "this one has a GPU")


@pytest.fixture(scope="module")
def qdq_run(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny run exported with --format tensorrt --int8: modelopt's Q/DQ graph (the engines
    need a GPU and are recorded unavailable)."""
    _require_modelopt()
    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("gpu_stack") / "run"))
    result = export_run(run, ExportConfig(formats=("tensorrt",), int8=True, calibration_size=24),
                        progress=False)
    return run, result.artefacts


def test_modelopt_makes_a_qdq_graph_in_fp32_and_int8_only(qdq_run: tuple[Path, dict]) -> None:
    run, artefacts = qdq_run
    record = artefacts["onnx-int8-tensorrt"]
    assert record["status"] == "ok", record
    graph = onnx.load(str(run / EXPORT_DIR / record["path"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 2
    # high_precision_dtype='fp32' reached modelopt: no float16 anywhere, so the graph is INT8 + FP32
    # and its accuracy against FP32 measures INT8 alone.
    fp16 = onnx.TensorProto.FLOAT16
    assert not [t.name for t in graph.initializer if t.data_type == fp16]
    assert not [n.name for n in graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == fp16 for a in n.attribute)]
    # modelopt rewrites the file it is given: the FP32 artefact must still be the one recorded.
    from rise_edge.files import file_sha256

    fp32 = artefacts["onnx-fp32"]
    assert file_sha256(run / EXPORT_DIR / fp32["path"]) == fp32["sha256"]
    if not torch.cuda.is_available():  # the engine needs a GPU: recorded as such, never faked
        assert artefacts["tensorrt-int8"]["status"] == "unavailable"


def test_the_qdq_graph_is_judged_like_every_int8_artefact(qdq_run: tuple[Path, dict]) -> None:
    _, artefacts = qdq_run
    judged = artefacts["onnx-int8-tensorrt"]["accuracy_budget"]
    assert judged["judge"]["rule"] == RULE and judged["met"] in (True, False)
    assert 0 <= judged["judge"]["agreement_pct"] <= 100
    assert judged["stress"]["decides"] is False and "drop_points" in judged["stress"]
    assert "ONNX Runtime's CPU provider" in artefacts["onnx-int8-tensorrt"]["judged_as"]


def test_on_the_cpu_the_qdq_graph_is_computed_as_written(qdq_run: tuple[Path, dict]) -> None:
    """ONNX Runtime's fused x86 kernels add u8 x s8 pairs in a saturating int16 where the CPU has no
    VNNI; TensorRT sums in int32. Unfused, the graph is that exact arithmetic, which the judge and
    bench must score: equal to running it with every graph optimisation off."""
    import onnxruntime as ort

    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner

    run, artefacts = qdq_run
    path = run / EXPORT_DIR / artefacts["onnx-int8-tensorrt"]["path"]
    runner = OnnxRuntimeRunner(path, device="cpu")
    assert runner.qdq_as_written
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    expected = plain.run(None, {plain.get_inputs()[0].name: images})[0]
    assert np.array_equal(runner(images), expected)


def test_bench_scores_the_qdq_graph_on_every_domain_labelled_as_the_graph(
        qdq_run: tuple[Path, dict], tmp_path: Path) -> None:
    run = Path(shutil.copytree(qdq_run[0], tmp_path / "run"))
    report = bench_run(run, BenchConfig(domains=("all",), batch_sizes=(1,), warmup=1, iterations=3),
                       progress=False)
    rows = {r["engine"]: r for r in report.data["rows"]}
    qdq, fp32 = rows["onnx-int8-tensorrt"], rows["onnx-fp32"]
    assert qdq["status"] == "ok" and qdq["device"] == "cpu"
    assert qdq["backend"] == "onnxruntime (Q/DQ as written)"
    assert any("TensorRT INT8 Q/DQ graph" in w for w in qdq["warnings"])
    assert set(qdq["accuracy"]) == set(fp32["accuracy"])  # every domain, the unseen one included
    assert qdq["int8_judge"]["judged"] is True
    for name in ("tensorrt-int8", "tensorrt-fp32"):
        if name in rows:
            assert rows[name]["status"] != "ok"  # an engine needs a GPU: never stood in for


def test_autocast_fp16_keeps_fp32_io_and_runs(qdq_run: tuple[Path, dict], tmp_path: Path) -> None:
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
    from rise_edge.backends.tensorrt.build import autocast_fp16

    run, artefacts = qdq_run
    fp32_path = run / EXPORT_DIR / artefacts["onnx-fp32"]["path"]
    out = tmp_path / "fp16.onnx"
    autocast_fp16(fp32_path, out)
    model = onnx.load(str(out))
    elem = onnx.TensorProto
    assert model.graph.input[0].type.tensor_type.elem_type == elem.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == elem.FLOAT
    assert any(t.data_type == elem.FLOAT16 for t in model.graph.initializer)
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    reference = OnnxRuntimeRunner(fp32_path, device="cpu")(images)
    half = OnnxRuntimeRunner(out, device="cpu")(images)
    assert np.abs(half - reference).max() <= 0.05 * np.abs(reference).max() + 1e-3


def test_onnxruntime_gpu_without_a_gpu_runs_on_the_cpu_and_says_so(
        qdq_run: tuple[Path, dict]) -> None:
    """onnxruntime-gpu lists CUDA and TensorRT providers on a machine with no GPU; a session asked
    for them silently runs on the CPU. rise-edge must neither pick them nor report them."""
    _require_onnxruntime_gpu()
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
    from rise_edge.bench.plan import ort_has

    run, artefacts = qdq_run
    path = run / EXPORT_DIR / artefacts["onnx-fp32"]["path"]
    assert OnnxRuntimeRunner(path, device="auto").device == "cpu"
    asked = OnnxRuntimeRunner(path, device="cuda")
    assert asked.provider == "CPUExecutionProvider" and asked.device == "cpu"
    assert "CUDAExecutionProvider" in asked.fallback and "CPUExecutionProvider" in asked.fallback
    assert not ort_has("CUDAExecutionProvider") and not ort_has("TensorrtExecutionProvider")
    assert ort_has("CPUExecutionProvider")


def test_a_qdq_graph_exported_before_its_placement_was_recorded_is_made_again(
        qdq_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Reused as it was, a graph without `placed_for` would be judged and benched through the CPU
    kernels that saturate; export makes it again instead."""
    import json

    from rise_edge.backends.onnxruntime.runner import onnx_metadata
    from rise_edge.export.session import PLACED_FOR, placed_for, stamp_metadata
    from rise_edge.files import file_sha256

    run = Path(shutil.copytree(qdq_run[0], tmp_path / "run"))
    record_file = run / EXPORT_DIR / "export.json"
    document = json.loads(record_file.read_text())
    graph = run / EXPORT_DIR / document["artefacts"]["onnx-int8-tensorrt"]["path"]
    stamp_metadata(graph, {k: v for k, v in onnx_metadata(graph).items() if k != PLACED_FOR})
    document["artefacts"]["onnx-int8-tensorrt"]["sha256"] = file_sha256(graph)
    record_file.write_text(json.dumps(document))
    assert placed_for(graph) is None

    again = export_run(run, ExportConfig(formats=("tensorrt",), int8=True, calibration_size=24),
                       progress=False).artefacts["onnx-int8-tensorrt"]
    assert again["status"] == "ok" and not again.get("reused")
    assert placed_for(graph) == "tensorrt"
