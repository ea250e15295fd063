"""Hostile files where rise-edge reads its own: every record, list and tensors file it wrote is read
through one checked reader (rise_edge.files), so a damaged or hand-changed one is one `error:` line
naming the file (and the field) with what fixes it, never a traceback, never a wrong result taken
silently, never a misleading message. Also: a path the file system cannot hold (a NUL byte) given on
the command line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_hash

from rise_edge.cli import main
from rise_edge.files import file_sha256, write_json_atomic

QUICK = ["--iterations", "1", "--warmup", "0", "--batch", "1", "--max-images", "3", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_error_line(result, *needles: str, code: int = 2) -> str:
    """The command failed with `code` and said so in exactly one `error:` line holding `needles`."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]



@pytest.fixture
def site(tmp_path: Path, tiny_data_root: Path) -> Path:
    """A few target-domain images, flat and renamed: a site with no labels."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i, p in enumerate(sorted((tiny_data_root / "shapes" / "sketch").rglob("*.png"))[::4]):
        shutil.copy(p, folder / f"{i:02d}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# Damaged safetensors a run holds: the teacher's weights and its cached text embeddings, read by
# bench --site (the teacher-agreement estimate); the student, read by adapt.


@pytest.fixture(scope="module")
def _teacher_run_template(_tiny_run_template: Path, tiny_clip_dir: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run as a KD run of a local tiny CLIP teacher (its own copy of the weights), with
    the teacher's text embeddings cached in the run as training leaves them."""
    from rise_edge.config import recipe_from_dict
    from rise_edge.run_dir import STUDENT_FILE, load_tensors, open_run, run_splits, save_tensors
    from rise_edge.train.methods import teacher_and_text

    folder = tmp_path_factory.mktemp("teacher_run")
    clip = Path(shutil.copytree(tiny_clip_dir, folder / "clip"))
    run = Path(shutil.copytree(_tiny_run_template, folder / "run"))
    tensors, metadata = load_tensors(run / STUDENT_FILE)
    metadata["recipe"]["loss"]["method"] = "kd"
    metadata["recipe"]["teacher"]["model"] = f"local-dir:{clip}"
    save_tensors(run / STUDENT_FILE, tensors, metadata)
    opened = open_run(run)
    splits = run_splits(opened)
    recipe = recipe_from_dict(metadata["recipe"], "test")
    teacher_and_text(recipe, splits.classes, splits.anchors(), [run / "text_embeddings"],
                     torch.device("cpu"))
    assert len(list((run / "text_embeddings").glob("text-*.safetensors"))) == 1
    return folder


def _damage_safetensors(path: Path, how: str) -> None:
    from safetensors.torch import save_file

    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    else:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if how == "wrong names":
            tensors = {f"renamed.{k}": v for k, v in tensors.items()}
        else:  # wrong shapes: every tensor one row longer
            tensors = {k: torch.cat([v, v[:1]]) if v.dim() else v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("which, how", [
    ("teacher", "truncated"), ("teacher", "wrong names"),
    ("text", "random bytes"), ("text", "wrong shapes"), ("text", "wrong names")])
def test_damaged_tensors_the_site_path_reads_are_one_line(_teacher_run_template: Path, site: Path,
                                                          tmp_path: Path, which: str,
                                                          how: str) -> None:
    folder = Path(shutil.copytree(_teacher_run_template, tmp_path / "copy"))
    run = folder / "run"
    if which == "teacher":  # this copy's teacher, damaged (the template's stays whole)
        from rise_edge.run_dir import STUDENT_FILE, load_tensors, save_tensors

        tensors, metadata = load_tensors(run / STUDENT_FILE)
        metadata["recipe"]["teacher"]["model"] = f"local-dir:{folder / 'clip'}"
        save_tensors(run / STUDENT_FILE, tensors, metadata)
        damaged = folder / "clip" / "open_clip_model.safetensors"
    else:  # the text embeddings the run cached (keyed by the template's teacher, which it names)
        damaged = next((run / "text_embeddings").glob("text-*.safetensors"))
    _damage_safetensors(damaged, how)
    result = CliRunner().invoke(main, ["bench", str(run), "--site", str(site), *QUICK])
    line = _one_error_line(result, damaged.name)
    assert ("fetch the weights" if which == "teacher" else "computed again") in line


@pytest.mark.parametrize("how", ["truncated", "wrong names"])
def test_a_damaged_parent_student_is_one_line_for_adapt(tiny_run: Path, site: Path, tmp_path: Path,
                                                        how: str) -> None:
    _damage_safetensors(tiny_run / "student.safetensors", how)
    before = tree_hash(tiny_run)
    result = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(site), "--no-export",
                                       "--run-dir", str(tmp_path / "child"), "--quiet"])
    _one_error_line(result, "student.safetensors", "train the run again")
    assert tree_hash(tiny_run) == before and not (tmp_path / "child").exists()


