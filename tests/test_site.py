"""Sites: label-free estimates (bench --site) and adaptation into a child run (adapt)."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from conftest import tree_hash

from rise_edge.cli import main
from rise_edge.errors import UserError
from rise_edge.site import estimates
from rise_edge.site.adapt import adabn, batchnorm_layers, t3a
from rise_edge.site.estimates import Calibration, atc, doc, estimate_accuracy

QUICK = ["--iterations", "2", "--warmup", "0", "--batch", "1", "--quiet"]



@pytest.fixture
def site(tmp_path: Path, tiny_data_root: Path) -> Path:
    """The target domain's images, flat, renamed: a site folder with no trace of a label."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i, p in enumerate(sorted((tiny_data_root / "shapes" / "sketch").rglob("*.png"))):
        shutil.copy(p, folder / f"{hashlib.sha256(str(i).encode()).hexdigest()[:10]}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# Estimators on constructed cases


def _logits(confidences: np.ndarray, classes: int = 4) -> np.ndarray:
    """Logits whose softmax puts `confidence` on class 0 and the rest evenly on the others."""
    rest = (1 - confidences) / (classes - 1)
    p = np.column_stack([confidences, *[rest] * (classes - 1)])
    return np.log(p)


def test_atc_and_doc_give_the_known_answer() -> None:
    # Sources: confidences 0.3..0.95; the model is wrong on exactly the 25 % least confident.
    source_conf = np.linspace(0.3, 0.95, 400)
    correct = source_conf >= np.quantile(source_conf, 0.25)
    source = _logits(source_conf)
    # Site: the same confidence law shifted down so that 60 % lie under the source threshold.
    threshold = np.quantile(source_conf, 0.25)
    site_conf = np.concatenate([np.full(60, threshold - 0.05), np.full(40, threshold + 0.05)])
    site = _logits(site_conf)
    ne = estimates.negative_entropy
    assert atc(ne(source), correct, ne(site)) == pytest.approx(0.40, abs=0.005)
    # DoC: source accuracy minus the fall in mean max-softmax confidence
    expected = correct.mean() - (source_conf.mean() - site_conf.mean())
    assert doc(estimates.max_confidence(source), correct, estimates.max_confidence(site)) == \
        pytest.approx(expected, abs=1e-9)
    found = {e["method"]: e for e in estimate_accuracy(
        Calibration.from_logits(source, np.where(correct, 0, 1), ["a"] * 400), site)}
    assert found["ATC"]["estimate"] == pytest.approx(40.0, abs=0.5)
    low, high = found["ATC"]["interval"]
    assert low <= found["ATC"]["estimate"] <= high and high - low > 0


def test_teacher_agreement_bound_is_the_teachers_error() -> None:
    source = _logits(np.full(50, 0.9))
    site = _logits(np.full(100, 0.9))  # the student predicts class 0 everywhere
    teacher = {"site_predictions": np.array([0] * 80 + [1] * 20), "source_error": 0.05}
    found = {e["method"]: e for e in estimate_accuracy(
        Calibration.from_logits(source, np.zeros(50, int), ["a"] * 50), site, teacher=teacher)}
    entry = found["teacher agreement"]
    assert entry["estimate"] == pytest.approx(80.0)
    low, high = entry["interval"]
    assert low <= 75.0 + 1e-9 and high >= 85.0 - 1e-9


def test_the_estimators_take_no_site_labels() -> None:
    for function in (estimates.estimate_accuracy, estimates.shift_check,
                     estimates.describe_predictions):
        parameters = set(inspect.signature(function).parameters)
        assert not {p for p in parameters if "label" in p}, function.__name__


def test_a_site_like_the_sources_is_not_flagged_and_a_shifted_one_is() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 600)
    calibration = Calibration.from_logits(_logits(conf), np.zeros(600, int),
                                          ["a"] * 300 + ["b"] * 300)
    same = estimates.shift_check(calibration, _logits(rng.uniform(0.5, 1.0, 300)))
    shifted = estimates.shift_check(calibration, _logits(rng.uniform(0.26, 0.4, 300)))
    assert not same["unlike_every_source"] and shifted["unlike_every_source"]


# ---------------------------------------------------------------------------------------------------
# Adaptation methods


class _Net(nn.Module):
    """A small BatchNorm student with the Student's attributes that adapt reads."""

    def __init__(self) -> None:
        super().__init__()
        from rise_edge.train.student import HeadSpec, Student
        backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        backbone.num_features = 8
        self.student = Student(backbone, HeadSpec(8, 3, None, "linear"))


def _batches(images: torch.Tensor, size: int = 64):
    return lambda: (images[i:i + size] for i in range(0, len(images), size))


