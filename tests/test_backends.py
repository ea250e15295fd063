"""Every backend in the registry, the same way (as DomainBed's tests loop over its algorithms): the
table is consistent, and every backend this machine can run passes the same export and bench checks.
Plus the rule the registry exists for: a backend's name nowhere but in its own module (the import
rules are in test_layout.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rise_edge.backend_table import artefacts, backends, register_backend, runner_for
from rise_edge.backends.pytorch import TorchRunner
from rise_edge.cli import main
from rise_edge.export.judge import RULE
from rise_edge.config import ExportConfig
from rise_edge.export.driver import export_run, plan_artefacts
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON

PACKAGE = Path(__file__).parents[1] / "rise_edge"
EXPORTABLE = [fmt for fmt, b in backends().items() if b.exportable]


def test_the_table_is_consistent() -> None:
    table, names = backends(), artefacts()
    assert list(table)[0] == "pytorch" and not table["pytorch"].exportable
    for name, artefact in names.items():
        assert artefact.runs_on in table, name
        assert all(need in names for need in artefact.needs), name
        assert Path(artefact.filename).name == artefact.filename  # a plain file in export/
    filenames = [a.filename for a in names.values()]
    assert len(filenames) == len(set(filenames))
    every = ExportConfig(formats=("all",), int8=True, fp16=True, fold_preprocessing=True, qat="on")
    for backend in table.values():
        planned = backend.plan(every)
        assert set(planned) <= set(names), backend.format
    plan = plan_artefacts(every)
    assert plan[0] == "onnx-fp32" and len(plan) == len(set(plan))
    for i, name in enumerate(plan):  # prerequisites first
        assert all(need in plan[:i] for need in names[name].needs), name
    with pytest.raises(ValueError, match="already registered"):
        register_backend(table["onnx"])


@pytest.mark.parametrize("fmt", EXPORTABLE)
@pytest.mark.slow
def test_every_backend_this_machine_runs_exports_and_benches_the_same_way(fmt: str,
                                                                         tiny_run: Path) -> None:
    backend = backends()[fmt]
    reason = backend.unavailable()
    if reason is not None or "cpu" not in backend.devices:
        pytest.skip(f"{fmt} cannot run on this machine's CPU: {reason or 'a GPU backend'}")
    cfg = ExportConfig(formats=(fmt,), int8=True, calibration_size=24, fidelity_images=24)
    result = export_run(tiny_run, cfg, progress=False)
    own = [n for n in result.attempted if artefacts()[n].runs_on == fmt]
    assert own, f"{fmt} planned no artefact of its own"
    records = json.loads((tiny_run / EXPORT_DIR / EXPORT_JSON).read_text())["artefacts"]
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    reference = TorchRunner(tiny_run, device="cpu")(images)
    for name in own:
        record = records[name]
        assert record["status"] == "ok", (name, record.get("reason"))
        folder = tiny_run / EXPORT_DIR
        for file, sha in {record["path"]: record["sha256"], **record.get("files", {})}.items():
            assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == sha, file
        assert record["parity"]["top1_agreement"] >= 0.75, name
        logits = runner_for(record, folder, device="cpu")(images)
        assert logits.shape == reference.shape
        if record["precision"] == "fp32":
            np.testing.assert_allclose(logits, reference, atol=1e-3)
        if record["precision"] == "int8":  # judged by the same judge as every INT8 artefact
            assert record["accuracy_budget"]["fidelity"]["worst_drop_points"] is not None
            assert record["accuracy_budget"]["judge"]["rule"] == RULE
    bench = CliRunner().invoke(main, ["bench", str(tiny_run), "--engines", backend.name, "--domain",
                                      "all", "--iterations", "2", "--warmup", "1", "--quiet"])
    assert bench.exit_code == 0, bench.output
    report = json.loads((tiny_run / "bench" / "report.json").read_text())
    rows = {r["engine"]: r for r in report["rows"]}
    for name in own:
        assert rows[name]["status"] == "ok" and rows[name]["backend"] == backend.name
        assert all(a["top1"] is not None for a in rows[name]["accuracy"].values())


@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_a_backend_that_cannot_run_here_says_why_in_one_sentence(fmt: str) -> None:
    reason = backends()[fmt].unavailable()
    if reason is None:
        pytest.skip(f"{fmt} runs here")
    assert reason.endswith(".") and "install" in reason


def test_the_backend_added_through_the_registry_is_named_only_in_its_module() -> None:
    """OpenVINO came after the registry: one module plus its registration line, nothing else."""
    module = PACKAGE / "backends" / "openvino.py"
    elsewhere = [p for p in PACKAGE.rglob("*.py") if p != module and p.name != "backend_table.py"
                 and any(w in p.read_text().lower() for w in ("openvino", "nncf"))]
    assert elsewhere == []
    assert (PACKAGE / "backend_table.py").read_text().lower().count("openvino") == 1


def test_plugins_register_data_sets_teachers_and_commands(monkeypatch) -> None:
    """An entry point in the rise_edge.plugins group is called once; what it registers is used."""
    import click

    import rise_edge.plugins as plugins
    from rise_edge.data.domains import KNOWN_DATASETS, KnownDataset, known_dataset

    calls = []

    def register() -> None:
        from rise_edge.cli import register_command
        from rise_edge.data.domains import register_dataset

        calls.append(1)
        register_dataset("MyCameras", KnownDataset("my_cameras", ("day", "night"), ("car", "person")))

        @click.command("hello-plugin")
        def hello() -> None:
            click.echo("hello from a plugin")
        register_command(hello)

    class Entry:
        name, value = "mine", "my_package:register"

        def load(self):
            return register

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Entry()])
    monkeypatch.delitem(KNOWN_DATASETS, "MyCameras", raising=False)
    assert known_dataset("my_cameras").domains == ("day", "night")
    assert CliRunner().invoke(main, ["hello-plugin"]).output.strip() == "hello from a plugin"
    assert calls == [1]
    monkeypatch.delitem(KNOWN_DATASETS, "MyCameras")
    main.commands.pop("hello-plugin")


def test_a_broken_plugin_is_one_line(monkeypatch) -> None:
    import rise_edge.plugins as plugins

    class Entry:
        name, value = "broken", "broken_package:register"

        def load(self):
            raise ImportError("No module named 'broken_package'")

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Entry()])
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "plugin 'broken'" in result.output and "fix or uninstall it" in result.output


def test_python_m_rise_edge_cli_has_the_plugins_commands() -> None:
    """`python -m rise_edge.cli demo` once said 'No such command': the plugin registered on the
    imported module while the run used the __main__ copy."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "rise_edge.cli", "demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "demo world" in result.stdout


