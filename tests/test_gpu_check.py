"""benchmarks/gpu_check.py is the one script a lent GPU runs first: its code path is exercised here on
the CPU at tiny sizes, so a lease is never spent on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rise_edge.backends.base import Runner

REPO = Path(__file__).resolve().parents[1]


# The sections a CPU dry run must skip, each with a reason naming what it lacks.
NEEDS_CUDA = ("Torch-TensorRT FP16 program", "TensorRT FP16 and INT8 engines")


@pytest.mark.slow
def test_gpu_check_runs_its_sections_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--skip-tests", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    printed = [line for line in done.stderr.splitlines() if line.startswith("[gpu_check] ")]
    # one line per section, "[gpu_check] <section>: <status>" (section names hold colons too)
    lines = {name: line[len(f"[gpu_check] {name}: "):] for name in report["sections"]
             for line in printed if line.startswith(f"[gpu_check] {name}: ")}
    assert len(printed) == len(lines) == len(report["sections"]), (printed, list(report["sections"]))
    for name, section in report["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("traceback"))
        assert section["result"], name
        if name.startswith(NEEDS_CUDA):
            assert lines[name].startswith("skipped: ") and "CUDA" in lines[name], (name, lines[name])
        else:
            assert lines[name] == "ok", (name, lines[name])
    assert "| resnet18 | rise |" in (tmp_path / "gpu_check_quick.md").read_text()

    # QAT: rise-edge's own fine-tuning ran its steps, every fake-quant op on the checked device
    qat = next(s["result"] for n, s in report["sections"].items() if n.startswith("QAT"))
    calls = qat["fine_tuning"]["fake_quant_calls"]
    assert calls and all(k.endswith(" on cpu") for k in calls), calls
    assert [h["step"] for h in qat["fine_tuning"]["history"]] == [0, 2, 4]
    # bench: the CPU INT8 graph ran on the CPU provider, and every row says where it ran
    bench = next(s["result"] for n, s in report["sections"].items() if n.startswith("bench"))
    rows = {r["engine"]: r for r in bench["rows"]}
    assert (rows["onnx-int8"]["backend"], rows["onnx-int8"]["device"]) == ("onnxruntime", "cpu")
    assert all(r["status"] == "ok" and r["device"] for r in rows.values()), rows


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jpeg_decoding_section_on_the_cpu() -> None:
    """The decoders' section on a few files: PIL and torchvision's CPU decoder, no nvjpeg row."""
    rows = _gpu_check_module().jpeg_decoding(torch.device("cpu"), 4, 32)
    assert [r["decoder"] for r in rows] == ["PIL, one thread", "torchvision decode_jpeg, CPU"]
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.gpu
def test_nvjpeg_decodes_what_the_cpu_decodes() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; PyTorch sees none on this machine")
    rows = _gpu_check_module().jpeg_decoding(torch.device("cuda"), 16, 224, batch=8)
    nvjpeg = rows[-1]
    assert nvjpeg["decoder"].startswith("torchvision decode_jpeg, nvjpeg") and nvjpeg["images_per_s"] > 0
    # the same pixels up to the IDCT's rounding (torchvision's own test: mean difference under 2)
    assert nvjpeg["mean_abs_diff_vs_cpu"] < 2


def test_a_failed_check_keeps_its_measurements_and_a_skip_says_why(capsys: pytest.CaptureFixture
                                                                    ) -> None:
    """One line per section: ok, skipped with the reason, or the failure; a section whose checks
    failed still reports what it measured."""
    module = _gpu_check_module()
    sections: dict = {}

    def failing() -> dict:
        raise module.CheckFailed("batch 1 did not run", {"batches": {1: {"ran": False}}})

    module._fenced("measured", sections, lambda: {"established": ["x"]})
    module._fenced("skipped", sections, lambda: {"skipped": "no CUDA device"})
    module._fenced("checked", sections, failing)
    module._fenced("broken", sections, lambda: 1 / 0)
    assert capsys.readouterr().err.splitlines() == [
        "[gpu_check] measured: ok", "[gpu_check] skipped: skipped: no CUDA device",
        "[gpu_check] checked: check failed: batch 1 did not run",
        "[gpu_check] broken: ZeroDivisionError: division by zero"]
    assert sections["checked"]["result"] == {"batches": {1: {"ran": False}}}
    text = module.to_markdown({"command": "c", "environment": {
        "torch": "t", "cuda": None, "tensorrt": None, "onnxruntime_providers": []},
        "sections": sections})
    assert "FAILED: check failed: batch 1 did not run" in text and '"ran": false' in text
    assert "skipped: no CUDA device" in text and "- x" in text


class _RuntimeModule(torch.nn.Module):
    """Stands for Torch-TensorRT's TorchTensorRTModule: a submodule with get_layer_info()."""

    def __init__(self, info: str) -> None:
        super().__init__()
        self.info = info

    def get_layer_info(self) -> str:
        return self.info


