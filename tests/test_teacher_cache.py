"""The teacher-view cache: exact replay, keys, concurrent fills, kills, damage, full disks, and the
cached loss against the teacher's own."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import TINY_DATASET
from rise_edge.config import LossConfig, load_recipe
from rise_edge.data.domains import build_splits
from rise_edge.data.transforms import Preprocessing
from rise_edge.data.views import ViewImages, ViewSpec, read_image, sample_view, view_index
from rise_edge.errors import UserError
from rise_edge.train import teacher_cache as tc

PRE = Preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
K = 3


def _samples(root: Path) -> list[tuple[str, int]]:
    recipe = load_recipe(None, [f"data.root={root}", f"data.dataset={TINY_DATASET}",
                                "data.target_domain=sketch", "data.val_fraction=0.25"])
    return build_splits(recipe.data, check_images=False, progress=False).train_samples


def _cache(tmp_path: Path, teacher, views: int = K, spec: ViewSpec | None = None,
           pre: Preprocessing = PRE) -> tc.TeacherViewCache:
    return tc.TeacherViewCache.for_teacher(tmp_path / "views", teacher, pre, spec or ViewSpec.of(pre),
                                           views)


def _quiet(line: str) -> None:
    pass


def test_replay_is_exact_and_views_do_not_depend_on_the_run(tiny_data_root: Path, tiny_teacher,
                                                            tmp_path: Path) -> None:
    samples = _samples(tiny_data_root)[:6]
    spec = ViewSpec.of(PRE)
    cache = _cache(tmp_path, tiny_teacher)
    cache.fill(tiny_teacher, [p for p, _ in samples], log=_quiet)
    entries = cache.lookup(tc.hash_images([p for p, _ in samples]))
    assert not entries.missing and entries.embeddings.dtype == torch.float16
    fly, cached = (ViewImages(samples, PRE, spec, 7, K, params) for params in (None, entries.params))
    built = tc._AllViews([(tc.hash_images([p])[0], p) for p, _ in samples[:1]], PRE, spec, K)[0][1]
    for epoch in range(5):
        for i in range(len(samples)):
            a, label, index, k = fly[(i, epoch)]
            b, *_ = cached[(i, epoch)]
            assert torch.equal(a, b) and label == samples[i][1] and index == i
            if i == 0:
                assert torch.equal(a, built[k])  # the tensor the teacher embedded
    # the run's seed picks k; the view of (image, k) is the image's own
    image, digest = read_image(samples[0][0])
    assert torch.equal(sample_view(spec, digest, 1, image.height, image.width),
                       entries.params[0, 1])
    assert sorted(view_index(5, 0, e, K) for e in range(K)) == list(range(K))  # a cycle: no repeat
    assert [view_index(5, 0, e, K) for e in range(6)] != [view_index(6, 0, e, K) for e in range(6)]
    assert view_index(5, 0, 0, 0) != view_index(5, 0, 1, 0)  # K = 0: a fresh view each epoch


def test_every_key_field_invalidates(tiny_data_root: Path, tiny_teacher, tmp_path: Path) -> None:
    from rise_edge.config import TeacherConfig
    from rise_edge.train.teacher import load_teacher

    paths = [p for p, _ in _samples(tiny_data_root)[:2]]
    base = _cache(tmp_path, tiny_teacher)
    base.fill(tiny_teacher, paths, log=_quiet)
    torch.manual_seed(1)  # the same architecture, other (random) weights
    other_weights = load_teacher(TeacherConfig(model=tiny_teacher.identity.split("|")[0],
                                               pretrained="none"), torch.device("cpu"))
    own_stats = replace_teacher_stats(tiny_teacher)
    variants = {"weights": _cache(tmp_path, other_weights), "teacher preprocessing": own_stats,
                "K": _cache(tmp_path, tiny_teacher, views=K + 1),
                "student preprocessing": _cache(tmp_path, tiny_teacher, pre=replace(PRE, input_size=24)),
                "interpolation": _cache(tmp_path, tiny_teacher, spec=replace(ViewSpec.of(PRE),
                                                                             interpolation="bicubic")),
                "augmentation": _cache(tmp_path, tiny_teacher, spec=ViewSpec.of(PRE, augment=False))}
    digests = tc.hash_images(paths)
    assert not base.lookup(digests).missing
    for what, cache in variants.items():
        assert cache.key != base.key, what
        assert len(cache.lookup(digests).missing) == 2, what  # never the other key's entries
    changed = tmp_path / "changed.png"  # the image's bytes are its key
    changed.write_bytes(Path(paths[0]).read_bytes() + b"\0")
    assert base.lookup(tc.hash_images([str(changed)])).missing == [0]
    header = json.loads((base.folder / tc.HEADER).read_text())
    header["key"]["K"] = 99
    (base.folder / tc.HEADER).write_text(json.dumps(header))
    with pytest.raises(UserError, match="records another key \\(K differ\\)"):
        base.lookup(digests)


def replace_teacher_stats(teacher) -> tc.TeacherViewCache:
    """The cache key of the same teacher fed student-normalised tensors (teacher.input_statistics)."""
    fields = tc.key_fields(teacher, PRE, ViewSpec.of(PRE), K)
    fields["teacher_preprocessing"] = {**fields["teacher_preprocessing"], "input_statistics": "student"}
    return tc.TeacherViewCache(Path("unused"), fields)


def test_two_fillers_at_once_embed_each_image_once(tiny_data_root: Path, tiny_teacher,
                                                   tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tc, "SHARD_IMAGES", 4)
    paths = [p for p, _ in _samples(tiny_data_root)[:12]]
    reports, errors = [], []

    def fill() -> None:
        try:
            reports.append(_cache(tmp_path, tiny_teacher).fill(tiny_teacher, paths, log=_quiet))
        except Exception as exc:  # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=fill) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["images"] for r in reports) == [0, 12]  # the second found everything filled
    cache = _cache(tmp_path, tiny_teacher)
    assert cache.info()["images"] == 12 and not cache.lookup(tc.hash_images(paths)).missing


_KILLED_FILLER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from rise_edge.config import TeacherConfig
from rise_edge.data.views import ViewSpec
from rise_edge.train import teacher_cache as tc
from rise_edge.train.teacher import load_teacher
from test_teacher_cache import PRE, K
tc.SHARD_IMAGES = 4
original = tc.TeacherViewCache._write_shard
def write_then_stall(self, digests, params, embeddings, *, stored, total):
    if stored:  # the second shard: half written under its temporary name, then killed
        (self.folder / ".shard-x.safetensors.abc.tmp").write_bytes(b"half a shard")
        print("stalled", flush=True)
        time.sleep(120)
    return original(self, digests, params, embeddings, stored=stored, total=total)
tc.TeacherViewCache._write_shard = write_then_stall
teacher = load_teacher(TeacherConfig(model="local-dir:{clip}"), torch.device("cpu"))
cache = tc.TeacherViewCache.for_teacher(Path({root!r}), teacher, PRE, ViewSpec.of(PRE), K)
cache.fill(teacher, {paths!r})
"""


