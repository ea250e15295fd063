"""Training on CUDA: autocast and channels_last. Runs where a GPU exists; skipped here with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import train_cli_args as _args
from rise_edge.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; PyTorch sees none on this machine")]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_training_with_autocast(tiny_data_root: Path, tmp_path: Path, precision: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / precision
    result = CliRunner().invoke(main, ["train", str(recipe), *_args(
        tiny_data_root, run_dir, "--set", "train.steps=8", "--set", "train.device=cuda",
        "--set", f"train.precision={precision}", "--set", "train.channels_last=true")])
    assert result.exit_code == 0, result.output
    stats = json.loads((run_dir / "results.json").read_text())["stats"]
    assert stats["device"].startswith("cuda") and stats["peak_gpu_memory_mb"] > 0