class _Engine:
    """Stands for the torch.classes.tensorrt.Engine an ExportedProgram holds as an attribute."""

    def __init__(self, info: str) -> None:
        self.info = info

    def get_engine_layer_info(self) -> str:
        return self.info


def test_layer_precisions_read_back_from_either_form_of_a_program() -> None:
    """Both places torch_tensorrt keeps an engine are read, and TensorRT's two kinds of layer
    information: output formats (DETAILED) are counted by type; names alone (LAYER_NAMES_ONLY,
    Torch-TensorRT's default) only show the casts the FP16 autocast inserts."""
    module = _gpu_check_module()
    detailed = json.dumps({"Layers": [
        {"Name": "conv1 + relu", "Outputs": [{"Format/Datatype": "Channel major FP16 format where "
                                                                  "channel % 8 == 0"}]},
        {"Name": "fc", "Outputs": [{"Format/Datatype": "Row major linear FP32 format"}]}],
        "Bindings": ["x", "output0"]})
    names_only = json.dumps({"Layers": ["[CAST]-[aten_ops._to_copy.default]-[x_cast]", "conv1",
                                        "fc"], "Bindings": ["x", "output0"]})
    program = torch.nn.Module()
    program.add_module("_run_on_acc_0", _RuntimeModule(detailed))
    program._run_on_acc_1_engine = _Engine(names_only)
    infos, where = module._engine_layer_infos(program)
    assert sorted(infos) == sorted([detailed, names_only])
    assert where == "_Engine.get_engine_layer_info(), _RuntimeModule.get_layer_info()"
    read = module._layer_precisions(infos)
    assert read["engines"] == 2 and read["output_dtypes"] == {"fp16": 1, "fp32": 1}
    assert (read["layers_named_only"], read["cast_layer_names"]) == (3, 1)
    assert module._engine_layer_infos(torch.nn.Linear(2, 2)) == ([], "")


