"""`rise-edge train` end to end on tiny synthetic domains: run directory, selection, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import train_cli_args
from safetensors.torch import load_file

from rise_edge.cli import main
from rise_edge.config import load_recipe
from rise_edge.run_dir import open_run

_args = train_cli_args


def test_erm_run_directory(tiny_data_root: Path, recipe_file: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import rise_edge.train.teacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("ERM must not load a teacher")

    monkeypatch.setattr(rise_edge.train.teacher, "load_teacher", no_teacher)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, run_dir, "--set", "train.steps=12",
                                              "--set", "train.eval_every=4")])
    assert result.exit_code == 0, result.output
    assert "UNSEEN target" in result.output and f"run directory: {run_dir}" in result.output
    for name in ("recipe.yaml", "student.safetensors", "student.json", "metrics.jsonl",
                 "results.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "resume.safetensors").exists()  # finished runs leave no resume state
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all({"val/cartoon", "val/photo", "target/sketch", "val_mean"} <= r["eval"].keys()
               for r in evals)
    assert all("ce" in r and "images_per_s" in r for r in records if "eval" not in r)
    assert all(r["step_images_per_s"] > 0 and r["loader_images_per_s"] > 0
               for r in records if "eval" not in r)
    # Selection uses source validation only: the selected step has the best val_mean.
    results = json.loads((run_dir / "results.json").read_text())
    stats = results["stats"]  # the loader's rate beside the step's: which one sets the pace
    assert stats["loader_images_per_s"] > 0 and stats["step_images_per_s"] > 0
    assert stats["bottleneck"] in ("loader", "step") and stats["loader_workers"] == 0
    assert 0 <= stats["waiting_for_batches_fraction"] < 1 and stats["seconds_to_first_step"] > 0
    check = stats["image_check"]
    assert check["decoded"] + check["reused"] == 72 and Path(check["record"]).parent.is_dir()
    best = max(evals, key=lambda r: r["eval"]["val_mean"])  # first of equals, as training keeps it
    assert results["selected_step"] == best["step"]
    assert results["accuracy"]["target/sketch"] == best["eval"]["target/sketch"]
    # The run directory is enough to rebuild the student: metadata travels with the weights.
    run = open_run(run_dir)
    assert run.meta.classes == ("circle", "square", "triangle")
    assert run.meta.target_domain == "sketch" and run.meta.preprocessing.input_size == 32
    assert run.recipe.data.root == str(tiny_data_root.resolve())  # absolute: works from anywhere
    assert run.student(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    meta = json.loads((run_dir / "student.json").read_text())
    assert {"torch", "timm", "rise_edge"} <= meta["versions"].keys()


def test_refuses_to_overwrite_a_run(tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "student.safetensors").write_bytes(b"precious")
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, run_dir, "--set", "train.steps=2")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (run_dir / "student.safetensors").read_bytes() == b"precious"
    result = CliRunner().invoke(main, ["train", str(recipe_file), "--resume",
                                       *_args(tiny_data_root, run_dir, "--set", "train.steps=2")])
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_open_run_errors(tmp_path: Path) -> None:
    from rise_edge.errors import UserError

    with pytest.raises(UserError, match="run directory .* not found"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no student.safetensors"):
        open_run(tmp_path / "empty")


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_data_root: Path, recipe_file: Path,
                                                 tmp_path: Path) -> None:
    steps = ["--set", "train.steps=240", "--set", "train.eval_every=12", "--set", "optim.schedule=cosine"]
    whole = tmp_path / "whole"
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, whole, *steps)])
    assert result.exit_code == 0, result.output

    cut = tmp_path / "cut"
    # Both runs on the same number of threads: other tests may have changed this process's count,
    # and a different count changes float reductions.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        [sys.executable, "-m", "rise_edge.cli", "train", str(recipe_file),
         *_args(tiny_data_root, cut, *steps)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = cut / "metrics.jsonl"
        if metrics.is_file() and (cut / "resume.safetensors").is_file() and any(
                '"eval"' in line and json.loads(line)["step"] >= 24
                for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "results.json").exists(), "the run finished before it could be killed"

    result = CliRunner().invoke(main, ["train", str(recipe_file), "--resume",
                                       *_args(tiny_data_root, cut, *steps)])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(whole / "student.safetensors")), load_file(str(cut / "student.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # every weight and BatchNorm statistic, the batch counters included
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    results_a = json.loads((whole / "results.json").read_text())
    results_b = json.loads((cut / "results.json").read_text())
    assert results_a["accuracy"] == results_b["accuracy"]
    assert results_a["selected_step"] == results_b["selected_step"]
    evals = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in l]
    assert evals == list(range(12, 241, 12))  # no duplicate or missing evaluations after resume


def test_resume_refuses_a_changed_recipe(tiny_data_root: Path, recipe_file: Path,
                                         tmp_path: Path) -> None:
    from rise_edge.config import dump_recipe
    from rise_edge.errors import UserError
    from rise_edge.train.loop import _check_run_dir
    from rise_edge.train.methods import resolved

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe_file, ["train.steps=4"])))
    (run_dir / "resume.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="the recipe changed train.steps since"):
        # train resolves the recipe (method and head named) before it compares
        _check_run_dir(run_dir, resolved(load_recipe(recipe_file, ["train.steps=8"]))[0], resume=True)
    # How images reach the student is not what it trains on: loader workers, a re-check.
    _check_run_dir(run_dir, resolved(load_recipe(recipe_file, [
        "train.steps=4", "data.num_workers=3", "data.recheck_images=true"]))[0], resume=True)


def test_a_failed_start_leaves_nothing_behind(tiny_data_root: Path, recipe_file: Path,
                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    bad = CliRunner().invoke(main, ["train", str(recipe_file), *_args(
        tiny_data_root, run_dir, "--set", "train.batch_size=4096")])
    assert bad.exit_code == 2 and not run_dir.exists()
    good = CliRunner().invoke(main, ["train", str(recipe_file), *_args(
        tiny_data_root, run_dir, "--set", "train.steps=2")])
    assert good.exit_code == 0, good.output


@pytest.mark.parametrize("override, message", [
    ("data.target_domain=clipart", "domain 'clipart' not found"),
    ("student.model=resnet_18", "is not a timm model; did you mean: "),
    ("student.pretrained=missing.safetensors", "weights file missing.safetensors not found"),
    ("student.pretrained=lite0-offline", "holds weights for 'tf_efficientnet_lite0'"),
    ("train.batch_size=4096", "larger than the"),
])
def test_bad_data_and_student_inputs_exit_2(tiny_data_root: Path, recipe_file: Path, tmp_path: Path,
                                           override: str, message: str) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, run_dir, "--set", override)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output



def _slow_start_rank(rank: int, data_root: Path, run_dir: Path, port: int, delay: float) -> None:
    """One of 2 forked ranks starting a run whose rank 0 checks its images for `delay` s more; writes
    rank<N>.json (seconds in the start, training images) beside the run directory."""
    from datetime import timedelta

    import torch.distributed as dist

    import rise_edge.data.domains as domains
    from conftest import tiny_recipe_overrides
    from rise_edge.config import load_recipe
    from rise_edge.train.distributed import Distributed
    from rise_edge.train.loop import _prepare_run

    torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited in use
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    # The rendezvous waits as long as a slow machine needs; the process group's collectives then
    # time out after 2 s: NCCL's default 10 minutes, scaled down to what a test can wait for.
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))
    check = domains.check_image_files

    def slow_check(*args, **kwargs):
        time.sleep(delay)  # a first image check of a large data set
        return check(*args, **kwargs)

    domains.check_image_files = slow_check
    parallel = Distributed.from_env("cpu")
    started = time.perf_counter()
    recipe = load_recipe(None, tiny_recipe_overrides(data_root))
    splits = _prepare_run(recipe, "slow", run_dir, False, False, parallel, None)[2]
    (run_dir.parent / f"rank{rank}.json").write_text(json.dumps(
        {"waited_s": time.perf_counter() - started, "train_images": len(splits.train_samples)}))
    parallel.close()


def test_ranks_wait_out_a_first_image_check_longer_than_the_process_group_timeout(
        tiny_data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 checks every image before the others get the splits; a first check of a large data
    set outlasts the process group's timeout (NCCL: 10 min). The other ranks wait for it up to
    $RISE_EDGE_START_TIMEOUT instead, and the start goes on."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("RISE_EDGE_START_TIMEOUT", "60")
    delay = 5.0  # > the 2 s the ranks give the process group
    # Forked, so the ranks start with this process's imports instead of paying for their own.
    mp.start_processes(_slow_start_rank, (tiny_data_root, tmp_path / "run", port, delay), nprocs=2,
                       start_method="fork")
    ends = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ends[1]["waited_s"] >= delay  # rank 1 really waited past the group's 2 s
    assert ends[0]["train_images"] == ends[1]["train_images"] > 0
    assert (tmp_path / "run" / "splits.json").is_file()


def test_the_start_timeout_is_read_in_seconds_and_a_bad_one_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from rise_edge.errors import UserError
    from rise_edge.train.distributed import DEFAULT_START_TIMEOUT_S, START_TIMEOUT_ENV, start_timeout

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert start_timeout() == timedelta(seconds=DEFAULT_START_TIMEOUT_S)
    monkeypatch.setenv(START_TIMEOUT_ENV, "5400")
    assert start_timeout() == timedelta(hours=1.5)
    for bad in ("0", "-1", "nan", "inf", "soon", "1e12"):
        monkeypatch.setenv(START_TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=START_TIMEOUT_ENV):
            start_timeout()
