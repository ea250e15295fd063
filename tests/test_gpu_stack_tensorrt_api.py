"""Every TensorRT Python name and trtexec flag rise-edge uses, checked against what NVIDIA documents
for each TensorRT release it supports, without TensorRT (its PyPI package cannot be installed here).

The Python side is read with ast, never imported: the collector follows which TensorRT object each
name is used on (builder, config, engine, context...) and which releases its code path runs on
(`tensorrt_major()` comparisons, `hasattr` guards, and flags a guarded caller passes down).
build_engine.sh is run with a fake trtexec reporting each release of the table in turn, and every
flag it is given must be one that release's trtexec parses.
"""

from __future__ import annotations

import ast
import operator
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu_stack

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "rise_edge"
BUILD_SCRIPT = PACKAGE / "serving" / "build_engine.sh"

Release = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------------
# The table: what NVIDIA documents, per release.
#
# Source of the Python names: github.com/NVIDIA/TensorRT, read at the tag of every release below.
# Its pybind11 bindings (python/src/**.cpp) define each name `import tensorrt` has, each with its
# docstring from python/docstrings/**Doc.h (deprecations are stated there); its trtexec options are
# parsed in samples/common/sampleOptions.cpp. A name counts as documented in a release
# when that release's source defines it. Removals are also stated on NVIDIA's migration pages (URLs
# below). Tags and the version each tag's VERSION file states:
TAGS: dict[Release, str] = {
    (8, 0, 1): "8.0.1", (8, 2, 1): "8.2.1", (8, 4, 2): "8.4.3", (8, 5, 3): "8.5.3",
    (8, 6, 1): "v8.6.1", (10, 0, 0): "v10.0.0", (10, 0, 1): "v10.0.1", (10, 1, 0): "v10.1.0",
    (10, 2, 0): "v10.2.0", (10, 3, 0): "v10.3.0", (10, 4, 0): "v10.4.0", (10, 5, 0): "v10.5.0",
    (10, 6, 0): "v10.6.0", (10, 7, 0): "v10.7.0", (10, 8, 0): "v10.8.0", (10, 9, 0): "v10.9.0",
    (10, 10, 0): "v10.10.0", (10, 11, 0): "v10.11", (10, 12, 0): "v10.12.0", (10, 13, 0): "v10.13.0",
    (10, 13, 2): "v10.13.2", (10, 13, 3): "v10.13.3", (10, 14, 1): "v10.14", (10, 15, 1): "v10.15",
    (10, 16, 0): "v10.16", (11, 0, 0): "v11.0", (11, 1, 0): "v11.1"}
# The Python path: pyproject's `tensorrt>=10`, and TensorRT 11 where the code branches for it. 8.6.1
# is read only to date what 10.0 removed. TensorRT 11.2 and later are on no tag of the repository.
PYTHON_MAJORS = (10, 11)
PYTHON_RELEASES = tuple(r for r in TAGS if r[0] in PYTHON_MAJORS)
# build_engine.sh: TensorRT 8.x (JetPack 5), 10.x and 11.x, as its header says.
TRTEXEC_RELEASES = tuple(r for r in TAGS if r[0] in (8, 10, 11))

GITHUB = "github.com/NVIDIA/TensorRT"
CORE = f"{GITHUB} python/src/infer/pyCore.cpp"
ONNX = f"{GITHUB} python/src/parsers/pyOnnx.cpp"
TYPES = f"{GITHUB} python/src/infer/pyFoundationalTypes.cpp"
INT8 = f"{GITHUB} python/src/infer/pyInt8.cpp (the file is gone from v11.0)"
WHEEL = f"{GITHUB} python/packaging/bindings_wheel/tensorrt/__init__.py"
OPTIONS = f"{GITHUB} samples/common/sampleOptions.cpp (trtexec's parsers; not trtexec_safe's)"
DOCS = "https://docs.nvidia.com/deeplearning/tensorrt"
GONE_IN_10 = f"{DOCS}/latest/api/migration/tensorrt-8x-to-10x-python-api-reference.html"
GONE_IN_11 = f"{DOCS}/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html"
TRTEXEC_GONE_IN_11 = f"{DOCS}/11.4.1/api/migration/tensorrt-10x-to-11x-trtexec.html"

PLAIN = ""  # `returns` of a name whose value is a plain Python one (bool, int, str, bytes, None)
UNSTATED = "?"  # the table does not say what the name gives: reading an attribute of it is an error


@dataclass(frozen=True)
class Doc:
    """Releases [since, removed) of the table define a name; `returns`: the class its call or read
    gives (from the C++ signature it binds, include/NvInfer*.h), `cls`: it is a class or enum."""

    since: Release
    removed: Release | None
    source: str
    returns: str = UNSTATED
    cls: bool = False
    note: str = ""

    def documented_in(self, release: Release) -> bool:
        return self.since <= release and (self.removed is None or release < self.removed)