class TorchTRTRelease(NamedTuple):
    """What the Torch-TensorRT mocks below assume of a family of releases, read from their wheels;
    tests/test_gpu_stack_torch_tensorrt.py checks that the installed release is one of them."""

    releases: str
    settings: dict[str, Any]  # its CompilationSettings fields named in TORCH_TRT_SETTINGS, defaults
    save: tuple[str, ...]  # its torch_tensorrt.save keyword parameters named in TORCH_TRT_SAVE
    retrace: bool  # save's default for retrace


# The names rise-edge's choices depend on: the precision settings and save's re-export keywords.
TORCH_TRT_SETTINGS = ("enabled_precisions", "use_explicit_typing", "enable_autocast",
                      "autocast_low_precision_type")
TORCH_TRT_SAVE = ("output_format", "inputs", "arg_inputs", "retrace", "dynamic_shapes")
_WEAK = {"enabled_precisions": {torch.float32}}
_AUTOCAST = {"enable_autocast": False, "autocast_low_precision_type": None}
_SAVE_2_4 = ("output_format", "inputs", "retrace")
_SAVE_2_5 = ("output_format", "inputs", "arg_inputs", "retrace")
TORCH_TRT_RELEASES = (
    TorchTRTRelease("2.4", _WEAK, _SAVE_2_4, False),
    TorchTRTRelease("2.5", _WEAK, _SAVE_2_5, False),
    TorchTRTRelease("2.6-2.9", {**_WEAK, "use_explicit_typing": False}, _SAVE_2_5, False),
    TorchTRTRelease("2.10", {**_WEAK, "use_explicit_typing": True, **_AUTOCAST}, _SAVE_2_5, True),
    TorchTRTRelease("2.11-2.12", {**_WEAK, "use_explicit_typing": True, **_AUTOCAST},
                    TORCH_TRT_SAVE, True),
    TorchTRTRelease("2.13-2.14", _AUTOCAST, TORCH_TRT_SAVE, True),
)


