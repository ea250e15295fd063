"""The layout's rules, read from the source with ast: no import cycle, the demo plugged in from outside,
stages importing only stages below them, functions that fit on a screen, a one-line job per module,
and every link in README.md and docs/ pointing at a file in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "rise_edge"

# The order data flows in (style.md): a module imports only from its own stage or a lower one.
# The core's table-like modules sit at the bottom. The run directory (rise_edge.run_dir) is the
# hand-off from train to export and bench: training writes it and it rebuilds the student, so it
# ranks with train. A site (rise_edge.site) meets a trained, exported run: it adapts students and
# runs their artefacts, so it ranks above the backends; the site's image folder itself is data.
# Serving packages what
# export made and judged into bundles for the device. Predict runs a bench-verified artefact on a
# user's images with bench's preprocessing. The Python API (rise_edge.api) drives every step, and
# the command line is a shell over it; the demo is a plugin above everything. The package's own
# namespace (rise_edge/__init__.py) names the API lazily, by importlib, so it stays core.
# Experiment tracking (rise_edge.track) sits just above the core: train, export, bench and sweep
# collect all log through it.
STAGES = ("core", "track", "data", "train", "export", "backends", "site", "bench", "predict", "serving", "sweep",
          "api", "cli", "demo")
CORE = {"rise_edge", "rise_edge.errors", "rise_edge.startup", "rise_edge.logs", "rise_edge.files", "rise_edge.config", "rise_edge.plugins",
        "rise_edge.registry", "rise_edge.backend_table"}
# The run directory is the hand-off train writes: it belongs to train.
MOVED = {"rise_edge.run_dir": "train"}
LONGEST_FUNCTION = 80


def stage_of(module: str) -> str:
    if module in CORE:
        return "core"
    if module in MOVED:
        return MOVED[module]
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """rise_edge modules a file imports, function-level imports included, TYPE_CHECKING excluded."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("rise_edge"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.module.startswith("rise_edge"):
                found.add(node.module)

    Visitor().visit(ast.parse(path.read_text()))
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_every_module_has_a_stage() -> None:
    assert {stage_of(m) for m in _modules()} <= set(STAGES)


def test_the_import_graph_has_no_cycle_and_only_the_demo_imports_the_demo() -> None:
    graph = _graph()
    outside = {n: sorted(m for m in deps if m.startswith("rise_edge.demo"))
               for n, deps in graph.items() if not n.startswith("rise_edge.demo")}
    assert not {n: d for n, d in outside.items() if d}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_stage_imports_a_higher_one() -> None:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = sorted(f"{name} ({stage_of(name)}) imports {dep} ({stage_of(dep)})"
                    for name, deps in _graph().items() for dep in deps
                    if rank[stage_of(dep)] > rank[stage_of(name)])
    assert upward == []


def test_the_stage_rule_sees_an_upward_import(tmp_path) -> None:
    """The rule above is only as good as its reader: an upward import written here must be seen."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from rise_edge.bench.driver import bench_run\n")
    assert _imports(probe) == {"rise_edge.bench.driver"}
    assert STAGES.index(stage_of("rise_edge.bench.driver")) > STAGES.index(stage_of("rise_edge.data"))


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


LONGEST_MODULE = 500
# Modules over LONGEST_MODULE lines, each with its reason: one job that is long, not several jobs.
LONG_MODULES = {
    "rise_edge/cli.py": "every command's options and help; each command body calls rise_edge.api",
    "rise_edge/config.py": "the recipe schema: every section's fields with their help and ceilings",
    "rise_edge/files.py": "the write guarantees' machinery: atomic writes, locks, checked readers",
    "rise_edge/sweep/launch.py": "three launchers (local pool, submitit local, SLURM job arrays)",
    "rise_edge/train/loop.py": "the training loop with its resume, selection and checkpoints",
    "rise_edge/data/download.py": "five published data sets' sources, checksums and layouts",
    "rise_edge/backends/onnxruntime/int8.py": "ONNX Runtime INT8: targets, calibration, fallback",
    "rise_edge/demo/teacher.py": "the demo teacher: its data pool, training and zero-shot table",
    "rise_edge/site/distill.py": "distillation at a site: loss, replay, selection and resume",
}
# The command line talks to the user (click.echo); everything else logs (rise_edge.logs) or returns
# what it found.
MAY_PRINT = {"rise_edge/cli.py"}


def test_no_module_is_longer_than_its_reason_allows() -> None:
    long = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
            for p in PACKAGE.rglob("*.py")}
    over = {p: n for p, n in long.items() if n > LONGEST_MODULE and p not in LONG_MODULES}
    assert over == {}
    assert all(long.get(p, 0) > LONGEST_MODULE for p in LONG_MODULES), "a named module shrank: " \
        "drop it from LONG_MODULES"


def test_library_code_never_prints() -> None:
    printing = []
    for path in PACKAGE.rglob("*.py"):
        if str(path.relative_to(REPO)) in MAY_PRINT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "print":
                printing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert printing == []


def test_every_module_says_its_job_in_its_first_docstring_line() -> None:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        first = (doc or "").strip().splitlines()[0] if doc else ""
        if len(first.split()) < 3:
            missing.append(str(path.relative_to(REPO)))
    assert missing == []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_link_in_readme_and_docs_resolves_to_a_file_in_the_repository() -> None:
    broken = []
    for page in _markdown_files():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses and in-page anchors
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or REPO.resolve() not in path.parents:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_link_check_sees_a_broken_link(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("see [the recipes](recipes.md) and [PACS](https://example.org)\n")
    assert LINK.findall(page.read_text()) == ["recipes.md", "https://example.org"]
    assert not (tmp_path / "recipes.md").exists()


def test_the_register_functions_the_plugin_docs_name_are_the_ones_that_exist() -> None:
    """plugins.py and docs/backends.md name the registry API a plugin calls, and nothing else."""
    import importlib

    named = set()
    for text in ((PACKAGE / "plugins.py").read_text(), (REPO / "docs" / "backends.md").read_text()):
        named |= set(re.findall(r"(rise_edge[\w.]*)\.(register_\w+)", text))
    assert {"register_dataset", "register_teacher", "register_backend", "register_method",
            "register_command"} <= {name for _, name in named}
    for module, name in named:
        assert callable(getattr(importlib.import_module(module), name)), f"{module}.{name}"


def test_the_lowest_versions_ci_installs_are_the_floors_pyproject_declares() -> None:
    """.ci/run tests the lowest versions of the packages whose floors matter for export and bench;
    its constraints file must name exactly pyproject.toml's floors, or the step tests other ones."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for req in requirements:
        for spec in req.specifier:
            if spec.operator == ">=":
                floors.setdefault(req.name.lower().replace("_", "-"), set()).add(Version(spec.version))
    pins = {}
    for line in (REPO / ".ci" / "lowest-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
    assert {"onnx", "onnxruntime", "openvino", "nncf", "timm", "open-clip-torch"} <= set(pins)
    for name, pin in pins.items():
        assert floors.get(name) == {pin}, (name, floors.get(name), pin)
    assert "lowest-versions.txt" in (REPO / ".ci" / "run").read_text()