# ---------------------------------------------------------------------------------------------------
# adapt.json: a child run's record of its parent and site


def _child(tiny_run: Path, site: Path, folder: Path, **change: object) -> Path:
    """A child run as adapt leaves it (the parent's student stands in for the adapted one), its
    adapt.json updated with `change` (None deletes a field)."""
    from rise_edge.data.site_images import find_site_images

    child = Path(shutil.copytree(tiny_run, folder))
    found = find_site_images(site, progress=False)
    record = {"schema": 1, "command": "rise-edge adapt", "method": "adabn",
              "parent": {"run_dir": str(tiny_run), "student_sha256":
                         file_sha256(tiny_run / "student.safetensors")},
              "site": found.to_record(), "int8_calibration": "site", "adaptation": {},
              "estimates": {"before": None, "after": None}, "warning": None}
    for key, value in change.items():
        section, _, field = key.partition("__")
        target = record[section] if field else record
        if value is None:
            target.pop(field or section)
        else:
            target[field or section] = value
    write_json_atomic(child / "adapt.json", record)
    return child


@pytest.mark.parametrize("content, needle", [
    (b'{"parent": {"run_dir": ', "is not JSON"),
    (b'{"method": "adabn\xff\xfe"}', "is not UTF-8"),
    (b"[1, 2]", "where rise-edge writes a JSON object"),
    ({"parent": "../elsewhere"}, "parent must be a JSON object"),
    ({"parent__run_dir": 5}, "parent.run_dir must be the parent run directory's path"),
    ({"parent__student_sha256": "abc"}, "parent.student_sha256 must be 64 hexadecimal digits"),
    ({"site__images": "many"}, "site.images must be an integer"),
    ({"int8_calibration": "moon"}, "int8_calibration must be one of sources, site"),
])
def test_a_damaged_or_mistyped_adapt_record_is_one_line(tiny_run: Path, site: Path, tmp_path: Path,
                                                        content: object, needle: str) -> None:
    child = _child(tiny_run, site, tmp_path / "child", **({} if isinstance(content, bytes)
                                                           else content))
    if isinstance(content, bytes):
        (child / "adapt.json").write_bytes(content)
    before = tree_hash(child)
    for command in (["bench", str(child), *QUICK], ["export", str(child), "--quiet"]):
        _one_error_line(CliRunner().invoke(main, command), "adapt.json", needle,
                        "adapt its parent again")
    assert tree_hash(child) == before  # the record is left for the user to see


@pytest.mark.parametrize("change, needle", [
    ({"site__sha256": "not a digest"}, "site.sha256 must be 64 hexadecimal digits"),
    ({"site__folder": None}, "site.folder must be the site folder's path"),
    ({"site__sha256": "0" * 64}, "changed since adapt"),
])
def test_a_tampered_site_record_says_what_it_is_not_that_an_artefact_failed(
        tiny_run: Path, site: Path, tmp_path: Path, change: dict, needle: str) -> None:
    """INT8 calibrated on the site: the site record is read before anything is made, so a tampered
    one is named, not reported as '1 artefact(s) failed: onnx-int8'."""
    child = _child(tiny_run, site, tmp_path / "child", **change)
    result = CliRunner().invoke(main, ["export", str(child), "--int8", "--quiet"])
    line = _one_error_line(result, needle)
    assert "artefact(s) failed" not in line and not (child / "export").exists()


# ---------------------------------------------------------------------------------------------------
# Export records whose artefact path leads outside the export folder