def test_bench_rows_are_expected_where_their_targets_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where each bench row must run: CPU INT8 graphs on the CPU provider whatever is installed, the
    TensorRT Q/DQ graph on ONNX Runtime's TensorRT provider only where it can start."""
    module = _gpu_check_module()
    gpu_ort = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_int8 = {"format": "onnx", "target": "onnxruntime-cpu"}
    qdq = {"format": "onnx", "target": "tensorrt"}
    fp32 = {"format": "onnx", "target": "any ONNX runtime"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert module._expected_placement(cpu_int8, gpu_ort) == ("onnxruntime", "cpu")
    assert module._expected_placement(qdq, gpu_ort) == ("onnxruntime-trt", "cuda")
    assert module._expected_placement(fp32, gpu_ort) == ("onnxruntime-cuda", "cuda")
    assert module._expected_placement(qdq, gpu_ort[1:]) == ("onnxruntime (Q/DQ as written)", "cpu")
    assert module._expected_placement({"format": "tensorrt"}, gpu_ort) == ("tensorrt", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module._expected_placement(qdq, gpu_ort) == ("onnxruntime (Q/DQ as written)", "cpu")
    assert module._expected_placement({"format": "pytorch"}, gpu_ort) == ("pytorch", "cpu")


# The GPU-only sections' own logic, on the CPU: rise-edge's export, run and runner are replaced by
# stand-ins that answer as a GPU machine's would, so a lease is never spent on a mistake in them.

class _Logits(Runner):
    """A runner standing for a loaded program: the student's logits, optionally rounded through
    FP16, failing at the batches in `fails`, with a program module holding one engine."""

    def __init__(self, student: torch.nn.Module, *, fp16: bool = True, fails: tuple[int, ...] = (),
                 classes: int | None = None) -> None:
        self.student, self.fp16, self.fails, self.classes = student, fp16, fails, classes
        self.module = torch.nn.Module()
        self.module._run_on_acc_0_engine = _Engine(json.dumps({"Layers": ["[CAST]-x_cast", "conv"]}))

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        if images.shape[0] in self.fails:
            raise RuntimeError(f"batch {images.shape[0]} is outside the program's range")
        return torch.from_numpy(images)

    def run_staged(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.student(staged)
        if self.classes is not None:
            return torch.zeros(staged.shape[0], self.classes)
        return logits.half().float() if self.fp16 else logits


def _stand_ins(monkeypatch: pytest.MonkeyPatch, records: dict, runner: _Logits) -> Any:
    """The module with rise-edge's export, run and runner replaced, and the CUDA skip lifted."""
    import types

    import rise_edge.backend_table
    import rise_edge.export.driver
    import rise_edge.run_dir

    module = _gpu_check_module()
    run = types.SimpleNamespace(student=runner.student,
                                meta=types.SimpleNamespace(classes=["a", "b", "c"]))
    monkeypatch.setattr(module, "_cuda_skip", lambda *args: None)
    monkeypatch.setattr(rise_edge.export.driver, "export_run",
                        lambda run_dir, cfg, progress: types.SimpleNamespace(artefacts=records))
    monkeypatch.setattr(rise_edge.run_dir, "open_run", lambda run_dir: run)
    monkeypatch.setattr(rise_edge.backend_table, "runner_for", lambda record, base, device: runner)
    return module


class _NoTraining:
    def path(self) -> Path:
        return Path("run")


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()


TORCH_TRT_RECORD = {"torch-tensorrt-fp16": {
    "status": "ok", "precision_mode": "explicit typing, rule-based autocast to fp16",
    "torch_tensorrt": "2.x", "batch_profile": [1, 8, 32], "parity": {"max_abs_logit_diff": 0.01}}}


def test_torch_tensorrt_section_establishes_batch_and_precision(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    module = _stand_ins(monkeypatch, TORCH_TRT_RECORD, _Logits(_student()))
    out = module.torch_tensorrt_fp16(torch.device("cuda"), _NoTraining())
    assert [out["batches"][b]["shape"] for b in (1, 8, 32)] == [[1, 3], [8, 3], [32, 3]]
    assert all(1e-5 < out["batches"][b]["max_relative_difference"] < 1e-2 for b in (1, 8, 32))
    said = "\n".join(out["established"])
    assert "dynamic batch: established" in said and "reduced precision: established" in said
    assert "layer precisions: not established: the engine records layer names only" in said
    assert "1 of 2 layer names name a cast" in said


@pytest.mark.parametrize("runner_kw, failure", [
    ({"fails": (1,)}, "batch 1 did not run"),        # the saved program lost its dynamic batch
    ({"fp16": False}, "differs from FP32 by only"),  # FP16 asked for, FP32 computed
])
def test_torch_tensorrt_section_fails_what_it_cannot_establish(
        monkeypatch: pytest.MonkeyPatch, runner_kw: dict, failure: str) -> None:
    module = _stand_ins(monkeypatch, TORCH_TRT_RECORD, _Logits(_student(), **runner_kw))
    with pytest.raises(module.CheckFailed, match=failure) as raised:
        module.torch_tensorrt_fp16(torch.device("cuda"), _NoTraining())
    assert raised.value.result["batches"]  # what it measured is still reported


def _engine_records(int8_status: str = "ok") -> dict:
    judge = {"met": True, "judge": {"met": True, "drop_points": 0.0, "drop_upper95": 2.5}}
    return {"onnx-int8-tensorrt": {"status": "unavailable", "reason": "no nvidia-modelopt"},
            "tensorrt-fp16": {"status": "ok", "precision": "fp16", "built_from": "BuilderFlag.FP16",
                              "parity": {"max_abs_logit_diff": 0.002}},
            "tensorrt-int8": {"status": int8_status, "precision": "int8",
                              "built_from": "legacy IInt8EntropyCalibrator2", "reason": None,
                              "parity": {"max_abs_logit_diff": 0.1}, "accuracy_budget": judge}}


def test_tensorrt_section_reports_each_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _stand_ins(monkeypatch, _engine_records(), _Logits(_student()))
    out = module.tensorrt_engines(torch.device("cuda"), _NoTraining(), iterations=2)
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        assert [out[name][f"batch{b}"]["shape"] for b in (1, 8, 32)] == [[1, 3], [8, 3], [32, 3]]
        assert "p50_ms" in out[name]["batch1"] and "p50_ms" in out[name]["batch32"]
        assert "p50_ms" not in out[name]["batch8"]
    assert out["tensorrt-int8"]["judge"]["judged"] and out["tensorrt-int8"]["judge"]["met"]
    said = "\n".join(out["established"])
    assert "onnx-int8-tensorrt (the Q/DQ graph" in said and "unavailable: no nvidia-modelopt" in said
    assert "tensorrt-int8: ok, built from legacy IInt8EntropyCalibrator2, ran at batch 1, 8, 32" in said
    assert "INT8 judge: budget met" in said


def test_tensorrt_section_fails_a_wrong_shape_or_a_failed_engine(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    module = _stand_ins(monkeypatch, _engine_records("failed"), _Logits(_student(), classes=5))
    with pytest.raises(module.CheckFailed) as raised:
        module.tensorrt_engines(torch.device("cuda"), _NoTraining(), iterations=2)
    assert "tensorrt-fp16 gave [1, 5] at batch 1, not [1, 3]" in str(raised.value)
    assert "tensorrt-int8 failed" in str(raised.value)