@pytest.mark.slow
def test_kill_during_a_build_resumes_from_complete_shards(tiny_data_root: Path, tiny_clip_dir: Path,
                                                          tmp_path: Path) -> None:
    from rise_edge.config import TeacherConfig
    from rise_edge.train.teacher import load_teacher

    paths = [p for p, _ in _samples(tiny_data_root)[:12]]
    script = _KILLED_FILLER.format(tests=str(Path(__file__).parent), clip=tiny_clip_dir,
                                   root=str(tmp_path / "views"), paths=paths)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert child.stdout.readline().strip() == "stalled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    teacher = load_teacher(TeacherConfig(model=f"local-dir:{tiny_clip_dir}"), torch.device("cpu"))
    cache = _cache(tmp_path, teacher)
    digests = tc.hash_images(paths)
    assert len(cache.shards()) == 1 and len(cache.lookup(digests).missing) == 8  # the half is unread
    report = cache.fill(teacher, paths, log=_quiet)
    assert report["images"] == 8 and not cache.lookup(digests).missing
    assert not list(cache.folder.glob(".shard-*.tmp"))


def test_a_damaged_entry_is_rebuilt_or_refused(tiny_data_root: Path, tiny_teacher,
                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    paths = [p for p, _ in _samples(tiny_data_root)[:4]]
    digests = tc.hash_images(paths)
    cache = _cache(tmp_path, tiny_teacher)
    cache.fill(tiny_teacher, paths, log=_quiet)
    shard = cache.shards()[0]
    tensors = load_file(str(shard))
    tensors["embeddings"][1, 0, 0] += 0.5  # a flipped value; the checksum no longer matches
    save_file(tensors, str(shard))
    entries = cache.lookup(digests)
    assert entries.missing == [1] and entries.damaged == 1
    lines: list[str] = []
    assert cache.fill(tiny_teacher, paths, log=lines.append)["images"] == 1
    assert any("1 damaged entry" in line for line in lines)
    entries = cache.lookup(digests)
    assert not entries.missing and entries.damaged == 0
    # tampered with a valid checksum (as another teacher's entries would look): re-embedding refuses it
    tensors = {k: v.clone() for k, v in load_file(str(cache.shards()[0])).items()}
    for row in range(tensors["digests"].shape[0]):
        tensors["embeddings"][row] = torch.nn.functional.normalize(
            torch.randn(tensors["embeddings"][row].shape), dim=-1).half()
        tensors["checksums"][row] = torch.tensor(list(tc.entry_checksum(
            bytes(tensors["digests"][row].tolist()), tensors["params"][row],
            tensors["embeddings"][row])), dtype=torch.uint8)
    for old in cache.shards():
        old.unlink()
    save_file(tensors, str(cache.folder / "shard-tampered.safetensors"))
    with pytest.raises(UserError, match="gives cosine .* < 0.999"):
        tc.verify(cache, tiny_teacher, paths, cache.lookup(digests))
    (cache.folder / "shard-tampered.safetensors").write_bytes(b"not a shard")  # unreadable
    assert len(cache.lookup(digests).missing) == 4
    cache.fill(tiny_teacher, paths, log=_quiet)
    assert (cache.folder / "shard-tampered.damaged").is_file() and not cache.lookup(digests).missing


def test_a_full_disk_is_one_line_and_loses_nothing(tiny_data_root: Path, tiny_teacher,
                                                   tmp_path: Path, monkeypatch) -> None:
    import shutil

    import safetensors.torch

    paths = [p for p, _ in _samples(tiny_data_root)[:8]]
    cache = _cache(tmp_path, tiny_teacher)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100))
    with pytest.raises(UserError, match=r"needs about .*iB for 8 image\(s\) x 3 views, and 100 B are free.*nothing was written"):
        cache.fill(tiny_teacher, paths, log=_quiet)
    assert cache.shards() == []
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    monkeypatch.setattr(tc, "SHARD_IMAGES", 4)
    real_save, calls = safetensors.torch.save_file, []

    def save_then_fill_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fill_the_disk)
    with pytest.raises(UserError, match="disk full .* 4 of 8 image\\(s\\) stored .* nothing lost"):
        cache.fill(tiny_teacher, paths, log=_quiet)
    assert len(cache.shards()) == 1 and not list(cache.folder.glob(".*.tmp"))
    assert len(cache.lookup(tc.hash_images(paths)).missing) == 4