V8, V10, V11 = (8, 6, 1), (10, 0, 0), (11, 0, 0)
PYTHON_API: dict[str, Doc] = {
    # module level: `__version__` from the wheel's __init__.py; the DataType aliases
    # (m.attr("float32") = DataType::kFLOAT, ...) from pyFoundationalTypes.cpp
    "__version__": Doc(V8, None, WHEEL, PLAIN),
    "float32": Doc(V8, None, TYPES, "DataType"),
    "float16": Doc(V8, None, TYPES, "DataType"),
    "int8": Doc(V8, None, TYPES, "DataType"),
    "int32": Doc(V8, None, TYPES, "DataType"),
    "uint8": Doc(V8, None, TYPES, "DataType"),
    # Logger derives from ILogger, whose Severity values are export_values()'d into ILogger
    "Logger": Doc(V8, None, CORE, "Logger", cls=True),
    "Logger.WARNING": Doc(V8, None, CORE),
    "Runtime": Doc(V8, None, CORE, "Runtime", cls=True),
    "Runtime.deserialize_cuda_engine": Doc(V8, None, CORE, "ICudaEngine"),
    "OnnxParser": Doc(V8, None, ONNX, "OnnxParser", cls=True),
    "OnnxParser.parse_from_file": Doc(V8, None, ONNX, PLAIN),
    "OnnxParser.get_error": Doc(V8, None, ONNX, "IParserError"),
    "OnnxParser.num_errors": Doc(V8, None, ONNX, PLAIN),
    "Builder": Doc(V8, None, CORE, "Builder", cls=True),
    "Builder.create_network": Doc(V8, None, CORE, "INetworkDefinition"),
    "Builder.create_builder_config": Doc(V8, None, CORE, "IBuilderConfig"),
    "Builder.create_optimization_profile": Doc(V8, None, CORE, "IOptimizationProfile"),
    "Builder.build_serialized_network": Doc(V8, None, CORE, "IHostMemory"),
    "Builder.build_engine": Doc(V8, V10, f"{CORE}; {GONE_IN_10}", "ICudaEngine"),
    "NetworkDefinitionCreationFlag": Doc(V8, None, CORE, cls=True),
    # python/docstrings/infer/pyCoreDoc.h at v11.1: deprecated in 11.0, kept, ignored (always on)
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": Doc(V10, None, CORE),
    "BuilderFlag": Doc(V8, None, CORE, cls=True),
    # pyCoreDoc.h at v10.16: FP16 and INT8 deprecated in 10.12, superseded by strong typing
    "BuilderFlag.FP16": Doc(V8, V11, f"{CORE}; {GONE_IN_11}"),
    "BuilderFlag.INT8": Doc(V8, V11, f"{CORE}; {GONE_IN_11}"),
    "IBuilderConfig.add_optimization_profile": Doc(V8, None, CORE, PLAIN),
    "IBuilderConfig.set_flag": Doc(V8, None, CORE, PLAIN),
    "IBuilderConfig.create_timing_cache": Doc(V8, None, CORE, "ITimingCache"),
    "IBuilderConfig.set_timing_cache": Doc(V8, None, CORE, PLAIN),
    "IBuilderConfig.set_timing_cache(ignore_mismatch)": Doc(V8, None, CORE),  # "ignore_mismatch"_a
    "IBuilderConfig.get_timing_cache": Doc(V8, None, CORE, "ITimingCache"),
    # pyCoreDoc.h at v10.3.0: int8_calibrator and set_calibration_profile deprecated in 10.1
    "IBuilderConfig.int8_calibrator": Doc(V8, V11, f"{CORE}; {GONE_IN_11}"),
    "IBuilderConfig.set_calibration_profile": Doc(V8, V11, f"{CORE}; {GONE_IN_11}", PLAIN),
    "IBuilderConfig.max_workspace_size": Doc(V8, V10, f"{CORE}; {GONE_IN_10}"),
    "IOptimizationProfile.set_shape": Doc(V8, None, CORE, PLAIN),
    "ITimingCache.serialize": Doc(V8, None, CORE, "IHostMemory"),
    "ICudaEngine.create_execution_context": Doc(V8, None, CORE, "IExecutionContext"),
    "ICudaEngine.num_io_tensors": Doc(V8, None, CORE, PLAIN),
    "ICudaEngine.get_tensor_name": Doc(V8, None, CORE, PLAIN),
    "ICudaEngine.get_tensor_mode": Doc(V8, None, CORE, "TensorIOMode"),
    "ICudaEngine.get_tensor_dtype": Doc(V8, None, CORE, "DataType"),
    "TensorIOMode": Doc(V8, None, CORE, cls=True),
    "TensorIOMode.INPUT": Doc(V8, None, CORE),
    "TensorIOMode.OUTPUT": Doc(V8, None, CORE),
    "IExecutionContext.set_input_shape": Doc(V8, None, CORE, PLAIN),
    "IExecutionContext.get_tensor_shape": Doc(V8, None, CORE, "Dims"),
    "IExecutionContext.set_tensor_address": Doc(V8, None, CORE, PLAIN),
    "IExecutionContext.execute_async_v3": Doc(V8, None, CORE, PLAIN),
    "IExecutionContext.execute_async_v2": Doc(V8, V10, f"{CORE}; {GONE_IN_10}", PLAIN),
    # python/docstrings/infer/pyInt8Doc.h at v10.3.0: the calibrators are deprecated since 10.1;
    # the methods a subclass overrides are bound on IInt8EntropyCalibrator2 itself
    "IInt8EntropyCalibrator2": Doc(V8, V11, f"{INT8}; {GONE_IN_11}", cls=True),
    "IInt8EntropyCalibrator2.get_batch_size": Doc(V8, V11, INT8),
    "IInt8EntropyCalibrator2.get_batch": Doc(V8, V11, INT8),
    "IInt8EntropyCalibrator2.read_calibration_cache": Doc(V8, V11, INT8),
    "IInt8EntropyCalibrator2.write_calibration_cache": Doc(V8, V11, INT8),
}