def _fake_torch_tensorrt(monkeypatch, release: TorchTRTRelease) -> SimpleNamespace:
    """torch_tensorrt as `release` has it, as far as rise-edge uses it, recording what it is given.
    No GPU here: CUDA placements stay on the CPU."""
    import copy
    import dataclasses
    import inspect
    import sys
    import types

    calls = SimpleNamespace()
    settings = dataclasses.make_dataclass("CompilationSettings", [
        (name, Any, dataclasses.field(default_factory=lambda v=value: copy.copy(v)))
        for name, value in release.settings.items()])

    def dynamo_compile(exported_program: Any, inputs: Any = None, **kwargs: Any) -> str:
        # As the real one: settings from the keywords it knows; the rest dropped without a word.
        calls.program, calls.inputs = exported_program, inputs
        calls.settings = settings(**{k: v for k, v in kwargs.items() if k in release.settings})
        return "compiled graph"

    def compile(module: Any, ir: str = "default", inputs: Any = None,
                enabled_precisions: Any = None, **kwargs: Any) -> str:
        # The top-level compile forwards enabled_precisions only while it is a setting (to 2.12).
        if enabled_precisions is not None and "enabled_precisions" in release.settings:
            kwargs["enabled_precisions"] = enabled_precisions
        return dynamo_compile(module, inputs, **kwargs)

    def save(module: Any, file_path: str, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(release.save))
        if unknown:
            raise TypeError(f"save() got unexpected keyword arguments {unknown}")
        calls.save = kwargs

    parameter = inspect.Parameter
    save.__signature__ = inspect.Signature(
        [parameter(n, parameter.POSITIONAL_OR_KEYWORD) for n in ("module", "file_path")]
        + [parameter(n, parameter.KEYWORD_ONLY, default=None) for n in release.save])
    package, dynamo = types.ModuleType("torch_tensorrt"), types.ModuleType("torch_tensorrt.dynamo")
    settings_module = types.ModuleType("torch_tensorrt.dynamo._settings")
    settings_module.CompilationSettings = dynamo.CompilationSettings = settings
    dynamo.compile, dynamo._settings = dynamo_compile, settings_module
    package.Input = lambda **shapes: SimpleNamespace(**shapes)
    package.compile, package.save, package.dynamo = compile, save, dynamo
    package.__version__ = "fake"
    for module in (package, dynamo, settings_module):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, **kw: randn(
        *size, device="cpu" if str(device).startswith("cuda") else device, **kw))
    return calls


def _compile_for_torch_tensorrt(tmp_path: Path, precision: str, batch_profile: tuple[int, int, int],
                                model: torch.nn.Module | None = None, size: int = 16) -> None:
    from rise_edge.backends.torch_tensorrt import compile_torch_tensorrt

    model = model or torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                         torch.nn.Linear(4, 3))
    compile_torch_tensorrt(model, tmp_path / "model.ep", precision=precision, input_size=size,
                           batch_profile=batch_profile)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("release", TORCH_TRT_RELEASES, ids=lambda r: r.releases)
def test_torch_tensorrt_fp16_reaches_the_settings_that_make_fp16(release, precision, monkeypatch,
                                                                 tmp_path) -> None:
    """From 2.10 explicit typing is the default and enabled_precisions alone leaves the model FP32;
    the keywords the dynamo compiler does not know it drops. FP16 must arrive as settings: autocast
    to float16, or (before autocast) weak typing with float16 among enabled_precisions."""
    calls = _fake_torch_tensorrt(monkeypatch, release)
    _compile_for_torch_tensorrt(tmp_path, precision, (1, 8, 32))
    got = calls.settings
    autocast = getattr(got, "enable_autocast", False) and \
        getattr(got, "autocast_low_precision_type", None) == torch.float16
    weak = torch.float16 in getattr(got, "enabled_precisions", ()) and \
        not getattr(got, "use_explicit_typing", False)
    assert (autocast or weak) == (precision == "fp16"), got


