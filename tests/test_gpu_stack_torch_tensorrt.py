"""Torch-TensorRT's installed files against what rise-edge passes it and what the mocks in
test_backends.py assume of it. The package is read with ast, never imported: importing it needs
TensorRT and a GPU, and the gpu_stack venv installs it with
`pip install --no-deps torch-tensorrt`."""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_backends import TORCH_TRT_RELEASES, TORCH_TRT_SAVE, TORCH_TRT_SETTINGS, TorchTRTRelease

from rise_edge.backends.torch_tensorrt import _compile_keywords, _precision_options, _save_keywords

pytestmark = pytest.mark.gpu_stack

_NOT_LITERAL = object()  # a default that is an expression ast.literal_eval cannot read


@dataclass(frozen=True)
class Installed:
    """The parts of the installed torch_tensorrt that rise-edge depends on, as parsed source."""

    root: Path
    version: str
    settings: dict[str, ast.expr | None]  # CompilationSettings field -> its default expression
    constants: dict[str, ast.expr]  # dynamo/_defaults.py's module-level names
    compile: ast.FunctionDef  # torch_tensorrt.compile
    save: ast.FunctionDef  # torch_tensorrt.save
    dynamo_compile: ast.FunctionDef  # torch_tensorrt.dynamo.compile

    def default(self, expr: ast.expr | None) -> Any:
        """A default's value, names looked up in _defaults.py; _NOT_LITERAL where it is code."""
        if isinstance(expr, ast.Name) and expr.id in self.constants:
            expr = self.constants[expr.id]
        try:
            return ast.literal_eval(expr) if expr is not None else _NOT_LITERAL
        except ValueError:
            return _NOT_LITERAL


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"no top-level def {name}"
    return found[-1]


