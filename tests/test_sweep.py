"""`rise-edge sweep`: a tiny sweep (2 targets x 2 seeds x 2 methods on generated data) through the
local pool and through submitit's local executor, killed mid-way and run again (finished runs are not
retrained), then collected into tables whose numbers are the runs' own; on SLURM, the one job-array
script submitit writes, handed to a fake sbatch."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TINY_DATASET

from rise_edge.cli import main

REPO = Path(__file__).parents[1]

RUNS = 8


def _sweep_file(folder: Path, data_root: Path, clip_dir: Path, out: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(
        f"data: {{root: '{data_root}', dataset: {TINY_DATASET}, val_fraction: 0.25, num_workers: 0}}\n"
        "student: {model: test_resnet, pretrained: none, image_size: 32}\n"
        f"teacher: {{model: 'local-dir:{clip_dir}'}}\n"
        "loss: {w_ce: 1.0, w_kd: 1.0}\n"
        "train: {steps: 6, batch_size: 8, eval_every: 3}\n"
        "optim: {lr: 0.05}\n")
    sweep = folder / "sweep.yaml"
    sweep.write_text("base: base.yaml\ntargets: [sketch, photo]\nseeds: [0, 1]\n"
                     f"grid:\n  loss.method: [erm, kd]\noutput_dir: '{out}'\n")
    return sweep


def _one_run_sweep(folder: Path, data_root: Path, clip_dir: Path, out: Path) -> Path:
    """The same sweep cut to one run: sketch held out, seed 0, ERM."""
    sweep = _sweep_file(folder, data_root, clip_dir, out)
    sweep.write_text(sweep.read_text().replace("targets: [sketch, photo]", "targets: [sketch]")
                     .replace("seeds: [0, 1]", "seeds: [0]").replace("[erm, kd]", "[erm]"))
    return sweep


def _finished(out: Path) -> dict[str, int]:
    """Run name -> results.json mtime, for every finished run."""
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("results.json")
            if p.parent != out}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "submitit-local"])
def test_a_killed_sweep_resumes_without_retraining_and_collects_the_runs_numbers(
        launcher: str, tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sweep = _sweep_file(tmp_path / "sweep", tiny_data_root, tiny_clip_dir, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rise_edge.cli", "sweep", str(sweep),
                                "--launcher", launcher, "--workers", "2"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own process group: kill it whole
    deadline = time.time() + 240
    while len(_finished(out)) < 2:
        assert process.poll() is None and time.time() < deadline, "the sweep never finished a run"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = _finished(out)
    assert 2 <= len(before) < RUNS, "killed too late to test a resume"
    complete = sum(json.loads(p.read_text()).get("complete", False) for p in out.rglob("sweep.json"))

    result = CliRunner().invoke(main, ["sweep", str(sweep), "--launcher", launcher, "--workers", "2"])
    assert result.exit_code == 0, result.output
    after = _finished(out)
    assert len(after) == RUNS
    assert all(after[name] == mtime for name, mtime in before.items())  # not retrained
    assert f"{RUNS - complete} run(s) done, {complete} already finished" in result.output

    collected = CliRunner().invoke(main, ["sweep", "collect", str(out)])
    assert collected.exit_code == 0, collected.output
    data = json.loads((out / "results.json").read_text())
    table = data["tables"][TINY_DATASET]
    assert set(table["methods"]) == {"erm", "kd"} and table["targets"] == ["photo", "sketch"]
    for method in ("erm", "kd"):
        for target in ("photo", "sketch"):
            own = [json.loads((out / target / f"seed{seed}" / f"method={method}" / "results.json")
                              .read_text())["accuracy"][f"target/{target}"] for seed in (0, 1)]
            mean, se, n = table["methods"][method]["training"][target]
            assert n == 2 and mean == pytest.approx(100 * sum(own) / 2, abs=1e-9)
            # DomainBed's oracle with one grid point: each run's last evaluation on the in part
            last_in = []
            for seed in (0, 1):
                log = (out / target / f"seed{seed}" / f"method={method}" / "metrics.jsonl")
                evals = [json.loads(line)["eval"] for line in log.read_text().splitlines()
                         if '"eval"' in line]
                last_in.append(evals[-1][f"target_in/{target}"])
            oracle = table["methods"][method]["oracle"][target][0]
            assert oracle == pytest.approx(100 * sum(last_in) / 2, abs=1e-9)
    for name in ("results.md", "results.csv", "results.png"):
        assert (out / name).is_file()
    assert "training-domain validation" in (out / "results.md").read_text()
    record = json.loads((out / "photo" / "seed0" / "method=kd" / "sweep.json").read_text())
    assert record["sweep_hash"] == data["sweep_hash"] and record["complete"]


@pytest.mark.slow
def test_a_finished_sweep_skips_everything_and_another_sweep_is_not_mixed_in(
        tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sweep = _one_run_sweep(tmp_path / "sweep", tiny_data_root, tiny_clip_dir, out)
    first = CliRunner().invoke(main, ["sweep", str(sweep)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["sweep", str(sweep)])
    assert again.exit_code == 0 and "0 run(s) done, 1 already finished" in again.output
    other = tmp_path / "other.yaml"
    other.write_text(sweep.read_text().replace("[erm]", "[kd]").replace("base: base.yaml",
                                                                           f"base: {sweep.parent}/base.yaml"))
    refused = CliRunner().invoke(main, ["sweep", str(other)])
    assert refused.exit_code == 2 and "holds another sweep" in refused.output


@pytest.mark.parametrize("text, needle", [
    ("targets: all\n", "'base' must name the recipe"),
    ("base: BASE\nseeds: 3\n", "'seeds' must be a list of integers"),
    ("base: BASE\ngrid: {optim.lr: 0.1}\n", "grid 'optim.lr' must be a non-empty list"),
    ("base: BASE\ngrid: {optim.lrr: [0.1]}\n", "optim.lrr"),
    ("base: BASE\ntargets: [clipart]\n", "target 'clipart' is not a domain"),
    ("base: BASE\nseedz: [0]\n", "unknown key 'seedz'; did you mean 'seeds'"),
    ("base: BASE\ngrid: {train.seed: [0, 1]}\n", "the sweep's own keys"),
    ("base: BASE\nseeds: [0]\nseeds: [1]\n", "seeds"),
    ("base: BASE\ngrid: {loss.method: [erm, risee]}\n", "not a training method"),
    ("base: BASE\nbench: {iterationz: 3}\n", "bench.iterationz"),
    ("base: BASE\nexport: {int9: true}\n", "export.int9"),
    ("base: BASE\ngrid: {weights: [0.1, 0.2]}\n", "holds tied fields"),
    ("base: BASE\ngrid: {weights: [{loss.w_kd: 0.1}], loss.w_kd: [0.2]}\n", "in two places"),
    ("base: BASE\ngrid: {loss.w_kd: [0.1, 0.2]}\ncompare: [optim.lr]\n", "'compare' lists grid fields"),
    ("base: BASE\ngrid: {student.head: [linear]}\n", "'linear' head has none"),
])
def test_bad_sweep_files_are_one_line(text: str, needle: str, tiny_data_root: Path, tiny_clip_dir: Path,
                                      tmp_path: Path) -> None:
    sweep = _sweep_file(tmp_path, tiny_data_root, tiny_clip_dir, tmp_path / "out")
    sweep.write_text(text.replace("BASE", str(tmp_path / "base.yaml"))
                     + ("" if "base" not in text else f"output_dir: '{tmp_path / 'out'}'\n"))
    result = CliRunner().invoke(main, ["sweep", str(sweep)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert needle in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_collect_of_a_folder_that_is_not_a_sweep_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sweep", "collect", str(tmp_path)])
    assert result.exit_code == 2 and "not a sweep's output folder" in result.output


@pytest.mark.slow
def test_a_finished_run_of_another_recipe_in_the_sweeps_place_is_not_adopted(
        tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """A run folder the sweep did not make (or made with other settings) is never taken as done."""
    out = tmp_path / "out"
    sweep = _one_run_sweep(tmp_path / "sweep", tiny_data_root, tiny_clip_dir, out)
    assert CliRunner().invoke(main, ["sweep", str(sweep)]).exit_code == 0
    run = out / "sketch" / "seed0" / "method=erm"
    (run / "sweep.json").unlink()  # as if the record were lost, and the run were someone else's:
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("steps: 6", "steps: 7"))
    before = (run / "results.json").read_bytes()
    result = CliRunner().invoke(main, ["sweep", str(sweep)])
    assert result.exit_code == 1 and "failed" in result.output
    log = next((out / "logs").glob("sketch__seed0__method=erm.log")).read_text()
    assert "holds a finished run that this sweep's recipe would not make" in log
    assert (run / "results.json").read_bytes() == before


def _run_result(name: str, order: int, val_mean: float, target_acc: float, last: dict[str, float],
                **kwargs):
    from rise_edge.sweep.collect import RunResult

    return RunResult(name, "shapes", "rise", kwargs.get("variant", ""), "sketch", 0, order, {},
                     val_mean, target_acc, last.get("target_out/sketch"),
                     last.get("target_in/sketch"), None)


def test_oracle_is_domainbeds_test_domain_validation_not_the_best_step(tmp_path: Path) -> None:
    """A constructed sweep where the best target accuracy over steps (what the oracle row used to
    report) and DomainBed's oracle (last step, selected on the target's out part, scored on its
    in part) disagree: collect reports the latter."""
    from rise_edge.sweep.collect import _last_evaluation, tables

    logs = {"a": [{"target_out/sketch": 0.90, "target_in/sketch": 0.95},   # a peaks early...
                  {"target_out/sketch": 0.50, "target_in/sketch": 0.55}],  # ...and ends low
            "b": [{"target_out/sketch": 0.60, "target_in/sketch": 0.60},
                  {"target_out/sketch": 0.70, "target_in/sketch": 0.65}]}
    runs = []
    for order, (name, evals) in enumerate(logs.items()):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": 1.0}) + "\n" + json.dumps({"step": i + 1, "eval": e})
            + "\n" for i, e in enumerate(evals)))
        runs.append(_run_result(name, order, 0.8 - 0.1 * order, 0.5, _last_evaluation(folder)))
    best_over_steps = max(v for evals in logs.values() for e in evals for v in e.values())
    row = tables(runs)["shapes"]["methods"]["rise"]
    assert row["oracle"]["sketch"][0] == pytest.approx(65.0)  # b's last step, in part
    assert row["oracle"]["sketch"][0] != pytest.approx(100 * best_over_steps)
    assert row["training"]["sketch"][0] == pytest.approx(50.0)  # a: best source validation


def test_selection_ties_go_to_the_first_grid_point_and_compared_fields_are_rows() -> None:
    from rise_edge.sweep.collect import tables

    last = {"target_out/sketch": 0.5, "target_in/sketch": 0.5}
    runs = [_run_result("second", 1, 0.8, 0.30, last), _run_result("first", 0, 0.8, 0.40, last),
            _run_result("other", 2, 0.9, 0.90, last, variant="head=rise")]
    methods = tables(runs)["shapes"]["methods"]
    assert methods["rise"]["training"]["sketch"][0] == pytest.approx(40.0)  # tie: grid order
    assert methods["rise"]["oracle"]["sketch"][0] == pytest.approx(50.0)
    assert methods["rise (head=rise)"]["training"]["sketch"][0] == pytest.approx(90.0)  # own row


def test_tied_grid_fields_expand_as_one_choice_each(tmp_path: Path, tiny_data_root: Path) -> None:
    from rise_edge.sweep.launch import expand, load_sweep

    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{root: '{tiny_data_root}', dataset: {TINY_DATASET}}}\nloss: {{method: kd}}\n")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("base: base.yaml\ntargets: [sketch]\nseeds: [0]\ngrid:\n  weights:\n"
                          "    - {loss.w_kd: 0.9, loss.w_ce: 0.1}\n    - {loss.w_kd: 0.8, loss.w_ce: 0.2}\n"
                          "  optim.lr: [0.1, 0.2]\ncompare: [optim.lr]\n")
    sweep = load_sweep(sweep_file)
    assert sweep.compare == ("optim.lr",)
    runs = expand(sweep)
    # The copy beside the runs (what collect reads) keeps the compared fields.
    from rise_edge.sweep.launch import SWEEP_COPY, _write_copy

    _write_copy(dataclasses.replace(sweep, output_dir=tmp_path / "out"))
    copy = load_sweep(tmp_path / "out" / SWEEP_COPY)
    assert copy.compare == ("optim.lr",) and copy.hash == sweep.hash
    assert [r.point for r in runs] == [
        {"loss.w_kd": 0.9, "loss.w_ce": 0.1, "optim.lr": 0.1},
        {"loss.w_kd": 0.9, "loss.w_ce": 0.1, "optim.lr": 0.2},
        {"loss.w_kd": 0.8, "loss.w_ce": 0.2, "optim.lr": 0.1},
        {"loss.w_kd": 0.8, "loss.w_ce": 0.2, "optim.lr": 0.2}]
    assert runs[0].name == "sketch/seed0/w_kd=0.9_w_ce=0.1_lr=0.1"


@pytest.mark.parametrize("data_set", ["pacs", "vlcs", "officehome", "terra"])
def test_the_official_rise_grids_are_six_configurations_per_target(data_set: str) -> None:
    """RISE's released per-data-set grid: two (w_kd, w_ce) pairs x three w_dist, every target."""
    from rise_edge.sweep.launch import expand, load_sweep

    sweep = load_sweep(REPO / "benchmarks" / "sweeps" / f"rise_grid_{data_set}.yaml")
    runs = expand(sweep)
    assert len(sweep.targets) == 4 and sweep.seeds == (0, 1, 2)
    for target in sweep.targets:
        points = [r.point for r in runs if r.target == target and r.seed == 0]
        assert len(points) == 6 and len({json.dumps(p, sort_keys=True) for p in points}) == 6
        assert {p["loss.w_dist"] for p in points} == {0.5, 1.0, 2.0}
        assert all(p["loss.w_kd"] + p["loss.w_ce"] == pytest.approx(1.0) for p in points)


