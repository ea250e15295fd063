"""Hostile inputs: each case ends in one line without a traceback, a non-zero exit status, and
everything the user had left as it was. Non-finite values, a run directory owned by one process at a
time (and freed by a kill -9), folders the demo did not make, a run directory that is a file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_DATASET, train_cli_args

from rise_edge.cli import main
from rise_edge.errors import UserError
from rise_edge.files import run_lock


def _args(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_cli_args(data_root, run_dir, "--set", "train.steps=4", *extra)


def _one_clean_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.replace("\r", "\n").splitlines()
             if line.strip() and "%|" not in line]  # tqdm progress lines aside
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=.inf", "loss.tau=-.inf",
                                      "optim.weight_decay=.NaN"])
def test_non_finite_recipe_values_are_rejected(tiny_data_root: Path, recipe_file: Path,
                                               tmp_path: Path, override: str) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, run_dir, "--set", override)])
    _one_clean_line(result, override.split("=")[0], "finite")
    assert not run_dir.exists()


@pytest.mark.parametrize("flag", [["--budget", "nan"], ["--budget", "inf"],
                                  ["--set", "export.qat_lr=.nan"]])
def test_non_finite_export_flags_are_rejected(tiny_run: Path, flag: list[str]) -> None:
    before = sorted(p.name for p in tiny_run.iterdir())
    result = CliRunner().invoke(main, ["export", str(tiny_run), "--int8", "--quiet", *flag])
    _one_clean_line(result, "finite")
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing written


def test_a_loss_that_becomes_nan_stops_training_and_saves_no_nan_student(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(
        tiny_data_root, run_dir, "--set", "optim.lr=1000", "--set", "train.steps=20",
        "--set", "train.eval_every=20")])
    _one_clean_line(result, "training loss became", "optim.lr")
    assert not (run_dir / "student.safetensors").exists()
    assert not (run_dir / "results.json").exists()


def test_two_processes_cannot_own_one_run_directory(tiny_data_root: Path, recipe_file: Path,
                                                    tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "new-run"
    with run_lock(run_dir, "train"):
        result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(tiny_data_root, run_dir)])
        _one_clean_line(result, "in use by rise-edge train (pid")
        assert not run_dir.exists() or not any(run_dir.iterdir())  # the second wrote nothing
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    with run_lock(tiny_run, "export"):
        for command in (["export", str(tiny_run), "--quiet"], ["bench", str(tiny_run), "--quiet"],
                        ["train", str(recipe_file), *_args(tiny_data_root, tiny_run)]):
            _one_clean_line(CliRunner().invoke(main, command), "in use by rise-edge export")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before
    # Released: the same run can be exported now.
    assert CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]).exit_code == 0


def test_a_killed_holder_does_not_keep_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys; from pathlib import Path; from rise_edge.files import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r}), 'train'):\n"
        "    print('held', flush=True); signal.pause()")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"in use by rise-edge train \(pid {holder.pid}\)"):
        with run_lock(run_dir, "export"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with run_lock(run_dir, "export"):
                break
        except UserError:
            assert time.time() < deadline, "the lock outlived its process"
            time.sleep(0.05)


def test_a_run_directory_that_is_a_file_is_refused(tiny_data_root: Path, recipe_file: Path,
                                                   tmp_path: Path) -> None:
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("my notes")
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, not_a_folder)])
    _one_clean_line(result, "is a file")
    assert not_a_folder.read_text() == "my notes"


def test_the_demo_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    from rise_edge.demo.story import DEMO_MARK, _clear_own_run

    mine = tmp_path / "out" / "erm"
    mine.mkdir(parents=True)
    (mine / "weights.pt").write_bytes(b"someone's work")
    with pytest.raises(UserError, match="never deletes what it did not make"):
        _clear_own_run(mine)
    assert (mine / "weights.pt").read_bytes() == b"someone's work"
    a_file = tmp_path / "out" / "rise"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match="never deletes what it did not make"):
        _clear_own_run(a_file)
    assert a_file.read_text() == "not a folder"

    ours = tmp_path / "out2" / "erm"  # an unfinished run the demo made: cleared for retraining
    ours.mkdir(parents=True)
    (ours / DEMO_MARK).write_text("")
    (ours / "resume.safetensors").write_bytes(b"")
    _clear_own_run(ours)
    assert not ours.exists()


def test_demo_out_holding_a_users_runs_is_refused_from_the_command_line(tmp_path: Path,
                                                                       monkeypatch) -> None:
    out = tmp_path / "out"
    (out / "erm").mkdir(parents=True)
    (out / "erm" / "notes.txt").write_text("keep me")
    # World and teacher are the cached ones the demo builds; here they are stood in for, so the
    # test reaches the step that would have deleted the folder.
    monkeypatch.setattr("rise_edge.data.domains.build_splits", lambda *a, **k: _FakeSplits())
    monkeypatch.setattr("rise_edge.registry.BUILT_TEACHERS",
                        {"rise-edge-demo-clip": lambda: _fake_teacher(tmp_path)})
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 2 and "never deletes what it did not make" in result.output
    assert "Traceback" not in result.output
    assert (out / "erm" / "notes.txt").read_text() == "keep me"


class _FakeSplits:
    classes = ("a", "b")
    source_domains = ("photo", "cartoon", "painting")
    target_domain = "sketch"
    dataset_dir = Path("demo-world")


def _fake_teacher(tmp_path: Path) -> Path:
    folder = tmp_path / "teacher"
    folder.mkdir(exist_ok=True)
    (folder / "zero_shot.json").write_text('{"accuracy": {"rise": {}}}')
    return folder


def test_a_section_written_twice_is_refused_at_its_line(tmp_path: Path, tiny_data_root: Path) -> None:
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("optim:\n  lr: 0.1\nloss:\n  w_ce: 1.0\noptim:\n  lr: 0.01\n")
    result = CliRunner().invoke(main, ["train", str(recipe), *_args(tiny_data_root, tmp_path / "r")])
    _one_clean_line(result, "'optim' is written twice", "line 5")


def test_a_recipe_that_is_not_utf8_is_refused(tmp_path: Path, tiny_data_root: Path) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("loss:\n  w_ce: 1.0  # caf\u00e9\n".encode("latin-1"))
    result = CliRunner().invoke(main, ["train", str(recipe), *_args(tiny_data_root, tmp_path / "r")])
    _one_clean_line(result, "UTF-8")


def test_a_full_disk_is_one_line_not_a_traceback(tiny_data_root: Path, recipe_file: Path,
                                                 tmp_path: Path, monkeypatch) -> None:
    import errno

    import rise_edge.train.loop

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rise_edge.train.loop, "write_text_atomic", full)
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, tmp_path / "r")])
    _one_clean_line(result, "No space left on device", ".rise-edge-run")  # the first file train writes


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".rise-edge-run").write_text("")  # all a kill left: the marker, recipe and log
    (run_dir / "recipe.yaml").write_text("loss:\n  w_ce: 1.0\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    resumed = CliRunner().invoke(main, ["train", str(recipe_file),
                                        *_args(tiny_data_root, run_dir), "--resume"])
    _one_clean_line(resumed, "interrupted before its first checkpoint", "without --resume")
    again = CliRunner().invoke(main, ["train", str(recipe_file), *_args(tiny_data_root, run_dir)])
    assert again.exit_code == 0, again.output
    assert (run_dir / "results.json").is_file()
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and '"step": 1, "loss": 1.0' not in steps[0]  # the stale log was not kept


def test_a_damaged_recipe_in_the_run_directory_stops_resume_with_one_line(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("data: [unclosed\n")
    (run_dir / "resume.safetensors").write_bytes(b"")
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(tiny_data_root, run_dir),
                                       "--resume"])
    _one_clean_line(result, "recipe.yaml is unreadable")


_GOOD_RECORD = {"format": "onnx", "precision": "fp32", "path": "model.onnx", "status": "ok",
                "sha256": "0" * 64}


@pytest.mark.parametrize("change, needle", [
    ({"status": 3}, "artefacts.onnx-fp32.status must be one of ok, failed, skipped, unavailable, stale, got 3"),
    ({"precision": "int3"}, "artefacts.onnx-fp32.precision must be 'fp32' (what onnx-fp32 is)"),
    ({"precision": None}, "artefacts.onnx-fp32.precision must be a string"),
    ({"sha256": 5}, "artefacts.onnx-fp32.sha256 must be 64 hexadecimal digits, got 5"),
    ({"student_sha256": "abc"}, "artefacts.onnx-fp32.student_sha256 must be 64 hexadecimal digits"),
    ({"path": None}, "artefacts.onnx-fp32.path must be the artefact's file name"),
    ({"schema": 99}, "schema 99 is not the export record this rise-edge reads"),
])
def test_a_tampered_field_of_an_export_record_is_one_line_naming_it(tiny_run: Path, change: dict,
                                                                     needle: str) -> None:
    """Each field bench and the bundle act on is checked on read: a wrong one names the file, the
    artefact, the field and what was expected, before anything runs or is written."""
    record = {k: v for k, v in {**_GOOD_RECORD, **change}.items() if k != "schema"}
    document = {"schema": change.get("schema", 1), "artefacts": {"onnx-fp32": record}}
    (tiny_run / "export").mkdir(exist_ok=True)
    (tiny_run / "export" / "export.json").write_text(json.dumps(document))
    before = sorted(p.name for p in tiny_run.rglob("*"))
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--quiet"])
    _one_clean_line(result, "export.json", needle)
    assert sorted(p.name for p in tiny_run.rglob("*")) == before


@pytest.mark.parametrize("content", ["{not json", "[]", '{"artefacts": 5}'])
def test_a_malformed_export_json_is_one_line(tiny_run: Path, content: str) -> None:
    (tiny_run / "export").mkdir(exist_ok=True)
    (tiny_run / "export" / "export.json").write_text(content)
    for command in (["bench", str(tiny_run), "--quiet"], ["export", str(tiny_run), "--quiet"]):
        result = CliRunner().invoke(main, command)
        _one_clean_line(result, "export.json")
    assert (tiny_run / "export" / "export.json").read_text() == content  # left for the user to see


def _train_tiny(data_root: Path, recipe_file: Path, run_dir: Path, *extra: str) -> None:
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(data_root, run_dir, *extra)])
    assert result.exit_code == 0, result.output


def test_export_and_bench_use_the_splits_training_recorded(tiny_data_root: Path, recipe_file: Path,
                                                           tmp_path: Path) -> None:
    import json

    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
    bad = data / TINY_DATASET / "cartoon" / "circle" / "zz-truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a header and nothing else
    run_dir = tmp_path / "run"
    _train_tiny(data, recipe_file, run_dir, "--set", "data.skip_bad_images=true")
    record = json.loads((run_dir / "splits.json").read_text())
    assert record["skipped_images"] == ["cartoon/circle/zz-truncated.png"]
    recorded_train = {p for samples in record["train"].values() for p, _ in samples}
    assert "cartoon/circle/zz-truncated.png" not in recorded_train
    result = CliRunner().invoke(main, ["export", str(run_dir), "--int8", "--quiet",
                                       "--set", "export.calibration_size=12",
                                       "--set", "export.fidelity_images=12"])
    assert result.exit_code == 0, result.output  # never tripped over the image training skipped
    calibration = json.loads((run_dir / "export" / "export.json").read_text())["calibration"]["files"]
    assert set(calibration) <= {f"{p}" for p in recorded_train}
    bench = CliRunner().invoke(main, ["bench", str(run_dir), "--domain", "all", "--batch", "1",
                                      "--iterations", "1", "--warmup", "0", "--quiet"])
    assert bench.exit_code == 0, bench.output
    report = json.loads((run_dir / "bench" / "report.json").read_text())
    scored = {d["name"]: d["images"] for d in report["domains"]} if "domains" in report else {}
    if scored:
        assert scored["cartoon"] == len(record["val"]["cartoon"])


@pytest.mark.slow
def test_data_that_moved_is_found_again_with_data_root(tiny_data_root: Path, recipe_file: Path,
                                                       tmp_path: Path) -> None:
    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
    run_dir = tmp_path / "run"
    _train_tiny(data, recipe_file, run_dir)
    moved = tmp_path / "elsewhere"
    data.rename(moved)
    _one_clean_line(CliRunner().invoke(main, ["bench", str(run_dir), "--quiet"]), "--set data.root=")
    assert not (run_dir / "bench").exists()
    # Not a failed artefact (exit 1): the data is the user's to point at (one line, exit 2).
    _one_clean_line(CliRunner().invoke(main, ["export", str(run_dir), "--quiet"]), "--set data.root=")
    assert not (run_dir / "export").exists()
    for command in (["export", str(run_dir), "--quiet"], ["bench", str(run_dir), "--quiet"]):
        result = CliRunner().invoke(main, [*command, "--set", f"data.root={moved}"])
        assert result.exit_code == 0, result.output
    wrong = CliRunner().invoke(main, ["export", str(run_dir), "--set", "data.target_domain=photo"])
    _one_clean_line(wrong, "only data.root can change")


@pytest.mark.slow
def test_a_failed_reexport_never_hides_intact_artefacts_from_bench(tiny_run: Path) -> None:
    import json

    first = CliRunner().invoke(main, ["export", str(tiny_run), "--int8", "--quiet",
                                      "--set", "export.calibration_size=12"])
    assert first.exit_code == 0, first.output
    before = json.loads((tiny_run / "export" / "export.json").read_text())["artefacts"]
    again = CliRunner().invoke(main, ["export", str(tiny_run), "--int8", "--quiet",
                                      "--set", "export.parity_tolerance=1e-12"])
    assert again.exit_code == 1 and "Traceback" not in again.output
    after = json.loads((tiny_run / "export" / "export.json").read_text())["artefacts"]
    fp32 = after["onnx-fp32"]
    assert fp32["status"] == "ok" and fp32["sha256"] == before["onnx-fp32"]["sha256"]
    assert fp32["last_attempt"]["status"] == "failed"
    assert "parity_tolerance" in fp32["last_attempt"]["reason"]
    assert after["onnx-int8"]["status"] == "ok"  # remade from the intact FP32 graph
    bench = CliRunner().invoke(main, ["bench", str(tiny_run), "--batch", "1", "--iterations", "1",
                                      "--warmup", "0", "--quiet"])
    assert bench.exit_code == 0, bench.output
    rows = {r["engine"]: r for r in json.loads((tiny_run / "bench" / "report.json").read_text())["rows"]}
    assert rows["onnx-fp32"]["status"] == rows["onnx-int8"]["status"] == "ok"


def test_shipped_recipes_live_in_the_package_and_train_takes_their_names(tmp_path: Path) -> None:
    from rise_edge.config import load_recipe, resolve_recipe, shipped_recipes

    shipped = shipped_recipes()
    assert {"demo", "pacs_erm_lite0", "pacs_rise_lite0"} <= set(shipped)
    for name, path in shipped.items():
        assert path.parent.name == "recipes" and path.parent.parent.name == "rise_edge"
        text = path.read_text()
        assert "shared/" not in text and "/work" not in text  # no machine's folders in a recipe
        load_recipe(path)
    assert resolve_recipe("pacs_erm_lite0") == shipped["pacs_erm_lite0"]
    assert resolve_recipe("pacs_erm_lite0.yaml") == shipped["pacs_erm_lite0"]
    own = tmp_path / "pacs_erm_lite0.yaml"  # a file the user names wins over a shipped name
    own.write_text("loss:\n  w_ce: 1.0\n")
    assert resolve_recipe(own) == own
    with pytest.raises(UserError, match="did you mean the shipped recipe 'pacs_erm_lite0'"):
        resolve_recipe("pacs_erm_lit0")
    listing = CliRunner().invoke(main, ["recipes"])
    assert listing.exit_code == 0 and all(name in listing.output for name in shipped)


def test_the_data_root_comes_from_the_environment_and_split_lists_from_the_root(
        tiny_data_root: Path, tmp_path: Path, monkeypatch) -> None:
    from rise_edge.config import load_recipe
    from rise_edge.data.domains import build_splits

    overrides = [f"data.dataset={TINY_DATASET}", "data.target_domain=sketch", "data.num_workers=0"]
    monkeypatch.delenv("RISE_EDGE_DATA", raising=False)
    with pytest.raises(UserError, match="data.root is empty and RISE_EDGE_DATA is not set"):
        build_splits(load_recipe(None, overrides).data, progress=False)
    root = Path(shutil.copytree(tiny_data_root, tmp_path / "root"))
    lists = root / "shapes-splits"
    lists.mkdir()
    for domain in ("cartoon", "photo"):
        files = sorted((root / TINY_DATASET / domain).rglob("*.png"))
        classes = sorted(p.name for p in (root / TINY_DATASET / domain).iterdir())
        lines = [f"{TINY_DATASET}/{p.relative_to(root / TINY_DATASET).as_posix()} "
                 f"{classes.index(p.parent.name) + 1}" for p in files]
        (lists / f"{domain}_train_kfold.txt").write_text("\n".join(lines[2:]) + "\n")
        (lists / f"{domain}_crossval_kfold.txt").write_text("\n".join(lines[:2]) + "\n")
    monkeypatch.setenv("RISE_EDGE_DATA", str(root))
    splits = build_splits(load_recipe(None, [*overrides, "data.split_lists=shapes-splits"]).data,
                          progress=False)
    assert splits.dataset_dir == root / TINY_DATASET
    assert all(len(splits.val[d]) == 2 for d in ("cartoon", "photo"))


@pytest.mark.parametrize("opset", ["99", "12", "1.5"])
def test_an_out_of_range_opset_is_one_line_and_keeps_the_model(tiny_run: Path, opset: str) -> None:
    assert CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]).exit_code == 0
    model = tiny_run / "export" / "model.onnx"
    good = model.read_bytes()
    result = CliRunner().invoke(main, ["export", str(tiny_run), "--quiet", "--set",
                                       f"export.opset={opset}"])
    _one_clean_line(result, "export.opset")
    assert model.read_bytes() == good


def test_a_record_pointing_outside_the_export_folder_is_not_run(tiny_run: Path, tmp_path: Path) -> None:
    import json

    assert CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]).exit_code == 0
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(tiny_run / "export" / "model.onnx", outside)
    record_path = tiny_run / "export" / "export.json"
    record = json.loads(record_path.read_text())
    record["artefacts"]["onnx-fp32"]["path"] = f"../../{outside.name}"
    record_path.write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--batch", "1", "--iterations", "1",
                                       "--warmup", "0", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = {r["engine"]: r for r in json.loads((tiny_run / "bench" / "report.json").read_text())["rows"]}
    assert rows["onnx-fp32"]["status"] == "tampered" and rows["onnx-fp32"]["latency"] == []


@pytest.mark.slow
def test_ctrl_c_during_export_exits_130_and_leaves_no_temporary_files(tiny_run: Path) -> None:
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rise_edge.cli", "export", str(tiny_run), "--int8", "--qat",
         "--qat-steps", "400", "--set", "export.qat_eval_every=2", "--set", "export.qat_batch_size=8",
         "--set", "export.calibration_size=12", "--set", "export.fidelity_images=12"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C reaches the export whatever started pytest: a shell's background job (CI run as
        # `... &`) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list((tiny_run / "export" / "qat").glob("*/state.safetensors")):
        assert process.poll() is None and time.time() < deadline, "QAT never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-1000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    export = tiny_run / "export"
    assert not [p for p in export.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    records = json.loads((export / "export.json").read_text())["artefacts"]
    assert records["onnx-int8"]["status"] == "ok"  # what finished before Ctrl-C is kept
    again = subprocess.run([sys.executable, "-m", "rise_edge.cli", "export", str(tiny_run), "--int8",
                            "--qat", "--qat-steps", "6", "--quiet"], env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-1000:]


# ---------------------------------------------------------------------------------------------------
# A table of bad inputs to `train`: each is refused with one line naming the problem, and leaves no
# run directory behind.

def _png16(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 65535).astype("uint16")).save(
        folder / "cartoon" / "circle" / "sixteen-bit.png")


def _huge(folder: Path) -> None:
    from PIL import Image
    Image.new("L", (15000, 15000)).save(folder / "photo" / "square" / "huge.png")  # 225 MP: a bomb


def _empty_class(folder: Path) -> None:
    shutil.rmtree(folder / "photo" / "square")
    (folder / "photo" / "square").mkdir()


def _extra_class(folder: Path) -> None:
    shutil.copytree(folder / "photo" / "square", folder / "photo" / "hexagon")


BAD_TRAIN_INPUTS = {
    # name: (data set change, extra options, what the one line must say)
    "data root is a file": (None, ["--set", "data.root={file}"], "is not a folder"),
    "unknown target": (None, ["--set", "data.target_domain=mars"], "domain 'mars' not found"),
    "target is a source": (None, ["--set", "data.source_domains=[photo, sketch]"],
                           "also listed in data.source_domains"),
    "negative batch": (None, ["--set", "train.batch_size=-1"], "'train.batch_size' must be"),
    "batch larger than the data": (None, ["--set", "train.batch_size=60000"], "lower it"),
    "string for a number": (None, ["--set", "optim.lr=fast"], "'optim.lr' must be a number"),
    "unknown key": (None, ["--set", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
    "unknown section": (None, ["--set", "optimiser.lr=0.1"], "unknown section 'optimiser'"),
    "no equals sign": (None, ["--set", "optim.lr"], "expected section.key=value"),
    "empty class folder": (_empty_class, [], "no images in 1 class folder"),
    "a class only one domain has": (_extra_class, [], "class sets differ"),
    "a decompression bomb": (_huge, [], "DecompressionBombError"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_bad_training_inputs_are_one_line_and_leave_no_run(case: str, tiny_data_root: Path,
                                                           recipe_file: Path, tmp_path: Path) -> None:
    change, extra, needle = BAD_TRAIN_INPUTS[case]
    data = tiny_data_root
    if change is not None:
        data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
        change(data / TINY_DATASET)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    run_dir = tmp_path / "run"
    options = [o.replace("{file}", str(a_file)) for o in extra]
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(data, run_dir, *options)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output
    assert not run_dir.exists()


def test_odd_but_readable_images_train(tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
    circles = data / TINY_DATASET / "cartoon" / "circle"
    _png16(data / TINY_DATASET)
    Image.new("CMYK", (40, 40), (0, 200, 0, 0)).save(circles / "cmyk.jpg")
    Image.new("P", (40, 40)).save(circles / "palette.png")
    (circles / "notes.txt").write_text("not an image: ignored")
    os.symlink(circles / "000.png", circles / "linked.png")
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(data, tmp_path / "run")])
    assert result.exit_code == 0, result.output


def test_a_dangling_link_is_ignored_and_a_bomb_skipped_when_asked(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
    os.symlink("/nonexistent/image.png", data / TINY_DATASET / "photo" / "circle" / "gone.png")
    _huge(data / TINY_DATASET)
    refused = CliRunner().invoke(main, ["train", str(recipe_file), *_args(data, tmp_path / "a")])
    assert refused.exit_code == 2 and "1 unreadable image(s)" in refused.output  # the link is no image
    assert "huge.png" in refused.output and "Traceback" not in refused.output
    skipped = CliRunner().invoke(main, ["train", str(recipe_file), *_args(
        data, tmp_path / "b", "--set", "data.skip_bad_images=true")])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 1 unreadable image(s)" in skipped.output


@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_damaged_student_file_is_one_line(tiny_run: Path, command: str) -> None:
    (tiny_run / "student.safetensors").write_bytes(b"garbage" * 10)
    _one_clean_line(CliRunner().invoke(main, [command, str(tiny_run), "--quiet"]),
                    "student.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("what", ["missing", "a file"])
@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_run_directory_that_is_missing_or_a_file(tmp_path: Path, command: str, what: str) -> None:
    path = tmp_path / "run"
    if what == "a file":
        path.write_text("x")
    _one_clean_line(CliRunner().invoke(main, [command, str(path)]), str(path))
    assert not path.exists() or path.read_text() == "x"


def test_demo_paths_that_are_files_are_one_line(tmp_path: Path, monkeypatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    monkeypatch.setattr("rise_edge.data.domains.build_splits", lambda *a, **k: _FakeSplits())
    monkeypatch.setattr("rise_edge.registry.BUILT_TEACHERS",
                        {"rise-edge-demo-clip": lambda: _fake_teacher(tmp_path)})
    result = CliRunner().invoke(main, ["demo", "--out", str(a_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert a_file.read_text() == "keep"


def test_the_demo_reuses_a_finished_run_whose_export_settings_changed(
        tiny_data_root: Path, tmp_path: Path) -> None:
    from conftest import tiny_recipe_overrides

    from rise_edge.config import load_recipe
    from rise_edge.demo.story import DEMO_MARK, train_or_reuse

    overrides = [*tiny_recipe_overrides(tiny_data_root), "train.steps=2"]
    run_dir = tmp_path / "out" / "erm"
    train_or_reuse(load_recipe(None, overrides), run_dir, progress=False)
    (run_dir / DEMO_MARK).unlink()  # as an older version left it
    finished = (run_dir / "results.json").stat().st_mtime_ns
    changed_export = load_recipe(None, [*overrides, "export.accuracy_budget=2.0", "export.qat=auto"])
    train_or_reuse(changed_export, run_dir, progress=False)
    assert (run_dir / "results.json").stat().st_mtime_ns == finished  # reused, not retrained
    with pytest.raises(UserError, match="never deletes what it did not make"):
        train_or_reuse(load_recipe(None, [*overrides, "train.seed=1"]), run_dir, progress=False)
    assert (run_dir / "results.json").stat().st_mtime_ns == finished


# ---------------------------------------------------------------------------------------------------
# Two demos at once, kill -9 at any moment of export and bench, and what such kills leave behind.

def test_a_second_demo_on_one_folder_is_refused_before_touching_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "erm").mkdir(parents=True)
    (out / "erm" / ".rise-edge-demo").write_text("")  # an unfinished demo run: the first is training it
    (out / "erm" / "resume.safetensors").write_bytes(b"in progress")
    with run_lock(out, "demo", noun="demo folder", clean=False):
        result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    _one_clean_line(result, "in use by rise-edge demo (pid")
    assert (out / "erm" / "resume.safetensors").read_bytes() == b"in progress"


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix == ".tmp" or p.name.startswith((".work-", ".ranges."))]


def test_temporaries_a_kill_left_are_removed_at_the_next_start(tiny_run: Path) -> None:
    export = tiny_run / "export"
    export.mkdir()
    (export / ".model.onnx.k3j2l1.tmp").write_bytes(b"half a model")
    (export / ".work-abc").mkdir()
    (export / ".work-abc" / "model.onnx").write_bytes(b"half")
    (export / "cache").mkdir()
    (export / "cache" / ".ranges.xyz").mkdir()
    keep = export / "notes.tmp.txt"  # not a name rise-edge writes: kept
    keep.write_text("mine")
    assert CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]).exit_code == 0
    assert _leftovers(tiny_run) == []
    assert keep.read_text() == "mine"


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_when_started(command: list[str], run_dir: Path, delay_s: float) -> None:
    """Start `command` on `run_dir`, wait until it holds the run (its work begins), then kill -9
    after delay_s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rise_edge.cli", *command], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = run_dir.parent / f".{run_dir.name}.rise-edge.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {process.pid})" in lock.read_text()):
        assert process.poll() is None and time.time() < deadline, "the command never started"
        time.sleep(0.01)
    time.sleep(delay_s)
    assert process.poll() is None, "the command finished before the kill: lengthen its work"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.4, 1.2])
