"""The Python API (rise_edge.api) against the command line: the same records from the same recipe,
the same one-line errors, nothing heavy loaded by `import rise_edge`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import rise_edge
from rise_edge.api import Run, override_texts
from rise_edge.cli import main
from rise_edge.errors import UserError
from conftest import tiny_recipe_overrides, train_cli_args

STEPS = ["--set", "train.steps=8", "--set", "train.eval_every=4"]
# Fields that say when or how fast, not what was computed: they differ between any two runs.
VOLATILE = {"time", "seconds", "images_per_s", "step_images_per_s", "loader_images_per_s",
            "step_seconds", "wall_s", "created", "updated", "seconds_to_first_step",
            "waiting_for_batches_fraction", "elapsed_s", "data_seconds", "lr_seconds"}


def _as_overrides(args: list[str]) -> list[str]:
    """train_cli_args' `--set k=v` texts, as the API takes them too (the run dir goes apart)."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def _computed(records: list[dict]) -> list[dict]:
    """metrics.jsonl's records without their timings."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        return value
    return [strip(r) for r in records]


def test_import_rise_edge_is_light_and_names_the_api() -> None:
    code = ("import sys, rise_edge; assert 'torch' not in sys.modules, 'torch loaded'; "
            "assert rise_edge.Run.__name__ == 'Run' and callable(rise_edge.Run.train); "
            "assert {'Run', 'UserError'} <= set(dir(rise_edge))")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        rise_edge.no_such_thing  # noqa: B018


def test_overrides_as_python_values_read_back_as_the_same_values() -> None:
    from rise_edge.config import parse_override

    texts = override_texts({"optim.lr": 0.01, "export.qat": "off", "data.root": Path("x/y"),
                            "bench.batch_sizes": [1, 8], "train.amp": False})
    assert [parse_override(t) for t in texts] == [
        ("optim.lr", 0.01), ("export.qat", "off"), ("data.root", "x/y"),
        ("bench.batch_sizes", [1, 8]), ("train.amp", False)]
    assert override_texts(["optim.lr=0.1"]) == ("optim.lr=0.1",)
    with pytest.raises(UserError, match="give a mapping"):
        override_texts("optim.lr=0.1")
    with pytest.raises(UserError, match="not a recipe value"):
        override_texts({"optim.lr": object()})


def test_api_train_export_bench_give_the_cli_s_records(tiny_data_root: Path, recipe_file: Path,
                                                        tmp_path: Path) -> None:
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    args = train_cli_args(tiny_data_root, cli_dir, *STEPS)
    result = CliRunner().invoke(main, ["train", str(recipe_file), *args])
    assert result.exit_code == 0, result.output
    run = Run.train(recipe_file, _as_overrides(args), run_dir=api_dir, progress=False)
    assert isinstance(run, Run) and run.path == api_dir
    assert run.train_result is not None and run.train_result.table() in result.output
    assert _computed(run.metrics()) == _computed(Run.open(cli_dir).metrics())
    assert (api_dir / "student.safetensors").read_bytes() == \
        (cli_dir / "student.safetensors").read_bytes()

    result = CliRunner().invoke(main, ["export", str(cli_dir), "--format", "onnx", "--quiet"])
    assert result.exit_code == 0, result.output
    exported = run.export(["onnx"], progress=False)
    assert not exported.failed and exported.config is not None
    cli_records, api_records = Run(cli_dir).export_record(), run.export_record()
    for name, record in api_records["artefacts"].items():
        other = cli_records["artefacts"][name]
        assert record["status"] == other["status"] == "ok", name
        assert record["sha256"] == other["sha256"], name  # the same bytes, made the same way

    bench = ["--domain", "all", "--batch", "1", "--iterations", "2", "--warmup", "0", "--quiet"]
    result = CliRunner().invoke(main, ["bench", str(cli_dir), *bench])
    assert result.exit_code == 0, result.output
    report = run.bench(domains=["all"], batch_sizes=[1], iterations=2, warmup=0, progress=False)
    cli_rows = json.loads((cli_dir / "bench" / "report.json").read_text())["rows"]
    assert [r["engine"] for r in report.rows] == [r["engine"] for r in cli_rows]
    for mine, theirs in zip(report.rows, cli_rows):
        assert {d: a["top1"] for d, a in mine["accuracy"].items()} == \
            {d: a["top1"] for d, a in theirs["accuracy"].items()}, mine["engine"]
    assert report.table().splitlines()[0] in result.output


def test_api_errors_are_the_commands_one_line_errors(tmp_path: Path, tiny_run: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as caught:
        Run.open(missing)
    result = CliRunner().invoke(main, ["export", str(missing)])
    assert result.exit_code == 2 and f"error: {caught.value}" in result.output
    assert "\n" not in str(caught.value)

    with pytest.raises(UserError, match="not both") as caught:
        Run(tiny_run).bench(iterations=2, duration_s=1.0)
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--iterations", "2",
                                       "--duration", "1"])
    assert result.exit_code == 2 and f"error: {caught.value}" in result.output

    with pytest.raises(UserError, match="unknown engine") as caught:
        Run(tiny_run).bench(engines=["onnxx"], progress=False)
    assert caught.value.exit_code == 2

    with pytest.raises(UserError, match="recipe file not found|no recipe"):
        Run.train(tmp_path / "absent.yaml", progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_python_api_page_runs_cell_by_cell(tmp_path: Path, tiny_data_root: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """docs/python-api.md's cells, run in order in one namespace, as a notebook would."""
    import re
    import shutil

    import yaml

    page = (Path(__file__).parents[1] / "docs" / "python-api.md").read_text()
    cells = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(cells) >= 5
    recipe: dict = {}
    for text in tiny_recipe_overrides(tiny_data_root):
        key, value = text.split("=", 1)
        section, name = key.split(".")
        recipe.setdefault(section, {})[name] = yaml.safe_load(value)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    images = tmp_path / "my_images"
    images.mkdir()
    for n, path in enumerate(sorted((tiny_data_root / "shapes" / "sketch").rglob("*.png"))[:12]):
        shutil.copy(path, images / f"{n:02d}.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, cell in enumerate(cells, 1):
        exec(compile(cell, f"docs/python-api.md, cell {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "UNSEEN target" in printed and "refused: " in printed
    assert printed.count("my_images") >= 12 and "images/s" in printed
    assert (tmp_path / "runs" / "notebook" / "export" / "export.json").is_file()