T8 = (8, 0, 1)
TRTEXEC_FLAGS: dict[str, Doc] = {
    "--help": Doc(T8, None, OPTIONS),  # parseHelp(); the banner build_engine.sh reads the version from
    "--onnx": Doc(T8, None, OPTIONS),
    "--saveEngine": Doc(T8, None, OPTIONS),
    "--timingCacheFile": Doc(T8, None, OPTIONS),
    "--minShapes": Doc(T8, None, OPTIONS),
    "--optShapes": Doc(T8, None, OPTIONS),
    "--maxShapes": Doc(T8, None, OPTIONS),
    "--fp16": Doc(T8, V11, f"{OPTIONS}; {TRTEXEC_GONE_IN_11}"),
    "--int8": Doc(T8, V11, f"{OPTIONS}; {TRTEXEC_GONE_IN_11}"),
    # first on 9.x's tags (not in the table); a deprecated no-op in 11 (sampleOptions.cpp help text)
    "--stronglyTyped": Doc(V10, None, OPTIONS),
    # parsed on every tag; TensorRT has DLA up to 10.7 and again from 11.4.1 (JetPack 7.2.2+):
    # https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html
    "--useDLACore": Doc(T8, None, OPTIONS),
    "--allowGPUFallback": Doc(T8, None, OPTIONS),
}


def release_text(release: Release) -> str:
    return ".".join(map(str, release))


# ---------------------------------------------------------------------------------------------------
# The checker


@dataclass(frozen=True)
class Use:
    """One name used at one place, on the releases whose code path reaches it."""

    name: str
    releases: frozenset[Release]
    where: str
    optional: bool = False  # behind hasattr(): some release its path runs on must have it


def check(uses: Iterable[Use], table: dict[str, Doc]) -> list[str]:
    """One sentence per name that some release its path runs on does not document."""
    problems = []
    for use in sorted(uses, key=lambda u: (u.where, u.name)):
        doc = table.get(use.name)
        if doc is None:
            problems.append(f"{use.where}: {use.name} is documented in no TensorRT release of the "
                            "table (misspelt, or new: add it with where NVIDIA documents it)")
            continue
        missing = sorted(r for r in use.releases if not doc.documented_in(r))
        if use.optional:
            missing = missing if len(missing) == len(use.releases) else []
        if not missing:
            continue
        why = (f"removed in {release_text(doc.removed)}" if doc.removed and missing[-1] >= doc.removed
               else f"first in {release_text(doc.since)}")
        problems.append(f"{use.where}: {use.name} runs on TensorRT "
                        f"{', '.join(map(release_text, missing))}, which do not have it ({why}; "
                        f"{doc.source})")
    return problems


# ---------------------------------------------------------------------------------------------------
# The collector: TensorRT names in Python source, with the releases each one's code path runs on

Type = tuple[str, ...] | None  # None: not a TensorRT value
MODULE, MAJOR, SELF, UNKNOWN = ("module",), ("major",), ("self",), ("unknown",)
COMPARE: dict[type, Callable[[int, int], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne}
FLIP = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE, ast.Eq: ast.Eq,
        ast.NotEq: ast.NotEq}


@dataclass
class Scope:
    """A function body (or a class's, a lambda's) as walked: its names and what encloses it."""

    key: str
    file: str
    node: ast.AST | None = None
    outer: Scope | None = None
    env: dict[str, Type] = field(default_factory=dict)
    self_env: dict[str, Type] | None = None

    def lookup(self, name: str) -> tuple[bool, Type]:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.env:
                return True, scope.env[name]
            scope = scope.outer
        return False, None

    def params(self) -> set[str]:
        if not isinstance(self.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return set()
        a = self.node.args
        return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if p}


def _imports_tensorrt(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "tensorrt" for a in n.names)
               or isinstance(n, ast.ImportFrom) and n.module == "tensorrt" for n in ast.walk(tree))