def test_kill_9_at_any_moment_of_export_then_export_again(tiny_run: Path, delay_s: float) -> None:
    import json

    export = tiny_run / "export"
    _kill_when_started(["export", str(tiny_run), "--int8", "--quiet"], tiny_run, delay_s)
    record = export / "export.json"
    if record.exists():  # written atomically: whole or absent, never half
        for name, artefact in json.loads(record.read_text())["artefacts"].items():
            if artefact["status"] == "ok":
                assert _sha256(export / artefact["path"]) == artefact["sha256"], name
    again = CliRunner().invoke(main, ["export", str(tiny_run), "--int8", "--quiet"])
    assert again.exit_code == 0, again.output
    assert _leftovers(tiny_run) == []
    artefacts = json.loads(record.read_text())["artefacts"]
    assert {artefacts[n]["status"] for n in ("onnx-fp32", "onnx-int8")} == {"ok"}
    for artefact in artefacts.values():
        if artefact["status"] == "ok":
            assert _sha256(export / artefact["path"]) == artefact["sha256"]


@pytest.mark.slow
def test_kill_9_during_bench_keeps_the_last_report_whole_and_bench_runs_again(tiny_run: Path) -> None:
    import json

    assert CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]).exit_code == 0
    assert CliRunner().invoke(main, ["bench", str(tiny_run), "--quiet", "--iterations", "2"]
                              ).exit_code == 0
    report = tiny_run / "bench" / "report.json"
    first = report.read_bytes()
    _kill_when_started(["bench", str(tiny_run), "--quiet", "--domain", "all", "--iterations", "2000"],
                       tiny_run, 1.5)
    assert report.read_bytes() == first or json.loads(report.read_text())  # old or new, never half
    again = CliRunner().invoke(main, ["bench", str(tiny_run), "--quiet", "--iterations", "2"])
    assert again.exit_code == 0, again.output
    assert json.loads(report.read_text())["rows"] and _leftovers(tiny_run) == []


