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


def test_the_resume_state_restores_every_cuda_generator(tmp_path: Path) -> None:
    """GPU resume is exact only if the CUDA generators come back too (dropout, augmentation on the
    device): the state saves each device's and restores it."""
    from rise_edge.run_dir import load_training_state, save_training_state

    model = torch.nn.Linear(2, 2).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.cuda.manual_seed_all(7)
    save_training_state(tmp_path / "state.safetensors", model, optimizer, {})
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")  # the generator moves on
    load_training_state(tmp_path / "state.safetensors", model, optimizer)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_each_rank_is_on_its_own_gpu_before_the_process_group_starts(monkeypatch) -> None:
    """Distributed.from_env sets the CUDA device from LOCAL_RANK before init_process_group (NCCL
    binds a rank to the current device when it starts)."""
    import torch.distributed as dist

    from rise_edge.train.distributed import Distributed

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend: seen.append((backend, torch.cuda.current_device())))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: seen.append(("start group", kwargs["backend"])))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.append(("set_device", index)))
    Distributed.from_env("cuda")
    assert seen[0] == ("set_device", 0) and seen[1][0] == "nccl" and seen[2] == ("start group", "gloo")