class Collector:
    """Walks the source until the releases of every path stop growing, then reports the uses."""

    def __init__(self, sources: dict[str, str], releases: Iterable[Release], table: dict[str, Doc],
                 imported_elsewhere: set[str] = frozenset()):
        self.trees = {name: ast.parse(text, filename=name) for name, text in sources.items()}
        self.all = frozenset(releases)
        self.table = table
        self.functions: dict[str, tuple[str, ast.FunctionDef]] = {}
        for file, tree in self.trees.items():
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    assert node.name not in self.functions, f"two module-level {node.name}()"
                    self.functions[node.name] = (file, node)
        self.providers = {n for n, (_, f) in self.functions.items() if self._returns_tensorrt(f)}
        self.majors = {n for n, (_, f) in self.functions.items() if self._returns_major(f)}
        self.imported_elsewhere = set(imported_elsewhere)
        self.entries = self.imported_elsewhere | self._referenced_not_called()
        self.live: dict[str, frozenset[Release]] = {}
        # call sites and assignments of this walk, and of the last one (which guards on arguments
        # read: a callee is often walked before its callers)
        self.calls: dict[str, list[tuple[Scope, frozenset[Release], ast.Call]]] = {}
        self.assigns: dict[tuple[str, str], list[tuple[frozenset[Release], ast.expr, Scope]]] = {}
        self.last_calls, self.last_assigns = self.calls, self.assigns
        self.returns: dict[str, Type] = {}
        self.found: dict[tuple[str, str, bool], set[Release]] = {}
        self.problems: list[str] = []

    # -- what the functions are
    @staticmethod
    def _returns_tensorrt(fn: ast.FunctionDef) -> bool:
        """`import tensorrt` ... `return tensorrt`: a function that hands out the module."""
        bound = {a.asname or a.name for n in ast.walk(fn) if isinstance(n, ast.Import)
                 for a in n.names if a.name == "tensorrt"}
        return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Name)
                   and n.value.id in bound for n in ast.walk(fn))

    @staticmethod
    def _returns_major(fn: ast.FunctionDef) -> bool:
        """`return int(<...>.__version__...)`: a function giving TensorRT's major version."""
        return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Call)
                   and isinstance(n.value.func, ast.Name) and n.value.func.id == "int"
                   and any(isinstance(a, ast.Attribute) and a.attr == "__version__"
                           for a in ast.walk(n.value)) for n in ast.walk(fn))

    def _referenced_not_called(self) -> set[str]:
        """Functions passed around as values: called from anywhere, so on every release."""
        called = {id(n.func) for t in self.trees.values() for n in ast.walk(t)
                  if isinstance(n, ast.Call)}
        return {n.id for t in self.trees.values() for n in ast.walk(t)
                if isinstance(n, ast.Name) and n.id in self.functions and id(n) not in called}

    # -- the fixed point
    def run(self) -> tuple[list[Use], list[str]]:
        previous = None
        for _ in range(20):
            self.last_calls, self.last_assigns = self.calls, self.assigns
            self.calls, self.assigns, self.found, self.problems = {}, {}, {}, []
            self._walk_everything()
            state = (sorted((k, sorted(v)) for k, v in self.live.items()),
                     sorted((k, sorted(v)) for k, v in self.found.items()),
                     sorted((k, s.key, sorted(r), c.lineno) for k, v in self.calls.items()
                            for s, r, c in v),
                     sorted((k, sorted(r), getattr(e, "lineno", 0)) for k, v in self.assigns.items()
                            for r, e, _ in v))
            if state == previous:
                uses = [Use(name, frozenset(rel), where, optional)
                        for (name, where, optional), rel in self.found.items()]
                self.problems += [f"{name}() hands a TensorRT value to a module this check does "
                                  "not read" for name in self.imported_elsewhere
                                  if self.returns.get(name) is not None]
                return uses, sorted(set(self.problems))
            previous = state
            self.live = {name: self._live_of(name) for name in self.functions}
        raise AssertionError("the release sets of the code paths did not settle")

    def _live_of(self, name: str) -> frozenset[Release]:
        sites = self.calls.get(name)
        if name in self.entries or not sites:
            return self.all
        return frozenset().union(*(releases for _, releases, _ in sites))

    def _walk_everything(self) -> None:
        for file, tree in self.trees.items():
            module = Scope(f"{file}:<module>", file)
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    scope = Scope(f"{file}:{node.name}", file, node, module)
                    self._function(node, scope, self.live.get(node.name, frozenset()))
                elif isinstance(node, ast.ClassDef):
                    self._class(node, module, self.all, frozenset())
                else:
                    self._stmt(node, module, self.all, frozenset())

    def _function(self, fn: ast.FunctionDef, scope: Scope, live: frozenset[Release]) -> None:
        for name in scope.params():
            scope.env.setdefault(name, SELF if scope.self_env is not None and name == "self"
                                 else None)
        self._block(fn.body, scope, live, frozenset())

    def _class(self, node: ast.ClassDef, scope: Scope, live: frozenset[Release],
               optional: frozenset[str]) -> None:
        """A class: its TensorRT base's overridden methods are uses; each method is walked."""
        bases = [self._expr(b, scope, live, optional) for b in node.bases]
        trt_base = next((b[1] for b in bases if b and b[0] == "class"), None)
        scope.env[node.name] = ("class", trt_base) if trt_base else None
        attributes: dict[str, Type] = {}
        for item in node.body:
            if not isinstance(item, ast.FunctionDef):
                continue
            if trt_base and not item.name.startswith("__"):
                self._record(f"{trt_base}.{item.name}", scope, live, optional, item)
            inner = Scope(f"{scope.key}.{node.name}.{item.name}", scope.file, item, scope,
                          self_env=attributes)
            self._function(item, inner, live)

    # -- statements
    def _block(self, body: list[ast.stmt], scope: Scope, live: frozenset[Release],
               optional: frozenset[str]) -> None:
        for stmt in body:
            self._stmt(stmt, scope, live, optional)

    def _stmt(self, s: ast.stmt, scope: Scope, live: frozenset[Release],
              optional: frozenset[str]) -> None:
        if isinstance(s, ast.If):
            self._expr(s.test, scope, live, optional)
            then, other, guarded = self._split(s.test, scope, live)
            self._block(s.body, scope, then, optional | guarded)
            self._block(s.orelse, scope, other, optional)
        elif isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            if s.value is None:
                return
            for target in (s.targets if isinstance(s, ast.Assign) else [s.target]):
                self._assign(target, s.value, scope, live, optional)
        elif isinstance(s, ast.Return):
            kind = self._expr(s.value, scope, live, optional) if s.value else None
            if kind is not None and isinstance(scope.node, ast.FunctionDef) \
                    and self.functions.get(scope.node.name, ("", None))[1] is scope.node:
                self.returns[scope.node.name] = kind
        elif isinstance(s, ast.ClassDef):
            self._class(s, scope, live, optional)
        elif isinstance(s, ast.FunctionDef):
            self._function(s, Scope(f"{scope.key}.{s.name}", scope.file, s, scope), live)
        elif isinstance(s, ast.Import):
            for a in s.names:
                scope.env[a.asname or a.name.split(".")[0]] = MODULE if a.name == "tensorrt" else None
        elif isinstance(s, ast.ImportFrom):
            for a in s.names:
                if s.module == "tensorrt":
                    self._record(a.name, scope, live, optional, s)
                scope.env[a.asname or a.name] = None
        else:
            self._compound(s, scope, live, optional)

    def _compound(self, s: ast.stmt, scope: Scope, live: frozenset[Release],
                  optional: frozenset[str]) -> None:
        """for/while/with/try/expression statements: their expressions, then their blocks."""
        for item in getattr(s, "items", []):  # with ... as name
            kind = self._expr(item.context_expr, scope, live, optional)
            if item.optional_vars is not None:
                self._bind(item.optional_vars, kind, None, scope, live)
        for name in ("iter", "test", "value", "exc"):
            child = getattr(s, name, None)
            if isinstance(child, ast.expr):
                self._expr(child, scope, live, optional)
        if isinstance(s, ast.For):
            self._bind(s.target, None, None, scope, live)
        for name in ("body", "orelse", "finalbody"):
            self._block(getattr(s, name, []), scope, live, optional)
        for handler in getattr(s, "handlers", []):
            self._block(handler.body, scope, live, optional)

    def _assign(self, target: ast.expr, value: ast.expr, scope: Scope, live: frozenset[Release],
                optional: frozenset[str]) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts):
                self._assign(t, v, scope, live, optional)
            return
        kind = self._expr(value, scope, live, optional)
        if isinstance(target, ast.Attribute):
            owner = self._expr(target.value, scope, live, optional)
            if owner == SELF and scope.self_env is not None:
                scope.self_env[target.attr] = kind
            else:  # a property set on a TensorRT object (config.int8_calibrator = ...)
                self._member(owner, target.attr, scope, live, optional, target)
        elif isinstance(target, ast.Subscript):
            self._expr(target.value, scope, live, optional)
            self._expr(target.slice, scope, live, optional)
        else:
            self._bind(target, kind, value, scope, live)

    def _bind(self, target: ast.expr, kind: Type, value: ast.expr | None, scope: Scope,
              live: frozenset[Release]) -> None:
        if isinstance(target, ast.Name):
            scope.env[target.id] = kind
            self.assigns.setdefault((scope.key, target.id), []).append(
                (live, value if value is not None else ast.Name("<unknown>"), scope))
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind(element, None, None, scope, live)

    # -- guards: which releases run each branch
    def _split(self, test: ast.expr, scope: Scope, live: frozenset[Release]
               ) -> tuple[frozenset[Release], frozenset[Release], frozenset[str]]:
        """(releases running the body, releases running the else, names its hasattr guards)."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            parts = [self._split(v, scope, live) for v in test.values]
            return (frozenset.intersection(*(p[0] for p in parts)), live,
                    frozenset().union(*(p[2] for p in parts)))
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            then, other, _ = self._split(test.operand, scope, live)
            return other, then, frozenset()
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            left, op, right = test.left, type(test.ops[0]), test.comparators[0]
            if self._is_major(right, scope) and isinstance(left, ast.Constant):
                left, op, right = right, FLIP.get(op, op), left
            if self._is_major(left, scope) and isinstance(right, ast.Constant) and op in COMPARE:
                then = frozenset(r for r in live if COMPARE[op](r[0], right.value))
                return then, live - then, frozenset()
            if isinstance(left, ast.Name) and isinstance(right, ast.Constant) and right.value is None:
                maybe = live & self._active(scope, left.id, "not-none", frozenset())
                if op is ast.IsNot:
                    return maybe, live, frozenset()
                if op is ast.Is:
                    return live, maybe, frozenset()
        if isinstance(test, ast.Name):
            return live & self._active(scope, test.id, "truthy", frozenset()), live, frozenset()
        if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) \
                and test.func.id == "hasattr" and len(test.args) == 2:
            name = self._qualified(test.args[0], test.args[1], scope)
            return live, live, frozenset({name} if name else ())
        return live, live, frozenset()

    def _is_major(self, node: ast.expr, scope: Scope) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return node.func.id in self.majors
        return isinstance(node, ast.Name) and scope.lookup(node.id)[1] == MAJOR

    def _qualified(self, obj: ast.expr, attr: ast.expr, scope: Scope) -> str | None:
        if not (isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
            return None
        kind = self._expr(obj, scope, frozenset(), frozenset())
        if kind == MODULE:
            return attr.value
        if kind and kind[0] in ("class", "inst"):
            return f"{kind[1]}.{attr.value}"
        return None

    def _active(self, scope: Scope, name: str, how: str, seen: frozenset) -> frozenset[Release]:
        """Releases on which `name` may be truthy (or not None) where it is tested in `scope`."""
        key = (scope.key, name, how)
        if key in seen:
            return frozenset()
        seen = seen | {key}
        assigned = self.last_assigns.get((scope.key, name), [])
        out: set[Release] = set()
        for releases, value, where in assigned:
            out |= releases & self._value_active(value, where, how, seen, releases)
        if name in scope.params():
            out |= self._param_active(scope, name, how, seen)
        elif not assigned:  # a closure's or a global's: not followed, so on every release
            return self.all
        return frozenset(out)

    def _value_active(self, value: ast.expr, scope: Scope, how: str, seen: frozenset,
                      releases: frozenset[Release]) -> frozenset[Release]:
        if isinstance(value, ast.Constant):
            on = bool(value.value) if how == "truthy" else value.value is not None
            return self.all if on else frozenset()
        if isinstance(value, ast.Name) and value.id != "<unknown>":
            return self._active(scope, value.id, how, seen)
        return releases

    def _param_active(self, scope: Scope, name: str, how: str, seen: frozenset
                      ) -> frozenset[Release]:
        fn = scope.node
        if not isinstance(fn, ast.FunctionDef) or fn.name not in self.functions \
                or self.functions[fn.name][1] is not fn or fn.name in self.entries:
            return self.all  # a method's or a nested function's argument: any value
        if not self.last_calls.get(fn.name):
            return self.all  # called from nowhere here: any value
        out: set[Release] = set()
        for caller, releases, call in self.last_calls[fn.name]:
            argument = self._argument(fn, call, name)
            if argument is None:
                return self.all
            out |= releases & self._value_active(argument, caller, how, seen, releases)
        return frozenset(out)

    @staticmethod
    def _argument(fn: ast.FunctionDef, call: ast.Call, name: str) -> ast.expr | None:
        """What a call passes for parameter `name` (its default when it passes nothing)."""
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None
                                                                     for k in call.keywords):
            return None
        positional = [*fn.args.posonlyargs, *fn.args.args]
        for k in call.keywords:
            if k.arg == name:
                return k.value
        index = next((i for i, p in enumerate(positional) if p.arg == name), None)
        if index is not None and index < len(call.args):
            return call.args[index]
        defaults = dict(zip([p.arg for p in positional][-len(fn.args.defaults):] if fn.args.defaults
                            else [], fn.args.defaults))
        defaults |= {p.arg: d for p, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d}
        return defaults.get(name)

    # -- expressions
    def _record(self, name: str, scope: Scope, live: frozenset[Release], optional: frozenset[str],
                node: ast.AST) -> None:
        where = f"{Path(scope.file).name}:{getattr(node, 'lineno', 0)}"
        self.found.setdefault((name, where, name in optional), set()).update(live)

    def _member(self, owner: Type, attr: str, scope: Scope, live: frozenset[Release],
                optional: frozenset[str], node: ast.AST) -> Type:
        """`owner.attr` for a TensorRT owner: the use, and the kind of value it gives."""
        if owner is None or owner == MAJOR:
            return None
        if owner == SELF:
            return (scope.self_env or {}).get(attr)
        if owner == UNKNOWN:
            self.problems.append(f"{Path(scope.file).name}:{getattr(node, 'lineno', 0)}: .{attr} "
                                 "of a TensorRT value whose class the table does not give")
            return None
        name = attr if owner == MODULE else f"{owner[1]}.{attr}"
        self._record(name, scope, live, optional, node)
        doc = self.table.get(name)
        if doc is not None and doc.cls:
            return ("class", name)
        if doc is None or doc.returns == UNSTATED:
            return UNKNOWN
        return ("inst", doc.returns) if doc.returns != PLAIN else None

    def _expr(self, node: ast.expr | None, scope: Scope, live: frozenset[Release],
              optional: frozenset[str]) -> Type:
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return scope.lookup(node.id)[1]
        if isinstance(node, ast.Attribute):
            owner = self._expr(node.value, scope, live, optional)
            return self._member(owner, node.attr, scope, live, optional, node)
        if isinstance(node, ast.Call):
            return self._call(node, scope, live, optional)
        if isinstance(node, ast.Lambda):
            inner = Scope(f"{scope.key}.<lambda:{node.lineno}>", scope.file, node, scope)
            inner.env.update(dict.fromkeys(inner.params()))
            self._expr(node.body, inner, live, optional)
            return None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = Scope(scope.key, scope.file, scope.node, scope, self_env=scope.self_env)
            for generator in node.generators:
                self._expr(generator.iter, inner, live, optional)
                for target in ast.walk(generator.target):
                    if isinstance(target, ast.Name):
                        inner.env[target.id] = None
                for condition in generator.ifs:
                    self._expr(condition, inner, live, optional)
            for part in ("elt", "key", "value"):
                self._expr(getattr(node, part, None), inner, live, optional)
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expr(child, scope, live, optional)
        return None

    def _call(self, node: ast.Call, scope: Scope, live: frozenset[Release],
              optional: frozenset[str]) -> Type:
        func = node.func
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            self._expr(argument, scope, live, optional)
        if isinstance(func, ast.Name):
            bound, kind = scope.lookup(func.id)
            if func.id == "hasattr" and len(node.args) == 2:
                name = self._qualified(node.args[0], node.args[1], scope)
                if name:
                    self._record(name, scope, live, optional | {name}, node)
                return None
            if not (bound and kind is not None) and func.id in self.functions:
                self.calls.setdefault(func.id, []).append((scope, live, node))
                if func.id in self.providers:
                    return MODULE
                if func.id in self.majors:
                    return MAJOR
                return self.returns.get(func.id)
            return ("inst", kind[1]) if kind and kind[0] == "class" else None
        if isinstance(func, ast.Attribute):
            owner = self._expr(func.value, scope, live, optional)
            kind = self._member(owner, func.attr, scope, live, optional, func)
            if owner not in (None, SELF, MAJOR, UNKNOWN):
                prefix = func.attr if owner == MODULE else f"{owner[1]}.{func.attr}"
                for k in node.keywords:
                    if k.arg:
                        self._record(f"{prefix}({k.arg})", scope, live, optional, k.value)
            if kind and kind[0] == "class":  # a constructor: an instance of that class
                return ("inst", kind[1])
            return kind
        self._expr(func, scope, live, optional)
        return None


def _rise_edge_sources() -> tuple[dict[str, str], set[str]]:
    """The rise_edge modules that reach TensorRT's Python API (they import tensorrt, or a function
    handing out the module from one that does), and the names other modules import from them."""
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
             for p in sorted(PACKAGE.rglob("*.py"))}
    # a module that never spells "tensorrt" can neither import it nor import from its modules
    texts = {name: text for name, text in texts.items() if "tensorrt" in text}
    trees = {name: ast.parse(text) for name, text in texts.items()}
    module_of = {name: name[:-3].replace("/", ".").removesuffix(".__init__") for name in texts}
    imports = {name: [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
               for name, tree in trees.items()}
    scanned = {name for name, tree in trees.items() if _imports_tensorrt(tree)}
    while True:
        modules = {module_of[name] for name in scanned}
        providers = {node.name for name in scanned for node in trees[name].body
                     if isinstance(node, ast.FunctionDef) and Collector._returns_tensorrt(node)}
        more = {name for name in texts if name not in scanned and any(
            n.module in modules and any(a.name in providers for a in n.names)
            for n in imports[name])}
        if not more:
            break
        scanned |= more
    elsewhere = {a.name for name in texts if name not in scanned for n in imports[name]
                 if n.module in modules for a in n.names}
    return {name: texts[name] for name in scanned}, elsewhere


def collect_python(sources: dict[str, str], elsewhere: set[str] = frozenset()
                   ) -> tuple[list[Use], list[str]]:
    return Collector(sources, PYTHON_RELEASES, PYTHON_API, elsewhere).run()


# ---------------------------------------------------------------------------------------------------
# build_engine.sh, run with a fake trtexec per release

FAKE_TRTEXEC = r"""#!/usr/bin/env bash
# Logs its arguments (a line each, "----" after a call), prints trtexec's banner, writes the engine.
printf '%s\n' "$@" ---- >>"$FAKE_LOG"
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_CODE] # trtexec $*"
for arg in "$@"; do
  case "$arg" in --saveEngine=*) echo engine >"${arg#--saveEngine=}" ;; esac