@pytest.mark.parametrize("tamper", ["class count", "not json", "no recipe"])
def test_a_student_file_with_a_tampered_header_is_one_line(tiny_run: Path, tamper: str) -> None:
    """The header's class count changed (tensors of another shape), its JSON broken, or its recipe
    gone: export and bench say which file and what, in one line, and change nothing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rise_edge.run_dir import _META_KEY

    weights = tiny_run / "student.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[_META_KEY])
    if tamper == "class count":
        meta["head"]["num_classes"] = 5
        header[_META_KEY] = json.dumps(meta)
    elif tamper == "not json":
        header[_META_KEY] = header[_META_KEY][:-10]
    else:
        meta.pop("recipe")
        header[_META_KEY] = json.dumps(meta)
    save_file(tensors, str(weights), metadata=header)
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    for command in (["export", str(tiny_run), "--quiet"], ["bench", str(tiny_run), "--quiet"]):
        _one_clean_line(CliRunner().invoke(main, command), "student.safetensors")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before


@pytest.mark.parametrize("given", [".", "project"])
def test_train_never_writes_into_a_folder_that_is_not_a_run_directory(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path, monkeypatch, given: str) -> None:
    """A user's own folder holding files of the names a run writes (recipe.yaml, metrics.jsonl,
    splits.json) and a temporary-looking file of theirs: train refuses it, and touches nothing."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("recipe.yaml", "metrics.jsonl", "splits.json", ".notes.tmp"):
        (project / name).write_text(f"the user's own {name}\n")
    monkeypatch.chdir(project if given == "." else tmp_path)
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in project.iterdir()}
    result = CliRunner().invoke(main, ["train", str(recipe_file), *_args(tiny_data_root, Path(given))])
    _one_clean_line(result, "holds files rise-edge did not write", "choose another --run-dir")
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in project.iterdir()} == before
    # An empty folder is fine, and becomes a run directory of ours.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, ["train", str(recipe_file),
                                     *_args(tiny_data_root, empty)]).exit_code == 0
    assert (empty / ".rise-edge-run").is_file()