def test_collect_names_a_damaged_run_record_in_one_line(tmp_path: Path) -> None:
    """A damaged metrics.jsonl or results.json of a finished run stops collect with one line naming
    the file, never a JSONDecodeError or KeyError."""
    from rise_edge.errors import UserError
    from rise_edge.sweep.collect import _last_evaluation, _score

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "ev')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not JSON"):
        _last_evaluation(tmp_path)
    for results in ({}, {"accuracy": {"val_mean": "0.9"}}, {"accuracy": {"val_mean": 7}}, []):
        with pytest.raises(UserError, match=r"results.json: accuracy.val_mean must be a number"):
            _score(results, "val_mean", tmp_path / "results.json")
    assert _score({"accuracy": {"val_mean": 0.5}}, "val_mean", tmp_path / "results.json") == 0.5


def _erm_sweep(folder: Path, data_root: Path, out: Path, seeds: int, steps: list[int]) -> Path:
    """A teacherless sweep (ERM) of `seeds` seeds with train.steps as its grid: runs of chosen lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(
        f"data: {{root: '{data_root}', dataset: {TINY_DATASET}, val_fraction: 0.25, num_workers: 0}}\n"
        "student: {model: test_resnet, pretrained: none, image_size: 32}\n"
        "train: {batch_size: 8}\n")
    sweep = folder / "sweep.yaml"
    sweep.write_text(f"base: base.yaml\ntargets: [sketch]\nseeds: {list(range(seeds))}\n"
                     f"grid: {{train.steps: {steps}}}\nset: {{train.eval_every: 2}}\n"
                     f"output_dir: '{out}'\n")
    return sweep


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line names `text` (the sweep's runs name their spec files)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.slow
def test_an_interrupted_sweep_starts_no_run_and_leaves_none_running(tiny_data_root: Path,
                                                                     tmp_path: Path) -> None:
    """Ctrl-C as a run ends: the worker thread that ran it must not start the next run, and every
    run still going is stopped before the sweep returns (it used to wait for a whole late run)."""
    from rise_edge.sweep.launch import LaunchResult, _local_pool, expand, load_sweep

    out = tmp_path / "out"
    sweep = load_sweep(_erm_sweep(tmp_path / "sweep", tiny_data_root, out, seeds=2, steps=[2, 100000]))
    short, long_a, short_b, long_b = expand(sweep, threads=1)
    out.mkdir()

    def interrupt_at_first_end(line: str) -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _local_pool([short, long_a, long_b, short_b], out, 2, (), LaunchResult(4), interrupt_at_first_end)
    assert time.monotonic() - started < 120
    assert _processes_naming(str(out / "logs")) == []
    assert (Path(short.run_dir) / "results.json").is_file()
    assert not (Path(long_a.run_dir) / "results.json").exists()
    assert not (Path(long_b.run_dir) / "results.json").exists()


@pytest.mark.slow
def test_a_sweep_interrupted_at_many_moments_stops_at_once_and_resumes(tiny_data_root: Path,
                                                                      tmp_path: Path) -> None:
    """Ctrl-C to the whole process group (what a terminal sends) at moments from start-up to mid-run,
    ten times: each time the sweep exits within seconds leaving no process behind, and the sweep
    run again afterwards finishes every run, retraining none that had finished."""
    out = tmp_path / "out"
    sweep = _erm_sweep(tmp_path / "sweep", tiny_data_root, out, seeds=4, steps=[4, 40])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for moment in (0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0):
        process = subprocess.Popen([sys.executable, "-m", "rise_edge.cli", "sweep", str(sweep),
                                    "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(moment)
        os.killpg(process.pid, signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"interrupted {moment} s in, the sweep had not stopped 60 s later")
        # 130, or killed by the SIGINT itself when it lands before Python's handler is in place:
        # a shell reports both as status 130.
        assert process.returncode in (0, 130, -signal.SIGINT), (moment, err.decode())
        assert b"Traceback" not in err, err.decode()
        with pytest.raises(ProcessLookupError):  # nothing of the sweep's process group lives on
            os.killpg(process.pid, 0)
    before = _finished(out)
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--workers", "2"])
    assert result.exit_code == 0, result.output
    after = _finished(out)
    assert len(after) == 8 and all(after[name] == mtime for name, mtime in before.items())


# -- SLURM: the sbatch script submitit itself writes, submitted to a fake sbatch --


def _fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: str = "") -> Path:
    """sbatch and srun on PATH (submitit checks for srun): sbatch keeps each script it is given in
    the returned folder and answers as SLURM does, or with `refuse` fails as sbatch does."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    answer = (f"echo 'sbatch: error: {refuse}' >&2; exit 1" if refuse
              else "echo 'Submitted batch job 4242'")
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nfor last; do :; done\ncp \"$last\" \"{scripts}/$(ls '{scripts}' | wc -l).sh\"\n"
        f"{answer}\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def _no_waiting(monkeypatch: pytest.MonkeyPatch, interrupt: bool = False) -> list[str]:
    """The sweep submits but does not wait for the (fake) jobs: the job ids it would wait for are
    collected, then it returns, or sees Ctrl-C."""
    from rise_edge.sweep import launch as launch_module

    waited: list[str] = []

    def wait(jobs: list[tuple[Any, Any]], result: Any, log: Any) -> None:
        waited.extend(job.job_id for _, job in jobs)
        if interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(launch_module, "_wait_for_jobs", wait)
    return waited


