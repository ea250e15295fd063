"""The training loader (rise_edge.data.loading): worker defaults from cores and memory, and batches
that carry the time it took to make them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_DATASET
from torch.utils.data import DataLoader

from rise_edge.cli import main
from rise_edge.config import load_recipe
from rise_edge.data import loading
from rise_edge.data.domains import DomainImages, EpochBatches, build_splits
from rise_edge.data.loading import TimedBatches, auto_workers, loader_workers, made_batch
from rise_edge.data.transforms import Preprocessing, train_transform

GiB = 1 << 30


@pytest.mark.parametrize("cores, available, resident, device, threads, per_node, expected", [
    (16, 128 * GiB, 6 * GiB, "cuda", 1, 1, 8),     # a GPU server: capped at 8
    (16, 512 * GiB, 6 * GiB, "cuda", 1, 4, 3),     # four torchrun processes share the cores
    (16, 128 * GiB, 6 * GiB, "cuda", 1, 4, 2),     # ... and the memory: 16 GiB each
    (16, 24 * GiB, 6 * GiB, "cuda", 1, 1, 2),      # memory: half of 24 GiB holds two of 6 GiB
    (2, 22 * GiB, 1 * GiB, "cpu", 1, 1, 1),        # a CPU with one torch thread: one core free
    (2, 22 * GiB, 1 * GiB, "cpu", 2, 1, 0),        # the step uses both cores: decode in-process
    (4, None, 1 * GiB, "cpu", 1, 1, 3),            # memory unknown: cores decide
])
def test_auto_workers_follow_cores_and_memory(monkeypatch, cores, available, resident, device,
                                              threads, per_node, expected) -> None:
    monkeypatch.setattr(loading, "_cores", lambda: cores)
    monkeypatch.setattr(loading, "_available_memory", lambda: available)
    monkeypatch.setattr(loading, "_resident_memory", lambda: resident)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert auto_workers(device, per_node) == expected


def test_loader_workers_setting(monkeypatch) -> None:
    monkeypatch.setattr(loading, "auto_workers", lambda device, per_node: per_node * 10)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers("auto", "cpu") == 20 and loader_workers(3, "cpu") == 3
    assert load_recipe(None).data.num_workers == "auto"
    assert load_recipe(None, ["data.num_workers=0"]).data.num_workers == 0


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_a_bad_worker_count_is_one_line(tiny_data_root: Path, tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(main, ["train", "demo", "--set", f"data.num_workers={value}",
                                       "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "data.num_workers" in result.output and "'auto'" in result.output


@pytest.mark.parametrize("workers", [0, 1])
def test_timed_batches_are_the_plain_batches_with_their_time(tiny_data_root: Path,
                                                             workers: int) -> None:
    cfg = load_recipe(None, [f"data.root={tiny_data_root}", f"data.dataset={TINY_DATASET}",
                             "data.target_domain=sketch"]).data
    samples = build_splits(cfg, progress=False).train_samples
    images = DomainImages(samples, train_transform(Preprocessing(32, (0.5,) * 3, (0.5,) * 3)))
    sampler = EpochBatches(len(samples), 8, seed=1)
    plain = list(DataLoader(images, batch_sampler=sampler))
    timed = list(DataLoader(TimedBatches(images), batch_sampler=sampler, collate_fn=made_batch,
                            num_workers=workers))
    assert len(timed) == len(plain) > 0
    for (x, y), (tx, ty, seconds) in zip(plain, timed):
        assert torch.equal(x, tx) and torch.equal(y, ty) and tx.shape == (8, 3, 32, 32)
        assert isinstance(seconds, float) and seconds > 0
