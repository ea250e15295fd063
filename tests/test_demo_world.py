"""The demo world (multi-style shape images) and the demo CLIP teacher, in miniature sizes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rise_edge.demo import teacher as teacher_mod
from rise_edge.demo import world as world_mod
from rise_edge.demo.teacher import (
    DEMO_TEACHER_MODEL, build_demo_teacher, load_demo_teacher, miniature_teacher_settings,
    zero_shot_accuracy,
)
from rise_edge.demo.world import (
    ALL_STYLES, DEMO_CLASSES, STUDENT_STYLES, TEACHER_ONLY_STYLES, caption,
    generate_world, iter_samples, miniature_world_spec,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache/rise-edge."""
    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "env-cache"))


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_cache_dir_honours_env(tmp_path: Path) -> None:
    from rise_edge.files import cache_root
    assert cache_root() == tmp_path / "env-cache"


def test_styles_and_captions() -> None:
    assert STUDENT_STYLES == ("photo", "cartoon", "painting", "sketch")
    assert len(TEACHER_ONLY_STYLES) >= 3 and not set(TEACHER_ONLY_STYLES) & set(STUDENT_STYLES)
    assert 5 <= len(DEMO_CLASSES) <= 7
    assert caption("photo", "red", "circle") == "a photo of a red circle"
    assert caption("pixel_art", "blue", "star") == "a pixel art of a blue star"


def test_layout(tmp_path: Path) -> None:
    spec = miniature_world_spec()
    root = generate_world(tmp_path, spec, progress=False)
    assert root == tmp_path / f"demo-world-{spec.hash[:12]}"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(spec.styles)
    for style in spec.styles:
        assert sorted(p.name for p in (root / style).iterdir()) == sorted(spec.classes)
        for cls in spec.classes:
            files = sorted((root / style / cls).glob("*.png"))
            assert len(files) == spec.images_per_class
    from PIL import Image

    with Image.open(next(root.rglob("*.png"))) as image:
        assert image.mode == "RGB" and image.size == (spec.image_size, spec.image_size)
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left
    assert root.stat().st_mode & 0o777 == 0o777 & ~world_mod.current_umask()  # not mkdtemp's 0700


def test_deterministic(tmp_path: Path) -> None:
    spec = miniature_world_spec()
    a = _file_digests(generate_world(tmp_path / "a", spec, progress=False))
    b = _file_digests(generate_world(tmp_path / "b", spec, progress=False))
    assert a == b
    other = replace(spec, seed=1)
    c_root = generate_world(tmp_path / "a", other, progress=False)
    assert c_root.name != f"demo-world-{spec.hash[:12]}"  # another spec, another folder
    c = _file_digests(c_root)
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)