@pytest.mark.parametrize("damage", ["moved", "label out of range", "label not an integer"])
def test_export_of_a_run_whose_data_moved_or_whose_splits_are_damaged_is_one_line(
        tiny_run: Path, tmp_path: Path, damage: str) -> None:
    """Not '1 artefact(s) failed' with exit 1: the data is the user's to fix, so one line and exit 2,
    before anything is written."""
    from rise_edge.data.domains import build_splits, splits_to_record
    from rise_edge.run_dir import open_run

    splits = tiny_run / "splits.json"  # as train writes it (the fixture's run predates the record)
    record = splits_to_record(build_splits(open_run(tiny_run).recipe.data, progress=False))
    if damage == "moved":
        record["dataset_dir"] = str(tmp_path / "gone" / Path(record["dataset_dir"]).name)
        needles = ("not at", "--set data.root=")
    else:
        domain = next(iter(record["train"]))
        record["train"][domain][0][1] = 7 if damage == "label out of range" else "dog"
        needles = ("splits.json is damaged", "not a class index")
    splits.write_text(json.dumps(record))
    before = sorted(p.name for p in tiny_run.iterdir())
    _one_clean_line(CliRunner().invoke(main, ["export", str(tiny_run), "--quiet"]), *needles)
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # no export/ folder made