def test_cached_and_on_the_fly_losses_agree_within_fp16(tiny_teacher) -> None:
    from rise_edge.train.objectives import KdObjective, RiseObjective
    from rise_edge.train.student import build_student
    from rise_edge.config import StudentConfig

    text = tiny_teacher.text_embeddings(["circle", "square", "triangle"], ["a {}."], ["photo"])
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    embeddings = tiny_teacher.encode_images(images, PRE).half()  # what the cache stores
    student, _ = build_student(StudentConfig(model="test_resnet", image_size=32), "split", 3, 16)
    cfg = LossConfig(method="rise", w_kd=0.8, w_ce=0.2, w_dist=1.0)
    for objective in (KdObjective(cfg, tiny_teacher, text, PRE), RiseObjective(cfg, tiny_teacher, text, PRE)):
        fly = objective(student, images, labels)
        cached = objective(student, images, labels, teacher_embeddings=embeddings)
        # fp16 keeps 11 bits: an embedding entry is off by at most 2**-11 of itself
        a, b = float(fly["kd"].detach()), float(cached["kd"].detach())
        assert abs(a - b) <= 2e-3 * max(1.0, a)
        assert torch.equal(fly["ce"], cached["ce"])


def test_a_single_run_caches_its_source_images_only(tiny_data_root: Path, tiny_clip_dir: Path,
                                                    tmp_path: Path, monkeypatch) -> None:
    from rise_edge.train.loop import train_run

    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))
    sets = [f"data.root={tiny_data_root}", f"data.dataset={TINY_DATASET}",
            "data.target_domain=sketch", "data.val_fraction=0.25", "data.num_workers=0",
            "student.model=test_resnet", "student.image_size=32",
            f"teacher.model=local-dir:{tiny_clip_dir}", "loss.method=kd", "loss.w_kd=0.8",
            "loss.w_ce=0.2", "train.batch_size=8", "train.steps=2", "teacher.cache_views=2"]
    with pytest.raises(UserError, match="teacher.cache=on needs teacher.cache_views > 0"):
        train_run(load_recipe(None, [*sets, "teacher.cache=on", "teacher.cache_views=0"]),
                  run_dir=tmp_path / "refused", progress=False)
    result = train_run(load_recipe(None, [*sets, "teacher.cache=on"]), run_dir=tmp_path / "run",
                       progress=False)
    views = result.stats["views"]
    assert views["cache"] == "used" and views["verified_min_cosine"] >= tc.MIN_COSINE
    splits = build_splits(load_recipe(None, sets).data, progress=False)
    folder = Path(views["folder"])
    from safetensors.torch import load_file
    stored = {bytes(d.tolist()) for s in folder.glob("shard-*.safetensors")
              for d in load_file(str(s))["digests"]}
    assert stored == set(tc.hash_images([p for p, _ in splits.train_samples]))
    assert not stored & set(tc.hash_images([p for p, _ in splits.test]))  # never the target
    assert not stored & set(tc.hash_images([p for d in splits.val.values() for p, _ in d]))


