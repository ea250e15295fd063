"""RISE through the real command line, and 2-process DistributedDataParallel against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import TINY_CLIP_CONFIG, TINY_DATASET
from rise_edge.cli import main

REPO = Path(__file__).parents[1]


def _rise_args(data_root: Path, clip_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.root={data_root}", f"data.dataset={TINY_DATASET}", "data.target_domain=sketch",
            "data.val_fraction=0.25", "data.num_workers=0", "student.model=test_convnext",
            "student.image_size=32", f"teacher.model=local-dir:{clip_dir}", "loss.w_ce=0.2",
            "loss.w_kd=0.8", "loss.w_dist=1.0", "train.batch_size=8", "optim.lr=0.01",
            "train.log_every=1", *extra]
    return ["--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]


def test_rise_train_logs_every_term_and_caches_text(tiny_data_root: Path, tiny_clip_dir: Path,
                                                   tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "rise.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe),
                                       *_rise_args(tiny_data_root, tiny_clip_dir, run_dir,
                                                   "train.steps=4")])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' not in line]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "ce", "kd", "ad", "rd"} <= r.keys() for r in steps)
    assert len(list((run_dir / "text_embeddings").glob("text-*.safetensors"))) == 1
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("text-*.safetensors"))) == 1
    meta = json.loads((run_dir / "student.json").read_text())
    assert meta["head"]["embed_dim"] == TINY_CLIP_CONFIG["embed_dim"]  # projector to the teacher's dim


def test_kd_method_trains_from_a_rise_recipe_with_a_plain_head(tiny_data_root: Path,
                                                               tiny_clip_dir: Path,
                                                               tmp_path: Path) -> None:
    recipe = tmp_path / "rise.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe),
                                       *_rise_args(tiny_data_root, tiny_clip_dir, run_dir,
                                                   "train.steps=3", "loss.method=kd")])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' not in line]
    assert all(r.keys() >= {"loss", "ce", "kd"} and not r.keys() & {"ad", "rd"} for r in steps)
    meta = json.loads((run_dir / "student.json").read_text())
    assert meta["head"]["embed_dim"] is None  # no projector into CLIP's space, no text init
    assert "method: kd" in (run_dir / "recipe.yaml").read_text()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_data_root: Path, tiny_clip_dir: Path,
                                             tmp_path: Path) -> None:
    """Same global batch of 8: one process, then torchrun with 2 gloo ranks of 4 (BN-free student)."""
    recipe = tmp_path / "rise.yaml"
    recipe.write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RISE_EDGE_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    common = ["train.steps=6", "train.eval_every=3"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "rise_edge.cli", "train", str(recipe),
                    *_rise_args(tiny_data_root, tiny_clip_dir, single, *common)],
                   env=env, check=True, capture_output=True)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "rise_edge.cli", "train", str(recipe),
         *_rise_args(tiny_data_root, tiny_clip_dir, ddp, *common)],
        env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = load_file(str(single / "student.safetensors")), load_file(str(ddp / "student.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    ra = json.loads((single / "results.json").read_text())
    rb = json.loads((ddp / "results.json").read_text())
    assert ra["accuracy"] == rb["accuracy"] and ra["selected_step"] == rb["selected_step"]
    assert rb["stats"]["world_size"] == 2
    # Only rank 0 writes: one line per logged step, not two.
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((single / "metrics.jsonl").read_text().splitlines())