done
"""
FAKE_PYTHON = r"""#!/usr/bin/env bash
# python -m modelopt.onnx.autocast --onnx_path IN --output_path OUT ...: OUT is a copy of IN.
[ "$2" = modelopt.onnx.autocast ] && cp "$4" "$6"
"""
# name, graph, engine, precision, input, CxHxW, batch min/opt/max, DLA-capable (bundle.py's columns)
ENGINES = [("fp32", "graphs/fp32.onnx", "engines/fp32.engine", "fp32", "0"),
           ("fp16", "graphs/fp32.onnx", "engines/fp16.engine", "fp16", "1"),
           ("int8", "graphs/int8-qdq.onnx", "engines/int8.engine", "int8", "1")]
MODES = {"gpu": [], "dla": ["--dla", "0", "--allow-gpu-fallback"]}


def banner_code(release: Release) -> int:
    """NV_TENSORRT_VERSION as trtexec prints it (include/NvInferRuntimeBase.h: major*1000 + minor*100
    + patch on 8.x, major*10000 + minor*100 + patch from 10.0)."""
    major, minor, patch = release
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def _run_script(script: str, release: Release, mode: str, work: Path) -> list[list[str]]:
    """The trtexec calls `script` makes on a bundle of three engines for `release`."""
    bundle = work / f"{release_text(release)}-{mode}"
    (bundle / "graphs").mkdir(parents=True)
    for graph in {e[1] for e in ENGINES}:
        (bundle / graph).write_bytes(b"onnx")
    rows = ["\t".join([n, g, e, p, "images", "3x32x32", "1", "8", "32", d]) for n, g, e, p, d in ENGINES]
    (bundle / "engines.tsv").write_text("# name\tonnx\tengine\tprecision\n" + "\n".join(rows) + "\n")
    (bundle / "build_engine.sh").write_text(script)
    fake = work / "bin"
    if not fake.is_dir():
        fake.mkdir()
        for name, text in (("trtexec", FAKE_TRTEXEC), ("python", FAKE_PYTHON)):
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
    log = bundle / "trtexec.log"
    env = {k: v for k, v in os.environ.items() if k not in ("TRTEXEC", "TRT_VERSION")}
    env |= {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
            "FAKE_CODE": str(banner_code(release)), "PYTHON": str(fake / "python")}
    done = subprocess.run(["bash", "build_engine.sh", *MODES[mode]], cwd=bundle, env=env,
                          capture_output=True, text=True, timeout=60)
    assert f"TensorRT {release_text(release)} " in done.stdout, done.stdout + done.stderr
    no_dla = mode == "dla" and done.returncode == 2 and "has no DLA" in done.stderr
    assert done.returncode == 0 or no_dla, done.stderr
    calls, block = [], []
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line == "----":
            calls.append(block)
            block = []
        else:
            block.append(line)
    return calls


def collect_trtexec(script: str, work: Path, releases: Iterable[Release] = TRTEXEC_RELEASES
                    ) -> list[Use]:
    """Every flag the script gives trtexec, with the releases it gives it on."""
    seen: dict[str, set[Release]] = {}
    for release in releases:
        for mode in MODES:
            for call in _run_script(script, release, mode, work):
                for flag in (a.split("=", 1)[0] for a in call if a.startswith("--")):
                    seen.setdefault(flag, set()).add(release)
    return [Use(flag, frozenset(rel), "build_engine.sh") for flag, rel in seen.items()]


def named_flags(script: str) -> set[str]:
    """The trtexec flags written in the script: its argument arrays and direct trtexec calls."""
    arrays = " ".join(re.findall(r"\bargs\+?=\(([^)]*)\)", script))
    direct = re.findall(r'"\$trtexec"\s+(--[A-Za-z][A-Za-z0-9]*)', script)
    return set(re.findall(r"--[A-Za-z][A-Za-z0-9]*", arrays)) | set(direct)


# ---------------------------------------------------------------------------------------------------
# Tests


def _releases(uses: list[Use], name: str) -> frozenset[Release]:
    return frozenset().union(*(u.releases for u in uses if u.name == name))


def test_every_tensorrt_name_rise_edge_uses_is_documented_on_the_releases_its_path_runs_on(
        ) -> None:
    sources, elsewhere = _rise_edge_sources()
    assert {"rise_edge/backends/tensorrt/build.py", "rise_edge/backends/tensorrt/__init__.py"} <= set(
        sources)
    uses, gaps = collect_python(sources, elsewhere)
    assert not gaps, "\n".join(gaps)
    assert not check(uses, PYTHON_API), "\n".join(check(uses, PYTHON_API))
    # the collector saw the builder, the parser, the engine and the context
    assert {u.name.split(".")[0] for u in uses} >= {"Builder", "OnnxParser", "IBuilderConfig",
                                                    "ICudaEngine", "IExecutionContext"}


def test_the_version_guards_reach_the_builder_through_the_flags_its_caller_passes() -> None:
    """BuilderFlag.FP16 is set in build_engine under `if fp16_flag:`; only make_engine's
    `tensorrt_major() <= 10` branch makes that flag true, so its path runs on 10.x alone."""
    uses, _ = collect_python(*_rise_edge_sources())
    ten = frozenset(r for r in PYTHON_RELEASES if r[0] == 10)
    for name in ("BuilderFlag.FP16", "BuilderFlag.INT8", "IBuilderConfig.int8_calibrator",
                 "IInt8EntropyCalibrator2", "IInt8EntropyCalibrator2.get_batch"):
        assert _releases(uses, name) == ten, name
    for name in ("Builder.build_serialized_network", "IExecutionContext.execute_async_v3"):
        assert _releases(uses, name) == frozenset(PYTHON_RELEASES), name
    assert all(u.optional for u in uses if u.name in ("uint8",
                                                      "NetworkDefinitionCreationFlag.STRONGLY_TYPED"))


BAD_SNIPPET = '''
import tensorrt as trt


def major():
    return int(trt.__version__.split(".")[0])


def build(onnx):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    if major() <= 10:
        config.set_flag(trt.BuilderFlag.INT8)      # guarded: fine
    config.set_flag(trt.BuilderFlag.FP16)          # unguarded: runs on 11, which removed it
    config.set_timing_cach(None)                   # documented nowhere
    engine = builder.build_engine(None, config)    # removed in 10.0
    engine.create_execution_context().execute_async_v2([], 0)
'''


def test_the_checker_reports_names_that_are_misspelt_removed_or_unguarded() -> None:
    uses, gaps = collect_python({"snippet.py": BAD_SNIPPET})
    problems = "\n".join(check(uses, PYTHON_API))
    assert "BuilderFlag.FP16 runs on TensorRT 11.0.0, 11.1.0, which do not have it (removed in " \
           "11.0.0" in problems
    assert "IBuilderConfig.set_timing_cach is documented in no TensorRT release" in problems
    assert "Builder.build_engine runs on TensorRT 10.0.0" in problems and "removed in 10.0.0" in problems
    assert "IExecutionContext.execute_async_v2 runs on" in problems
    assert "BuilderFlag.INT8" not in problems, problems
    # build_engine's value is an ICudaEngine (the table says so), so nothing was left untyped
    assert not gaps, gaps


@pytest.mark.parametrize(("path", "old", "new", "expected"), [
    ("rise_edge/backends/tensorrt/__init__.py", "execute_async_v3", "execute_async_v2",
     "IExecutionContext.execute_async_v2 runs on TensorRT 10.0.0"),
    ("rise_edge/backends/tensorrt/build.py", "create_optimization_profile", "create_profile",
     "Builder.create_profile is documented in no TensorRT release"),
    # the FP16 flag made true on every release: it reaches BuilderFlag.FP16 on 11
    ("rise_edge/backends/tensorrt/__init__.py", "if tensorrt_major() <= 10:\n            fp16_flag",
     "if True:\n            fp16_flag",
     "BuilderFlag.FP16 runs on TensorRT 11.0.0, 11.1.0"),
    # the legacy calibrator built on 11 too
    ("rise_edge/backends/tensorrt/__init__.py", "elif tensorrt_major() <= 10:", "elif True:",
     "IBuilderConfig.set_calibration_profile runs on TensorRT 11.0.0, 11.1.0"),
])
def test_a_changed_copy_of_the_source_fails_the_check(path: str, old: str, new: str,
                                                      expected: str) -> None:
    sources, elsewhere = _rise_edge_sources()
    assert sources[path].count(old) == 1, f"{old!r} is no longer in {path} once: update this test"
    sources[path] = sources[path].replace(old, new)
    uses, _ = collect_python(sources, elsewhere)
    problems = check(uses, PYTHON_API)
    assert any(expected in p for p in problems), "\n".join(problems)


def test_pyproject_and_the_table_agree_on_the_oldest_tensorrt() -> None:
    floor = re.search(r'"tensorrt>=(\d+)', (REPO / "pyproject.toml").read_text())
    assert floor and int(floor.group(1)) == min(PYTHON_MAJORS)
    assert all(doc.removed is None or doc.since < doc.removed
               for doc in (*PYTHON_API.values(), *TRTEXEC_FLAGS.values()))


def test_every_trtexec_flag_build_engine_sh_passes_is_one_that_release_parses(tmp_path: Path
                                                                             ) -> None:
    script = BUILD_SCRIPT.read_text()
    uses = collect_trtexec(script, tmp_path)
    assert not check(uses, TRTEXEC_FLAGS), "\n".join(check(uses, TRTEXEC_FLAGS))
    # every flag the script names went through the runs above, so none escaped the check
    assert named_flags(script) <= {u.name for u in uses}, named_flags(script)
    assert _releases(uses, "--fp16") == frozenset(r for r in TRTEXEC_RELEASES if r[0] < 11)
    assert (11, 0, 0) not in _releases(uses, "--useDLACore")  # DLA refused where 11.0 has none


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('if [ "$major" -lt 11 ]; then', "if true; then",
     "--fp16 runs on TensorRT 11.0.0, 11.1.0, which do not have it (removed in 11.0.0"),
    ('"--timingCacheFile=$timing_cache"', '"--timingCache=$timing_cache"',
     "--timingCache is documented in no TensorRT release"),
])
def test_a_changed_copy_of_build_engine_sh_fails_the_check(tmp_path: Path, old: str, new: str,
                                                           expected: str) -> None:
    script = BUILD_SCRIPT.read_text()
    assert script.count(old) == 1, f"{old!r} is no longer in build_engine.sh once: update this test"
    # one release per branch of the script (8.x, 10.x with and without DLA, 11.x) is enough here
    some = [(8, 6, 1), (10, 3, 0), (10, 16, 0), (11, 0, 0), (11, 1, 0)]
    problems = check(collect_trtexec(script.replace(old, new), tmp_path, some), TRTEXEC_FLAGS)
    assert any(expected in p for p in problems), "\n".join(problems)