def test_a_sweep_fills_one_cache_for_every_target_and_its_runs_only_read(
        tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from rise_edge.cli import main
    from rise_edge.sweep.launch import expand, fill_teacher_caches, load_sweep
    from rise_edge.train.loop import train_run

    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "base.yaml").write_text(
        f"data: {{root: '{tiny_data_root}', dataset: {TINY_DATASET}, val_fraction: 0.25, "
        "num_workers: 0}\nstudent: {model: test_resnet, image_size: 32}\n"
        f"teacher: {{model: 'local-dir:{tiny_clip_dir}', cache: auto, cache_views: 2}}\n"
        "loss: {method: kd, w_kd: 0.8, w_ce: 0.2}\ntrain: {steps: 2, batch_size: 8}\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"base: base.yaml\ntargets: [sketch, photo]\nseeds: [0, 1]\n"
                          f"output_dir: {tmp_path / 'sweep'}\n")
    info = CliRunner().invoke(main, ["teacher-cache", "info", str(sweep_file)])
    assert info.exit_code == 0 and "0 image(s) cached" in info.output, info.output
    specs = expand(load_sweep(sweep_file))
    lines: list[str] = []
    assert fill_teacher_caches(specs, lines.append) > 0
    folders = list((tmp_path / "cache" / "teacher_views").iterdir())
    assert len(folders) == 1  # one cache for 2 targets x 2 seeds
    every = set()
    for spec in specs:
        every |= {p for p, _ in build_splits(load_recipe(spec.recipe, spec.overrides).data,
                                             progress=False).train_samples}
    assert any(f"{len(every)} image(s) cached" in line for line in lines)
    spec = specs[-1]
    result = train_run(load_recipe(spec.recipe, spec.overrides), run_dir=tmp_path / "one",
                       progress=False)
    assert result.stats["views"]["cache"] == "used" and "filled" not in result.stats["views"]
    built = CliRunner().invoke(main, ["teacher-cache", "build", str(sweep_file)])
    assert built.exit_code == 0 and "0 missing" in built.output, built.output
    erm = CliRunner().invoke(main, ["teacher-cache", "build", str(tmp_path / "base.yaml"),
                                    "--set", "loss.method=erm"])
    assert erm.exit_code == 2 and "no run reads a teacher-view cache" in erm.output


def test_a_run_may_move_between_cached_and_on_the_fly_but_not_change_its_views() -> None:
    from rise_edge.train.loop import _training_changes
    from rise_edge.train.methods import resolved

    base = load_recipe(None, ["loss.method=kd", "teacher.cache_views=4"])
    moved = load_recipe(None, ["loss.method=kd", "teacher.cache_views=4", "teacher.cache=on",
                               "teacher.cache_dir=elsewhere"])
    assert _training_changes(base, resolved(moved)[0]) == []
    fewer = load_recipe(None, ["loss.method=kd", "teacher.cache_views=2"])
    assert _training_changes(base, resolved(fewer)[0]) == ["teacher.cache_views"]