def test_second_call_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = miniature_world_spec()
    root = generate_world(tmp_path, spec, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(world_mod, "render_sample", fail)
    assert generate_world(tmp_path, spec, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = miniature_world_spec()
    real = world_mod.render_sample
    calls = {"n": 0}

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > spec.num_images // 2:
            raise KeyboardInterrupt  # as a Ctrl-C half way
        return real(*args, **kwargs)

    monkeypatch.setattr(world_mod, "render_sample", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path, spec, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(world_mod, "render_sample", real)
    root = generate_world(tmp_path, spec, progress=False)
    assert len(list(root.rglob("*.png"))) == spec.num_images


def test_stale_temporary_folder_is_removed(tmp_path: Path) -> None:
    spec = miniature_world_spec()
    stale = tmp_path / f".demo-world-{spec.hash[:12]}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "half.png").write_bytes(b"")
    old = 1_000_000_000
    os.utime(stale, (old, old))
    generate_world(tmp_path, spec, progress=False)
    assert not stale.exists()


def test_teacher_samples_disjoint_from_student_data(tmp_path: Path) -> None:
    spec = miniature_world_spec()
    student = {hashlib.sha256(p.read_bytes()).hexdigest() for p in
               generate_world(tmp_path, spec, progress=False).rglob("*.png")}
    # Same seed, same cells, same indices: only the random stream differs.
    samples = list(iter_samples(spec.classes, spec.styles, seed=spec.seed, image_size=spec.image_size,
                                count=spec.num_images))
    from io import BytesIO

    def digest(image) -> str:
        buffer = BytesIO()
        image.save(buffer, format="PNG")
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    assert not student & {digest(s.image) for s in samples}
    assert {s.style for s in samples} == set(spec.styles)
    assert all(s.colour in spec.colours for s in samples)
    # The teacher may draw every style, including those the student never sees.
    first = next(iter_samples(DEMO_CLASSES, ALL_STYLES, seed=0, image_size=32, count=1))
    again = next(iter_samples(DEMO_CLASSES, ALL_STYLES, seed=0, image_size=32, count=1))
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))


# -- teacher ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(weights of a miniature teacher, the model as trained in memory)."""
    cache = tmp_path_factory.mktemp("teacher-cache")
    trained: list[torch.nn.Module] = []
    real = teacher_mod.train_teacher

    def keep(*args, **kwargs):
        trained.append(real(*args, **kwargs))
        return trained[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher_mod, "train_teacher", keep)
        weights = build_demo_teacher(cache, settings=miniature_teacher_settings(), progress=False,
                                     threads=1)
    return weights, trained[0]


def _outputs(model: torch.nn.Module, settings) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    torch.manual_seed(0)
    images = torch.randn(4, 3, settings.image_size, settings.image_size)
    tokens = open_clip.get_tokenizer(DEMO_TEACHER_MODEL)(["a circle", "a sketch of a red square"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_teacher_files_and_reload(mini_teacher: tuple[Path, torch.nn.Module]) -> None:
    import open_clip

    weights, trained = mini_teacher
    settings = miniature_teacher_settings()
    folder = weights.parent
    assert folder.name == f"demo-teacher-{settings.hash[:12]}" and weights.name == "model.safetensors"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "zero_shot.json",
                                                  "open_clip_config.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == list(teacher_mod.CLIP_MEAN)

    reference = _outputs(trained, settings)
    by_name = open_clip.create_model(DEMO_TEACHER_MODEL, pretrained=str(weights)).eval()
    by_helper = load_demo_teacher(weights)
    by_folder = open_clip.create_model(f"local-dir:{folder}").eval()
    for model in (by_name, by_helper, by_folder):
        for got, want in zip(_outputs(model, settings), reference):
            assert torch.equal(got, want)
    assert open_clip.get_tokenizer(DEMO_TEACHER_MODEL).context_length == settings.context_length


def test_teacher_zero_shot_record(mini_teacher: tuple[Path, torch.nn.Module]) -> None:
    import open_clip

    weights, _ = mini_teacher
    settings = miniature_teacher_settings()
    record = json.loads((weights.parent / "zero_shot.json").read_text())
    assert set(record["accuracy"]) == {"rise", "plain"}
    assert set(record["accuracy"]["rise"]) == set(STUDENT_STYLES)
    world = weights.parent.parent / record["world"]
    model = load_demo_teacher(weights)
    again = zero_shot_accuracy(model, open_clip.get_tokenizer(DEMO_TEACHER_MODEL), world,
                               STUDENT_STYLES, teacher_mod.RISE_TEMPLATES, settings.classes)
    assert again == record["accuracy"]["rise"]


def test_teacher_cache_hit(mini_teacher: tuple[Path, torch.nn.Module],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    weights, _ = mini_teacher

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(teacher_mod, "train_teacher", fail)
    mtime = weights.stat().st_mtime_ns
    again = build_demo_teacher(weights.parent.parent, settings=miniature_teacher_settings(),
                               progress=False)
    assert again == weights and weights.stat().st_mtime_ns == mtime


def test_teacher_build_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(teacher_mod, "train_teacher", dies)
    with pytest.raises(RuntimeError):
        build_demo_teacher(tmp_path, settings=miniature_teacher_settings(), progress=False, threads=1)
    assert not [p for p in tmp_path.iterdir() if "teacher" in p.name]


def test_training_batches_have_distinct_captions() -> None:
    settings = miniature_teacher_settings()
    pool = teacher_mod._build_pool(settings, progress=False)
    rng = np.random.default_rng(0)
    for _ in range(5):
        indices, texts = teacher_mod._batch(rng, teacher_mod._groups(pool), 8, 2.0)
        canonical = [t.rstrip(".").replace("the ", "a ", 1) if t.startswith("the ") else t.rstrip(".")
                     for t in texts]
        assert len(set(canonical)) == len(canonical) == len(indices)
        for i, text in zip(indices, texts):
            assert pool.classes[i] in text


def test_teacher_threads_leave_the_cores_other_processes_use(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = teacher_mod
    monkeypatch.setattr(teacher.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(teacher.os, "cpu_count", lambda: 2)
    for busy_fraction, threads in ((0.02, 2), (0.5, 1), (0.95, 1), (0.3, 2)):
        samples = iter([(0, 0), (int(busy_fraction * 1000), 1000)])
        monkeypatch.setattr(teacher, "_cpu_times", lambda: next(samples))
        assert teacher.default_threads(sample_s=0) == threads, busy_fraction
    monkeypatch.setattr(teacher, "_cpu_times", lambda: None)  # no /proc/stat: every core
    assert teacher.default_threads(sample_s=0) == 2
