"""`rise-edge demo` end to end on a miniature world and teacher (seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rise_edge.cli import main
from rise_edge.data.domains import KNOWN_DATASETS, KnownDataset
from rise_edge.demo.teacher import build_demo_teacher, miniature_teacher_settings
from rise_edge.demo.world import generate_world, miniature_world_spec
from rise_edge.train.teacher import BUILT_TEACHERS


@pytest.fixture
def miniature_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Registers a miniature demo world and teacher under their own names; returns a recipe."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RISE_EDGE_CACHE", str(cache))
    monkeypatch.setitem(KNOWN_DATASETS, "demo-mini", KnownDataset(
        "demo-mini", ("cartoon", "painting", "photo", "sketch"), None,
        build=lambda root: generate_world(cache, miniature_world_spec(), progress=False)))
    monkeypatch.setitem(BUILT_TEACHERS, "demo-mini-clip", lambda: build_demo_teacher(
        cache, settings=miniature_teacher_settings(), progress=False).parent)
    recipe = tmp_path / "demo-mini.yaml"
    recipe.write_text("""
data: {dataset: demo-mini, target_domain: sketch, val_fraction: 0.25, num_workers: 0}
student: {model: test_convnext, pretrained: none, image_size: 32}
teacher: {model: demo-mini-clip}
loss: {w_ce: 0.2, w_kd: 0.8, w_dist: 1.0}
optim: {name: adamw, lr: 0.001, weight_decay: 0.01, schedule: cosine}
train: {steps: 4, batch_size: 8, log_every: 2}
export: {calibration_size: 8}
bench: {warmup: 1, iterations: 3}
""")
    return recipe


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(miniature_demo: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--recipe", str(miniature_demo), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for style in ("cartoon", "painting", "photo", "sketch"):
        assert f"| {style} |" in result.output
    assert "UNSEEN target" in result.output
    for engine in ("pytorch (FP32)", "onnx-fp32 (FP32)", "onnx-int8 (INT8)"):
        assert f"- {engine}: p50" in result.output, engine
    for name in ("erm/results.json", "rise/results.json", "rise/export/export.json",
                 "rise/bench/report.json", "demo.md", "demo.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "demo.json").read_text())
    assert summary["export"]["onnx-int8"] == "ok"
    assert set(summary["zero_shot"]) == {"cartoon", "painting", "photo", "sketch"}
    erm_recipe = (out / "erm" / "recipe.yaml").read_text()
    assert "method: erm" in erm_recipe  # ERM: no teacher terms
    # A second run reuses the finished runs instead of training again.
    before = (out / "rise" / "student.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["demo", "--recipe", str(miniature_demo), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output
    assert (out / "rise" / "student.safetensors").stat().st_mtime_ns == before


def test_demo_refuses_a_data_set_it_cannot_build(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {dataset: PACS, target_domain: sketch}\n")
    result = CliRunner().invoke(main, ["demo", "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "data.dataset=demo" in result.output
