"""adapt --method distill: the student fine-tuned against the run's teacher on a site's unlabelled
images, with source replay and label-free selection (rise_edge.site.distill)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import TINY_DATASET, tree_hash
from rise_edge.cli import main
from rise_edge.site.distill import DistillSettings, checkpoint_dir

QUICK = DistillSettings(steps=4, eval_every=2, batch_size=8)


def _train_args(data_root: Path, clip_dir: Path, run_dir: Path, method: str) -> list[str]:
    sets = [f"data.root={data_root}", f"data.dataset={TINY_DATASET}", "data.target_domain=sketch",
            "data.val_fraction=0.25", "data.num_workers=0", "student.model=test_resnet",
            "student.image_size=32", f"teacher.model=local-dir:{clip_dir}", f"loss.method={method}",
            "loss.w_ce=0.2", "loss.w_kd=0.8", "loss.w_dist=1.0", "train.batch_size=8",
            "optim.lr=0.01", "train.steps=3"]
    return ["--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher-view and text caches of these tests go to a throw-away folder."""
    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def _rise_template(tmp_path_factory: pytest.TempPathFactory, tiny_data_root: Path,
                   tiny_clip_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("distill_runs")
    recipe = folder / "rise.yaml"
    recipe.write_text("{}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RISE_EDGE_CACHE", str(folder / "cache"))
        result = CliRunner().invoke(main, ["train", str(recipe), *_train_args(
            tiny_data_root, tiny_clip_dir, folder / "rise", "rise")])
    assert result.exit_code == 0, result.output
    return folder / "rise"


@pytest.fixture
def rise_run(tmp_path: Path, _rise_template: Path) -> Path:
    """A fresh copy of a tiny RISE run (split head, tiny open_clip teacher, 3 steps)."""
    return Path(shutil.copytree(_rise_template, tmp_path / "runs" / "rise"))


@pytest.fixture
def site(tmp_path: Path, tiny_data_root: Path) -> Path:
    """The target domain's 24 images, flat, renamed: no trace of a label."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i, p in enumerate(sorted((tiny_data_root / TINY_DATASET / "sketch").rglob("*.png"))):
        shutil.copy(p, folder / f"{hashlib.sha256(str(i).encode()).hexdigest()[:10]}.png")
    return folder


def _distill(run: Path, site: Path, child: Path, settings: DistillSettings = QUICK
             ) -> dict:
    from rise_edge.site.child import adapt_run

    _, record = adapt_run(run, site, "distill", child_dir=child, distill=settings,
                          log=lambda _: None)
    return record


def _weights(child: Path) -> dict[str, torch.Tensor]:
    return load_file(str(child / "student.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distill_reads_no_site_label_and_leaves_the_parent_byte_identical(
        rise_run: Path, site: Path, tmp_path: Path) -> None:
    """Class-named folders (a layout that would leak labels) give the very child a flat folder
    gives; the parent is not written; the selection is recorded; no work folder is left."""
    labelled = tmp_path / "labelled"
    for i, p in enumerate(sorted(site.iterdir())):
        (labelled / ("circle", "square", "triangle")[i % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, labelled / ("circle", "square", "triangle")[i % 3] / f"x{i}.png")
    before = tree_hash(rise_run)
    flat = _distill(rise_run, site, tmp_path / "flat")
    layout = _distill(rise_run, labelled, tmp_path / "layout")
    assert tree_hash(rise_run) == before
    assert _same(_weights(tmp_path / "flat"), _weights(tmp_path / "layout"))
    assert flat["selection"] == layout["selection"]
    selection = flat["selection"]
    assert selection["images"] == 5 and "agreement with the teacher" in selection["rule"]
    assert [h["step"] for h in selection["history"]] == [0, 2, 4]
    assert selection["step"] in (0, 2, 4)
    done = flat["adaptation"]
    assert done["site_images"] == {"adapted": 19, "held_out_for_selection": 5,
                                   "order": "by the sha256 of each image's bytes"}
    assert done["settings"]["steps"] == 4 and done["replay"]["objective"] == "rise"
    saved = json.loads((tmp_path / "flat" / "adapt.json").read_text())
    assert saved["method"] == "distill" and saved["selection"]["step"] == selection["step"]
    assert not checkpoint_dir(tmp_path / "flat").exists()


def test_the_selection_images_never_enter_adaptation(rise_run: Path, site: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import rise_edge.data.views as views
    import rise_edge.train.teacher_cache as teacher_cache
    from rise_edge.data.site_images import find_site_images
    from rise_edge.run_dir import open_run
    from rise_edge.site.distill import plan_distill

    plan = plan_distill(open_run(rise_run), find_site_images(site, progress=False), None, QUICK)
    held = set(plan.held_paths)
    assert len(held) == 5 and not held & set(plan.adapt_paths)
    read: list[str] = []
    for module, name in ((views, "load_rgb"), (views, "read_image"), (teacher_cache, "read_image")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, f=original: (read.append(str(path)),
                                                                    f(path))[1])
    _distill(rise_run, site, tmp_path / "child")
    site_reads = {p for p in read if p.startswith(str(site.resolve()))}
    assert site_reads == set(plan.adapt_paths)  # every adapted image, never a held-out one
    cache = next((tmp_path / "cache" / "teacher_views").iterdir())
    from rise_edge.train.teacher_cache import TeacherViewCache, hash_images

    header = json.loads((cache / "header.json").read_text())["key"]
    lookup = TeacherViewCache(cache.parent, header).lookup(hash_images(sorted(held)))
    assert len(lookup.missing) == len(held)


def test_replay_keeps_the_source_objective(rise_run: Path, site: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from rise_edge.train.objectives import RiseObjective

    calls: list[torch.Tensor] = []
    original = RiseObjective.forward

    def spy(self, student, images, labels, teacher_embeddings=None):
        calls.append(labels.clone())
        return original(self, student, images, labels, teacher_embeddings)

    monkeypatch.setattr(RiseObjective, "forward", spy)
    record = _distill(rise_run, site, tmp_path / "child")
    assert len(calls) == QUICK.steps  # one replayed source batch per step, under RISE itself
    assert all(c.min() >= 0 for c in calls)  # real source labels, never the site's -1 placeholder
    terms = set(record["adaptation"]["loss_terms"])
    assert {"replay_ce", "replay_kd", "replay_ad", "replay_rd", "replay_loss"} <= terms
    assert {"site_kd", "site_ad", "site_rd"} <= terms  # RISE's language terms at the site too
    assert record["adaptation"]["site_loss"]["language_class"] == "the teacher's zero-shot class"


def test_a_killed_distill_leaves_no_child_and_resumes_to_the_same_student(
        rise_run: Path, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rise_edge.site.distill as distill

    original = distill._save

    def killed(folder, key, student, optimizer, step, *rest):
        original(folder, key, student, optimizer, step, *rest)
        if step == 2:
            raise KeyboardInterrupt  # as a kill after the checkpoint at step 2

    monkeypatch.setattr(distill, "_save", killed)
    child = tmp_path / "child"
    with pytest.raises(KeyboardInterrupt):
        _distill(rise_run, site, child)
    assert not child.exists() and not list(tmp_path.glob(".child.work-adapt"))
    assert (checkpoint_dir(child) / "state.safetensors").is_file()
    monkeypatch.setattr(distill, "_save", original)
    lines: list[str] = []
    from rise_edge.site.child import adapt_run

    adapt_run(rise_run, site, "distill", child_dir=child, distill=QUICK, log=lines.append)
    assert any("resuming at step 2" in line for line in lines)
    _distill(rise_run, site, tmp_path / "uninterrupted")
    assert _same(_weights(child), _weights(tmp_path / "uninterrupted"))
    assert not checkpoint_dir(child).exists()


def _bad(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("\n") <= 2, result.output
    return result.output


def test_bad_inputs_give_one_line(rise_run: Path, tiny_run: Path, site: Path,
                                  tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(site.iterdir()), one / "only.png")
    before = tree_hash(rise_run)
    child = tmp_path / "child"
    common = ["--method", "distill", "--no-export", "--run-dir", str(child)]
    assert "give at least 10" in _bad(["adapt", str(rise_run), "--site", str(one), *common])
    inside = rise_run / "site-images"
    shutil.copytree(site, inside)
    assert "run directory" in _bad(["adapt", str(rise_run), "--site", str(inside), *common])
    shutil.rmtree(inside)
    assert "has none; use --method adabn or t3a" in _bad(
        ["adapt", str(tiny_run), "--site", str(site), *common])
    assert tree_hash(rise_run) == before
    assert not child.exists() and not checkpoint_dir(child).exists()


@pytest.mark.slow
def test_distill_through_the_command_line_exports_the_child(rise_run: Path, site: Path,
                                                            tmp_path: Path) -> None:
    """The default settings end to end: a child, exported with INT8 judged as for any run."""
    child = tmp_path / "child"
    result = CliRunner().invoke(main, ["adapt", str(rise_run), "--site", str(site), "--method",
                                       "distill", "--run-dir", str(child), "--quiet"])
    assert result.exit_code in (0, 1), result.output  # 1: an INT8 budget note is not a failure
    record = json.loads((child / "adapt.json").read_text())
    assert record["adaptation"]["settings"] == DistillSettings().to_dict()
    export = json.loads((child / "export" / "export.json").read_text())
    assert export["artefacts"]["onnx-fp32"]["status"] == "ok"