def _sbatch_lines(scripts: Path) -> list[str]:
    """The #SBATCH lines of the one script sbatch was given (one array, not a job per run)."""
    written = sorted(scripts.iterdir())
    assert len(written) == 1, [p.read_text() for p in written]
    return [line for line in written[0].read_text().splitlines() if line.startswith("#SBATCH")]


def test_a_cpu_sweep_on_slurm_is_one_array_of_workers_at_once_asking_no_gpu(
        tiny_data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 runs, --workers 2: one sbatch script, `--array=0-3%2` (SLURM honours the limit for arrays
    only); the runs train on the CPU, so no GPU is asked for. Ctrl-C says how to cancel the array."""
    scripts = _fake_slurm(tmp_path, monkeypatch)
    waited = _no_waiting(monkeypatch, interrupt=True)
    sweep = _erm_sweep(tmp_path / "sweep", tiny_data_root, tmp_path / "out", seeds=2, steps=[2, 4])
    sweep.write_text(sweep.read_text().replace("{train.eval_every: 2}",
                                               "{train.eval_every: 2, train.device: cpu}"))
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--launcher", "slurm", "--workers", "2",
                                       "--threads", "3"])
    lines = _sbatch_lines(scripts)
    assert "#SBATCH --array=0-3%2" in lines, lines
    assert "#SBATCH --cpus-per-task=3" in lines, lines
    assert not [line for line in lines if "gpu" in line or "gres" in line], lines
    assert not [line for line in lines if line.startswith(("#SBATCH --mem", "#SBATCH --partition"))]
    assert waited == [f"4242_{i}" for i in range(4)]
    assert result.exit_code == 130, result.output
    assert "scancel 4242" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("device, options, asked", [
    ("auto", [], "#SBATCH --gpus-per-node=1"),
    ("cuda", ["--gpus-per-job", "2"], "#SBATCH --gpus-per-node=2"),
    ("auto", ["--gpus-per-job", "0"], None),
])
def test_a_gpu_sweep_on_slurm_asks_for_its_gpus_memory_and_partition(
        device: str, options: list[str], asked: str | None, tiny_data_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = _fake_slurm(tmp_path, monkeypatch)
    _no_waiting(monkeypatch)
    sweep = _erm_sweep(tmp_path / "sweep", tiny_data_root, tmp_path / "out", seeds=3, steps=[2])
    sweep.write_text(sweep.read_text().replace("{train.eval_every: 2}",
                                               f"{{train.eval_every: 2, train.device: {device}}}"))
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--launcher", "slurm", "--workers", "5",
                                       "--mem", "32gb", "--partition", "gpu", *options])
    assert result.exit_code == 0, result.output
    lines = _sbatch_lines(scripts)
    assert "#SBATCH --array=0-2%3" in lines, lines  # never more at once than there are runs
    assert "#SBATCH --mem=32G" in lines and "#SBATCH --partition=gpu" in lines, lines
    gpu_lines = [line for line in lines if "gpu" in line.split("=")[0] or "gres" in line]
    assert gpu_lines == ([asked] if asked else []), lines


@pytest.mark.parametrize("device, options, needle", [
    ("auto", ["--launcher", "slurm", "--mem", "32 gigs"], "--mem takes the memory"),
    ("auto", ["--launcher", "slurm", "--mem", "1.5G"], "e.g. 32G or 500M; got '1.5G'"),
    ("auto", ["--launcher", "slurm", "--partition", "gpu a100"], "--partition takes a SLURM"),
    ("auto", ["--mem", "32G"], "--mem applies to --launcher slurm only"),
    ("auto", ["--launcher", "submitit-local", "--gpus-per-job", "1"], "--gpus-per-job applies to"),
    ("cpu", ["--launcher", "slurm", "--gpus-per-job", "1"], "train on the CPU"),
    ("cuda", ["--launcher", "slurm", "--gpus-per-job", "0"], "fails without a GPU"),
])
def test_bad_slurm_job_options_are_one_line(device: str, options: list[str], needle: str,
                                            tiny_data_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = _fake_slurm(tmp_path, monkeypatch)
    sweep = _erm_sweep(tmp_path / "sweep", tiny_data_root, tmp_path / "out", seeds=2, steps=[2])
    sweep.write_text(sweep.read_text().replace("{train.eval_every: 2}",
                                               f"{{train.eval_every: 2, train.device: {device}}}"))
    result = CliRunner().invoke(main, ["sweep", str(sweep), *options])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert needle in result.output, result.output
    assert not list(scripts.iterdir())


@pytest.mark.parametrize("refuse, needle", [
    ("", "srun is not on PATH"),  # no SLURM here at all
    ("invalid partition specified: gpux", "sbatch refused the sweep's job array: sbatch: error: "
                                          "invalid partition specified: gpux"),
])
def test_slurm_missing_or_refusing_is_one_line(refuse: str, needle: str, tiny_data_root: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if refuse:
        _fake_slurm(tmp_path, monkeypatch, refuse)
    else:
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no srun
    _no_waiting(monkeypatch)
    sweep = _erm_sweep(tmp_path / "sweep", tiny_data_root, tmp_path / "out", seeds=2, steps=[2])
    # --slurm-partition: --partition's older name, still taken
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--launcher", "slurm",
                                       "--slurm-partition", "gpux"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output
    assert [line for line in result.output.splitlines() if "error" in line] == \
        [result.output.strip().splitlines()[-1]]