def test_adabn_changes_only_batchnorm_statistics_and_is_a_no_op_on_the_same_distribution() -> None:
    torch.manual_seed(0)
    student = _Net().student
    data = torch.randn(4096, 3, 8, 8) * 2 + 1
    adabn(student, _batches(data[:2048]))
    before = copy.deepcopy(student.state_dict())
    params = {n: p.detach().clone() for n, p in student.named_parameters()}
    adabn(student, _batches(data[2048:]))  # another sample of the same distribution
    after = student.state_dict()
    for name, p in student.named_parameters():
        assert torch.equal(p, params[name]), name  # no weight moves
    bn = batchnorm_layers(student)[0]
    assert torch.allclose(after["backbone.1.running_mean"], before["backbone.1.running_mean"],
                          atol=0.05)
    assert torch.allclose(after["backbone.1.running_var"], before["backbone.1.running_var"],
                          rtol=0.05)
    assert bn.momentum == 0.1 and not bn.training
    # a shifted site moves the statistics
    adabn(student, _batches(data[2048:] * 3 + 5))
    assert not torch.allclose(student.state_dict()["backbone.1.running_mean"],
                              before["backbone.1.running_mean"], atol=0.5)


def test_adabn_refuses_a_student_without_batchnorm() -> None:
    from rise_edge.train.student import HeadSpec, Student
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    student = Student(backbone, HeadSpec(4, 3, None, "linear"))
    with pytest.raises(UserError, match="no BatchNorm layer; use --method t3a"):
        adabn(student, _batches(torch.randn(8, 3, 8, 8)))


def test_t3a_changes_only_the_classifier() -> None:
    torch.manual_seed(0)
    student = _Net().student.eval()
    backbone = copy.deepcopy(student.backbone.state_dict())
    done = t3a(student, _batches(torch.randn(200, 3, 8, 8)), filter_k=10)
    for name, value in student.backbone.state_dict().items():
        assert torch.equal(value, backbone[name]), name
    assert sum(done["supports_per_class"]) <= 30 and done["images"] == 200
    assert torch.allclose(student.classifier.weight.norm(dim=1),
                          student.classifier.weight.norm(dim=1)[0].expand(3), atol=1e-5)
    assert torch.count_nonzero(student.classifier.bias) == 0


# ---------------------------------------------------------------------------------------------------
# bench --site and adapt, end to end on the tiny run


def test_bench_site_estimates_are_the_same_whatever_the_layout(tiny_run: Path, site: Path,
                                                                tmp_path: Path) -> None:
    """The estimators see pixels only: the same images in class-named folders (a layout that
    would leak labels) give the very same estimates as the flat, renamed folder."""
    labelled = tmp_path / "labelled-layout"
    for i, p in enumerate(sorted(site.iterdir())):
        (labelled / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, labelled / f"class{i % 3}" / p.name)
    found = []
    for folder in (site, labelled):
        result = CliRunner().invoke(main, ["bench", str(tiny_run), "--site", str(folder), *QUICK])
        assert result.exit_code == 0, result.output
        assert "label-free ESTIMATES" in result.output
        report = json.loads((tiny_run / "bench" / "report.json").read_text())
        found.append({e["method"]: e["estimate"] for e in report["rows"][0]["site"]["estimates"]})
        assert report["site"]["images"] == 24
    assert found[0] == found[1]
    assert "## Site: label-free estimates" in (tiny_run / "bench" / "report.md").read_text()


@pytest.mark.slow
def test_adapt_makes_a_child_that_exports_and_benches_and_leaves_the_parent_byte_identical(
        tiny_run: Path, site: Path, tmp_path: Path) -> None:
    before = tree_hash(tiny_run)
    child = tmp_path / "child"
    result = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(site), "--method",
                                       "adabn", "--int8-calibration", "site", "--run-dir",
                                       str(child), "--quiet"])
    assert result.exit_code in (0, 1), result.output  # 1: an INT8 budget note is not a failure
    assert tree_hash(tiny_run) == before
    record = json.loads((child / "adapt.json").read_text())
    assert record["parent"]["run_dir"] == str(tiny_run.resolve())
    assert record["site"]["images"] == 24 and len(record["site"]["sha256"]) == 64
    assert record["adaptation"]["batchnorm_layers"] > 0
    export = json.loads((child / "export" / "export.json").read_text())
    assert export["calibration"]["source"] == "site images (unlabelled)"
    assert export["artefacts"]["onnx-int8"]["status"] == "ok"
    result = CliRunner().invoke(main, ["bench", str(child), "--site", str(site), *QUICK])
    assert result.exit_code == 0, result.output
    rows = {r["engine"]: r for r in json.loads((child / "bench" / "report.json").read_text())["rows"]}
    assert {"pytorch", "before-adapt", "onnx-fp32", "onnx-int8"} <= set(rows)
    assert all(rows[e].get("site") for e in ("pytorch", "before-adapt"))
    # never overwritten: a second adapt into the same folder is refused, the child unchanged
    kept = tree_hash(child)
    again = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(site), "--run-dir",
                                      str(child), "--no-export"])
    assert again.exit_code == 2 and "already exists" in again.output
    assert tree_hash(child) == kept and tree_hash(tiny_run) == before