def _settings_fields(tree: ast.Module) -> dict[str, ast.expr | None]:
    (cls,) = [n for n in tree.body
              if isinstance(n, ast.ClassDef) and n.name == "CompilationSettings"]
    return {n.target.id: n.value for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _constants(tree: ast.Module) -> dict[str, ast.expr]:
    out: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            out[node.target.id] = node.value
    return out


def _named_parameters(fn: ast.FunctionDef) -> dict[str, ast.expr | None]:
    """Parameters a caller can name, with their defaults (not **kwargs, which may drop one)."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    named = {a.arg: d for a, d in zip(positional, defaults)}
    named.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults)})
    return named


@pytest.fixture(scope="module")
def installed() -> Installed:
    spec = importlib.util.find_spec("torch_tensorrt")  # finds a top-level package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-tensorrt is not installed in this Python; the gpu_stack venv has it "
                    "(pip install --no-deps torch-tensorrt)")
    root = Path(next(iter(spec.submodule_search_locations)))
    version = _constants(_parse(root / "_version.py")).get("__version__", ast.Constant("?"))
    top, dynamo = _parse(root / "_compile.py"), _parse(root / "dynamo" / "_compiler.py")
    return Installed(root, str(version.value),
                     _settings_fields(_parse(root / "dynamo" / "_settings.py")),
                     _constants(_parse(root / "dynamo" / "_defaults.py")),
                     _function(top, "compile"), _function(top, "save"), _function(dynamo, "compile"))


def _release_of(installed: Installed) -> TorchTRTRelease:
    settings = {n for n in TORCH_TRT_SETTINGS if n in installed.settings}
    save = {n for n in TORCH_TRT_SAVE if n in _named_parameters(installed.save)}
    matches = [r for r in TORCH_TRT_RELEASES if set(r.settings) == settings and set(r.save) == save]
    assert matches, (f"torch-tensorrt {installed.version} (settings {sorted(settings)}, save "
                     f"{sorted(save)}) is none of the releases test_backends.py mocks")
    return matches[0]


def test_the_installed_release_is_one_the_mocks_model(installed: Installed) -> None:
    """The mocked settings, their defaults, save's keywords and the compilers' signatures."""
    release = _release_of(installed)
    for name, mocked in release.settings.items():
        real = installed.default(installed.settings[name])
        # enabled_precisions' default is {dtype.f32}, torch_tensorrt's own enum: not a literal.
        assert real is _NOT_LITERAL or real == mocked, (name, real, mocked)
    assert installed.default(_named_parameters(installed.save)["retrace"]) == release.retrace
    # The mocked dynamo.compile takes the inputs and the release's settings by name ...
    dynamo_parameters = _named_parameters(installed.dynamo_compile)
    assert {"inputs", *release.settings} <= set(dynamo_parameters), installed.version
    # ... and the mocked top-level compile hands it enabled_precisions only while that is a setting.
    handed = {k.arg for node in ast.walk(installed.compile) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "dynamo_compile"
              for k in node.keywords}
    assert ("enabled_precisions" in handed) == ("enabled_precisions" in release.settings)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_every_keyword_rise_edge_gives_the_dynamo_compiler_is_a_setting_it_takes(
        installed: Installed, precision: str) -> None:
    keywords, _ = _compile_keywords(installed.settings, precision, spec=object())
    parameters = _named_parameters(installed.dynamo_compile)
    assert list(parameters)[0] == "exported_program"  # rise-edge passes its program first
    for name in keywords:
        assert name in parameters, f"{name} is no parameter of dynamo.compile {installed.version}"
        assert name == "inputs" or name in installed.settings, \
            f"{name} is no CompilationSettings field"


def _attribute_readers(root: Path, name: str) -> list[str]:
    """The installed dynamo modules that read `<something>.name` (the settings consumers)."""
    readers = []
    for path in sorted((root / "dynamo").rglob("*.py")):
        if path.name == "_settings.py":
            continue
        if any(isinstance(n, ast.Attribute) and n.attr == name for n in ast.walk(_parse(path))):
            readers.append(str(path.relative_to(root)))
    return readers


def test_fp16_is_asked_for_through_settings_the_installed_release_reads(installed: Installed
                                                                         ) -> None:
    fp16, mode = _precision_options(installed.settings, "fp16")
    fp32, _ = _precision_options(installed.settings, "fp32")
    changed = {k: v for k, v in fp16.items() if k not in fp32 or fp32[k] != v}
    assert changed, "the fp16 and fp32 settings are the same"
    for name, value in changed.items():
        assert name in installed.settings, f"{name} is no CompilationSettings field"
        default = installed.default(installed.settings[name])
        assert default is _NOT_LITERAL or default != value, f"{name}={value!r} is the default"
        assert _attribute_readers(installed.root, name), f"nothing in dynamo/ reads {name}"
    if "autocast_low_precision_type" in changed:
        assert changed["autocast_low_precision_type"] is torch.float16 and fp16["enable_autocast"]
        # The installed compile accepts torch.float16 as the autocast type (it checks a set).
        accepted = [n for n in ast.walk(installed.dynamo_compile) if isinstance(n, ast.Set)
                    and any(ast.unparse(e) == "torch.float16" for e in n.elts)]
        assert accepted and "autocast" in mode
    else:
        assert torch.float16 in changed["enabled_precisions"] and "weak typing" in mode
        assert fp16.get("use_explicit_typing", installed.default(
            installed.settings.get("use_explicit_typing"))) in (False, _NOT_LITERAL)


def test_every_keyword_rise_edge_gives_save_is_a_parameter_of_the_installed_save(
        installed: Installed) -> None:
    parameters = _named_parameters(installed.save)
    keywords = _save_keywords(set(parameters), torch.zeros(2, 3, 8, 8), (1, 8, 32))
    for name in keywords:
        assert name in parameters, f"{name} is no parameter of save {installed.version}"
    if "dynamic_shapes" in keywords:  # they must reach a re-export
        passed_on = [n for n in ast.walk(installed.save) if isinstance(n, ast.Call) and any(
            k.arg == "dynamic_shapes" and ast.unparse(k.value) == "dynamic_shapes"
            for k in n.keywords)]
        assert passed_on, "save takes dynamic_shapes but passes them to no exporter"
    else:  # the legacy exporter, chosen by retrace=False
        assert keywords["retrace"] is False
        assert any(isinstance(n, ast.If) and "retrace" in ast.unparse(n.test)
                   for n in ast.walk(installed.save)), "save has no retrace=False path"