def test_bench_whose_report_path_is_a_folder_changes_nothing(tiny_run: Path) -> None:
    """report.json is a folder: one line, exit 2, and the plots and report.md beside it are as they
    were (before, bench replaced the plots and then failed)."""
    assert CliRunner().invoke(main, ["bench", str(tiny_run), "--quiet", "--iterations", "2",
                                     "--warmup", "0"]).exit_code == 0
    folder = tiny_run / "bench"
    (folder / "report.json").unlink()
    (folder / "report.json").mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--quiet", "--iterations", "2",
                                       "--warmup", "0"])
    _one_clean_line(result, "report.json is a folder", "nothing was changed")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.parametrize(("args", "needle"), [
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["train"], "Missing argument 'RECIPE'"),
    (["bench", ".", "--batch", "abc"], "Invalid value for '--batch'"),
    (["export", ".", "--no-such-flag"], "No such option"),
    (["data", "lst"], "No such command 'lst'"),
])
def test_usage_errors_are_one_line_like_every_other_bad_input(args: list[str], needle: str) -> None:
    """click's own usage errors (three lines: Usage, Try, Error) come out as README promises:
    one 'error:' line naming the command's --help, exit status 2."""
    result = CliRunner().invoke(main, args)
    _one_clean_line(result, needle, "--help` says what it takes")