def test_t3a_child_without_export(tiny_run: Path, site: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(site), "--method",
                                       "t3a", "--no-export", "--run-dir", str(tmp_path / "t3a")])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    assert json.loads((tmp_path / "t3a" / "adapt.json").read_text())["method"] == "t3a"


def test_a_failed_adapt_leaves_nothing(tiny_run: Path, site: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import rise_edge.site.child as child_module

    def full_disk(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(child_module, "save_student", full_disk)
    before = tree_hash(tiny_run)
    result = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(site), "--no-export",
                                       "--run-dir", str(tmp_path / "child")])
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "child").exists() and not list(tmp_path.glob(".child.work*"))
    assert tree_hash(tiny_run) == before


def _bad(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("\n") <= 2, result.output
    return result.output


def test_bad_site_folders_get_one_line(tiny_run: Path, site: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert "holds no images" in _bad(["bench", str(tiny_run), "--site", str(empty), *QUICK])
    assert "no such folder" in _bad(["bench", str(tiny_run), "--site", str(tmp_path / "nope")])
    assert "is a file" in _bad(["bench", str(tiny_run), "--site", str(empty / "notes.txt")])
    assert "run directory" in _bad(["bench", str(tiny_run), "--site", str(tiny_run)])
    assert "run directory" in _bad(["adapt", str(tiny_run), "--site", str(tiny_run / "bench")
                                    if (tiny_run / "bench").is_dir() else str(tiny_run)])
    # an unreadable image is named and refused, or skipped when asked
    (site / "broken.png").write_bytes(b"\x89PNG not really")
    (site / "readme.md").write_text("other files are left out")
    assert "broken.png" in _bad(["bench", str(tiny_run), "--site", str(site), *QUICK])
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--site", str(site),
                                       "--skip-bad-images", *QUICK])
    assert result.exit_code == 0, result.output
    report = json.loads((tiny_run / "bench" / "report.json").read_text())
    assert report["site"]["skipped_unreadable"][0][0] == "broken.png"
    assert report["site"]["ignored_not_images"] == 1
    assert "--method none with --int8-calibration sources" in _bad(
        ["adapt", str(tiny_run), "--site", str(site), "--method", "none"])


def test_a_single_image_of_another_size_is_resized_and_estimated(tiny_run: Path,
                                                                 tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (97, 41), (200, 30, 30)).save(one / "odd.jpg")
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--site", str(one), *QUICK])
    assert result.exit_code == 0, result.output
    assert "only 1 site image(s)" in result.output


def test_adapt_on_a_single_image(tiny_run: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (50, 70), (10, 200, 30)).save(one / "only.png")
    assert "holds 1; give at least 2" in _bad(["adapt", str(tiny_run), "--site", str(one),
                                               "--no-export"])
    result = CliRunner().invoke(main, ["adapt", str(tiny_run), "--site", str(one), "--method",
                                       "t3a", "--no-export", "--run-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output


def test_adabn_on_a_site_whose_last_chunk_would_be_one_image() -> None:
    from rise_edge.site.adapt import path_batches

    sizes = [b.shape[0] for b in path_batches([str(i) for i in range(65)],
                                               lambda p: np.zeros((len(p), 3, 4, 4), np.float32))()]
    assert sum(sizes) == 65 and min(sizes) > 1


def test_non_finite_logits_give_an_error_not_estimates() -> None:
    from rise_edge.site.assess import SiteInputs, assess

    inputs = SiteInputs([("a.png", 0, "d")] * 4, ("s.png",) * 3)
    bad = np.array([[np.nan, 1.0]] * 3)
    record = assess(inputs, np.ones((4, 2)), bad, ["x", "y"])
    assert "non-finite logits" in record["error"] and "estimates" not in record


def test_adabn_on_a_run_without_batchnorm_is_one_line(tiny_data_root: Path, site: Path,
                                                       tmp_path: Path) -> None:
    from conftest import build_tiny_run

    run = build_tiny_run(tmp_path / "convnext", tiny_data_root, ["student.model=test_convnext",
                                                                 "train.steps=2"])
    before = tree_hash(run)
    assert "no BatchNorm layer; use --method t3a" in _bad(
        ["adapt", str(run), "--site", str(site), "--no-export"])
    assert tree_hash(run) == before and not list(tmp_path.glob("convnext-*"))