@pytest.fixture(scope="module")
def _exported_template(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rise_edge.config import ExportConfig
    from rise_edge.export.driver import export_run

    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("exported") / "run"))
    assert not export_run(run, ExportConfig(formats=("onnx",), int8=False), progress=False).failed
    return run


def _point_outside(run: Path, tmp_path: Path, how: str) -> Path:
    """onnx-fp32's record names a file outside export/ (with that file's sha256, as a forger
    would write it); returns the outside file."""
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(run / "export" / "model.onnx", outside)
    record_path = run / "export" / "export.json"
    document = json.loads(record_path.read_text())
    document["artefacts"]["onnx-fp32"].update(
        path=os.path.relpath(outside, run / "export") if how == "relative" else str(outside),
        sha256=file_sha256(outside))
    record_path.write_text(json.dumps(document))
    return outside


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_an_export_record_pointing_outside_its_folder_is_never_opened(
        _exported_template: Path, tmp_path: Path, how: str) -> None:
    from rise_edge.backend_table import runner_for
    from rise_edge.errors import UserError

    run = Path(shutil.copytree(_exported_template, tmp_path / "run"))
    _point_outside(run, tmp_path, how)
    # The serving bundle would ship it; every reader goes through the same check.
    result = CliRunner().invoke(main, ["export", str(run), "--format", "triton", "--serve",
                                       "onnx-fp32", "--quiet"])
    _one_error_line(result, "export.json", "artefacts.onnx-fp32.path", "re-export")
    assert not (run / "bundle").exists()
    record = json.loads((run / "export" / "export.json").read_text())["artefacts"]["onnx-fp32"]
    with pytest.raises(UserError, match="must be the name of a file in export/"):
        runner_for(record, run / "export")


# ---------------------------------------------------------------------------------------------------
# A NUL byte in a path on the command line


@pytest.mark.parametrize("args", [
    ["bench", "{run}\0x"], ["export", "{run}\0x"], ["bench", "{run}", "--site", "si\0te"],
    ["adapt", "{run}", "--site", "si\0te"], ["train", "recipe\0.yaml"],
    ["train", "recipe.yaml", "--run-dir", "r\0un"], ["sweep", "collect", "d\0ir"],
    ["sweep", "sw\0eep.yaml"], ["data", "list", "--root", "ro\0ot"],
    ["teacher-cache", "info", "re\0cipe.yaml"], ["demo", "--out", "o\0ut"],
    ["export", "{run}", "--format", "triton", "--bundle-dir", "b\0undle"],
])
def test_a_nul_byte_in_a_path_argument_is_one_line(tiny_run: Path, args: list[str]) -> None:
    args = [a.replace("{run}", str(tiny_run)) for a in args]
    before = tree_hash(tiny_run)
    result = CliRunner().invoke(main, args)
    _one_error_line(result, "NUL byte")
    assert tree_hash(tiny_run) == before


def test_a_nul_byte_in_a_path_from_anywhere_else_is_one_line() -> None:
    """Paths from a recipe or a record reach os calls, which raise ValueError for a NUL byte: every
    command turns that into one line too."""
    import click

    from rise_edge.cli import _user_errors

    @click.command()
    @_user_errors
    def reads() -> None:
        os.stat("from-a-recipe\0x")

    _one_error_line(CliRunner().invoke(reads, []), "NUL byte")


# ---------------------------------------------------------------------------------------------------
# Metrics records read by `sweep collect`: values that are not accuracies