@pytest.mark.parametrize("release", TORCH_TRT_RELEASES, ids=lambda r: r.releases)
def test_the_torch_tensorrt_program_is_saved_with_the_profiles_batch_range(release, monkeypatch,
                                                                          tmp_path) -> None:
    """Re-exported from one example tensor (save's default from 2.10), the program took only the
    example's batch: export checks 32 images, bench batches 1 and 32."""
    calls = _fake_torch_tensorrt(monkeypatch, release)
    _compile_for_torch_tensorrt(tmp_path, "fp16", (1, 8, 32))
    saved = calls.save
    assert saved["output_format"] == "exported_program"
    if "dynamic_shapes" in release.save:  # 2.11 on: the re-export is given the range
        assert saved.get("dynamic_shapes"), f"no dynamic_shapes among {sorted(saved)}"
        (dims,) = saved["dynamic_shapes"]
        assert (dims[0].min, dims[0].max) == (1, 32)
        assert saved.get("retrace", release.retrace)
        (example,) = saved["arg_inputs"]
        assert 1 < example.shape[0] <= 32  # a batch of 1 would be traced as the constant 1
    else:  # no range to give: the legacy exporter keeps the compiled graph's symbolic batch
        assert saved.get("retrace", release.retrace) is False, f"retrace, of {sorted(saved)}"


@pytest.mark.parametrize("batch_profile", [(1, 8, 32), (1, 1, 4)])
def test_the_program_handed_to_torch_tensorrt_takes_every_batch_of_the_profile(batch_profile,
                                                                              monkeypatch,
                                                                              tmp_path) -> None:
    """The ExportedProgram rise-edge compiles, run on the CPU at the profile's min, 4 and max."""
    from rise_edge.config import StudentConfig
    from rise_edge.train.student import build_student

    calls = _fake_torch_tensorrt(monkeypatch, TORCH_TRT_RELEASES[-1])
    student, _ = build_student(StudentConfig(model="test_resnet", image_size=32), "linear", 3, None)
    student.eval()
    _compile_for_torch_tensorrt(tmp_path, "fp32", batch_profile, model=student, size=32)
    assert isinstance(calls.program, torch.export.ExportedProgram), type(calls.program)
    program = calls.program.module()
    low, _, high = batch_profile
    for batch in sorted({low, min(4, high), high}):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program(images), student(images), rtol=1e-4, atol=1e-4)
    spec = calls.inputs[0]
    assert (spec.min_shape[0], spec.opt_shape[0], spec.max_shape[0]) == batch_profile


def test_a_timed_tensorrt_run_is_the_enqueue_alone(monkeypatch) -> None:
    """Binding shapes and addresses is host work done when a batch is staged: run_staged, the part
    bench times with CUDA events, only enqueues (and binds again only for another staged batch)."""
    import types

    from rise_edge.backends.tensorrt import TensorRTRunner

    calls: list[str] = []
    context = types.SimpleNamespace(
        set_input_shape=lambda *a: calls.append("shape"),
        set_tensor_address=lambda *a: calls.append("address"),
        execute_async_v3=lambda stream: calls.append("enqueue") or True)
    runner = object.__new__(TensorRTRunner)
    runner.context, runner.input_name, runner.output_name, runner.path = context, "images", "logits", "x"
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))
    staged = (torch.zeros(2, 3), torch.zeros(2, 4))
    runner._bind(*staged)
    calls.clear()
    for _ in range(3):
        runner.run_staged(staged)
    assert calls == ["enqueue"] * 3
    runner.run_staged((torch.zeros(4, 3), torch.zeros(4, 4)))  # another batch: bound first
    assert calls[3:] == ["shape", "address", "address", "enqueue"]


def test_an_openvino_model_with_every_layer_reverted_to_fp32_counts_no_quantizers(tmp_path: Path
                                                                                  ) -> None:
    """NNCF's accuracy control can revert every layer; this count is how export tells such a model
    (FP32) from an INT8 one before it could ship it as the INT8 artefact."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (extra: openvino)")
    nncf = pytest.importorskip("nncf", reason="NNCF is not installed (extra: openvino)")
    from rise_edge.backends.openvino import quantizer_count

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(onnx_path), dynamo=False)
    fp32 = ov.convert_model(str(onnx_path))
    images = np.random.default_rng(0).normal(size=(8, 1, 3, 16, 16)).astype(np.float32)
    int8 = nncf.quantize(fp32, nncf.Dataset(list(images)), subset_size=8)
    assert quantizer_count(fp32) == 0
    assert quantizer_count(int8) > 0