def test_a_yaml_error_of_any_kind_is_one_line(tmp_path: Path) -> None:
    for text in ("data:\n  root: [unclosed\n", "a:\n\tb: 1\n", "x: &a 1\ny: *b\n", "- [a, b\n- c\n"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        _one_clean_line(CliRunner().invoke(main, ["train", str(recipe)]), "not valid YAML")


def _numeric_fields() -> list[tuple[str, object]]:
    """(section.key, hint) of every number, or list of numbers, a recipe holds."""
    import dataclasses
    import typing

    from rise_edge.config import Recipe

    found = []
    sections = typing.get_type_hints(Recipe)
    for section in dataclasses.fields(Recipe):
        cls = sections[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
            if hint in (int, float) or any(a in (int, float) for a in args):
                found.append((f"{section.name}.{f.name}", hint))
    return found


@pytest.mark.parametrize("name, hint", _numeric_fields(), ids=[n for n, _ in _numeric_fields()])
def test_every_number_in_a_recipe_has_a_ceiling_it_names(name: str, hint: object) -> None:
    """Numbers reach torch and numpy: each field refuses a value past its ceiling (its own, or what
    int64 / float32 hold) with one line naming it, before anything runs."""
    import dataclasses
    import typing

    from rise_edge.config import FLOAT_MAX, INT_MAX, Recipe, load_recipe

    section, key = name.split(".")
    cls = typing.get_type_hints(Recipe)[section]
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[key]
    is_int = int in (hint, *typing.get_args(hint))
    ceiling = meta.get("max", INT_MAX if is_int else FLOAT_MAX)
    beyond = int(ceiling) + 1 if is_int else float(ceiling) * 10
    value = f"[{beyond}]" if typing.get_origin(hint) is tuple else str(beyond)
    with pytest.raises(UserError, match=rf"--set {re.escape(name)}=.*'{re.escape(name)}' must be .*<= "):
        load_recipe(None, [f"{name}={value}"])


@pytest.mark.parametrize("override, needle", [
    ("student.image_size=100000", "'student.image_size' must be an integer >= 8 and <= 4096 (or null)"),
    ("data.num_workers=100000000", "'data.num_workers' must be an integer >= 0 and <= 256"),
    ("train.steps=10000000000000000000000000000", "'train.steps' must be an integer >= 0 and <= "),
    ("optim.lr=1e300", "'optim.lr' must be a number > 0.0 and <= 1000.0"),
    ("data.split_seed=4294967296", "'data.split_seed' must be an integer >= 0 and <= 4294967295"),
    ("bench.batch_sizes=[1, 0]", "'bench.batch_sizes' must be a list of integers, each >= 1"),
])
def test_numbers_past_what_torch_can_take_stop_training_before_it_starts(
        override: str, needle: str, tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    """These used to run out of memory (image size), fork without end (workers), run for ever
    (steps) or overflow inside the optimizer (lr): now one line, and no run directory."""
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(recipe_file),
                                       *_args(tiny_data_root, run_dir, "--set", override)])
    _one_clean_line(result, f"--set {override}", needle)
    assert not run_dir.exists()


@pytest.mark.parametrize("command", [["bench", "RUN", "--batch", "100000000"],
                                     ["bench", "RUN", "--iterations", "10000000000000"],
                                     ["export", "RUN", "--calibration-size", "-5"],
                                     ["sweep", "SWEEP", "--workers", "100000000"],
                                     ["sweep", "SWEEP", "--threads", "100000000"]])
def test_command_line_numbers_have_ranges_too(command: list[str], tiny_run: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: demo\n")
    args = [str(tiny_run) if a == "RUN" else str(sweep) if a == "SWEEP" else a for a in command]
    before = sorted(p.name for p in tiny_run.iterdir())
    result = CliRunner().invoke(main, args)
    _one_clean_line(result, "is not in the range")
    assert sorted(p.name for p in tiny_run.iterdir()) == before


# Ctrl-C that lands while the program is importing (a sweep's process group, a user's quick Ctrl-C):
# an import hook sends SIGINT the moment `rise_edge.cli` imports click, so the moment is certain.
_CTRL_C_DURING_IMPORT = """
import importlib.abc, os, signal, sys
class SendCtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, SendCtrlC())
sys.argv = [{argv0!r}, "recipes"]
{entry}
"""


@pytest.mark.parametrize("argv0, entry, module", [
    pytest.param("/venv/bin/rise-edge", "from rise_edge.cli import main\nsys.exit(main())", "click",
                 id="rise-edge"),
    pytest.param("sweep-worker", "import runpy\nrunpy.run_module('rise_edge.sweep', run_name='__main__')",
                 "rise_edge.sweep.launch", id="sweep-worker"),
])
def test_ctrl_c_while_a_program_imports_is_one_line_and_130(argv0: str, entry: str, module: str) -> None:
    code = _CTRL_C_DURING_IMPORT.format(module=module, argv0=argv0, entry=entry)
    # SIGINT as a terminal leaves it: a test run started in the background inherits it ignored.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n"


def test_importing_the_cli_from_python_leaves_ctrl_c_alone() -> None:
    code = "import signal, rise_edge.cli; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0, done.stderr


def test_a_gpu_package_that_raises_at_import_does_not_stop_an_export(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_tensorrt raises a plain Exception at import where TensorRT's libraries are missing;
    the versions every export records are read without importing it."""
    from rise_edge.run_dir import software_versions

    package = tmp_path / "torch_tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise Exception('Could not find libnvinfer.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_tensorrt", raising=False)
    found = software_versions()
    assert "torch_tensorrt" not in found and "torch" in found