def _collected_sweep(folder: Path, data_root: Path) -> tuple[Path, list[Path]]:
    """A finished two-run sweep as `rise-edge sweep` leaves it, written by hand (no training):
    the sweep's copy, and per run results.json, metrics.jsonl and sweep.json."""
    from conftest import TINY_DATASET

    from rise_edge.sweep.launch import SWEEP_RECORD, _write_copy, expand, load_sweep

    (folder / "base.yaml").write_text(
        f"data: {{root: '{data_root}', dataset: {TINY_DATASET}}}\nloss: {{method: erm}}\n"
        "student: {model: test_resnet, pretrained: none}\n")
    (folder / "sweep.yaml").write_text(f"base: base.yaml\ntargets: [sketch]\nseeds: [0, 1]\n"
                                       f"output_dir: '{folder / 'out'}'\n")
    sweep = load_sweep(folder / "sweep.yaml")
    _write_copy(sweep)
    runs = []
    for spec in expand(sweep):
        run = Path(spec.run_dir)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(
            {"accuracy": {"val_mean": 0.8, "target/sketch": 0.6}}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps(
            {"step": 2, "eval": {"val_mean": 0.8, "target_out/sketch": 0.5,
                                 "target_in/sketch": 0.7}}) + "\n")
        (run / SWEEP_RECORD).write_text(json.dumps({"sweep_hash": sweep.hash, "complete": True}))
        runs.append(run)
    return folder / "out", runs


@pytest.mark.parametrize("file, bad", [
    ("metrics.jsonl", '"abc"'), ("metrics.jsonl", "NaN"), ("metrics.jsonl", "1.5"),
    ("metrics.jsonl", b"\xff"), ("results.json", "NaN"), ("results.json", '"abc"'),
    ("results.json", b"\xff"), ("sweep.json", b"\xff"),
])
def test_collect_leaves_out_a_run_with_a_damaged_metrics_record_and_says_so(
        tiny_data_root: Path, tmp_path: Path, file: str, bad: object) -> None:
    out, runs = _collected_sweep(tmp_path, tiny_data_root)
    path = runs[1] / file
    text = path.read_text()
    if isinstance(bad, bytes):
        path.write_bytes(text.encode()[:8] + bad + text.encode()[8:])
    elif file == "metrics.jsonl":
        path.write_text(text.replace("0.7", bad))
    else:
        path.write_text(text.replace("0.6", bad))
    result = CliRunner().invoke(main, ["sweep", "collect", str(out)])
    assert "Traceback" not in result.output and result.exit_code == 1, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(path) in warnings[0], result.output
    assert not [line for line in result.output.splitlines() if line.startswith("error")]
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["sketch/seed0"]
    assert list(data["damaged"]) == ["sketch/seed1"]
    cells = data["tables"]["shapes"]["methods"]["erm"]
    assert cells["training"]["sketch"] == pytest.approx([60.0, 0.0, 1])
    assert cells["oracle"]["sketch"][0] == pytest.approx(70.0)
    assert "1 run(s) left out" in (out / "results.md").read_text()


def test_collect_with_every_run_damaged_is_one_line(tiny_data_root: Path, tmp_path: Path) -> None:
    out, runs = _collected_sweep(tmp_path, tiny_data_root)
    for run in runs:
        (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval": {"val_mean": 1.5}}))
    _one_error_line(CliRunner().invoke(main, ["sweep", "collect", str(out)]), "metrics.jsonl",
                    "eval.val_mean must be a number from 0 to 1, got 1.5")
    assert not (out / "results.json").exists()


# ---------------------------------------------------------------------------------------------------
# Split lists (data.split_lists)


@pytest.mark.parametrize("content, needle", [
    (b"cartoon/circle/000.png 1\ncartoon/square/\xff\xfe.png 2\n", "is not UTF-8 text"),
    (b"cartoon/circle/000.png 1\n\x00\x00\x00\n", "holds a NUL byte"),
    (b"cartoon/circle/000.png 1\n%$#@ garbage line\n", "is not an image of a known class"),
])
def test_a_damaged_split_list_is_one_line(tiny_data_root: Path, recipe_file: Path, tmp_path: Path,
                                          content: bytes, needle: str) -> None:
    from conftest import train_cli_args

    lists = tmp_path / "lists"
    lists.mkdir()
    for domain in ("cartoon", "photo"):
        for split in ("train", "crossval"):
            (lists / f"{domain}_{split}_kfold.txt").write_bytes(
                f"{domain}/circle/000.png 1\n".encode())
    (lists / "cartoon_train_kfold.txt").write_bytes(content)
    result = CliRunner().invoke(main, ["train", str(recipe_file), *train_cli_args(
        tiny_data_root, tmp_path / "run", "--set", f"data.split_lists={lists}",
        "--set", "train.steps=1")])
    _one_error_line(result, "cartoon_train_kfold.txt", needle)
