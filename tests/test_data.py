"""Domain data sets: layout checks, leave-one-domain-out splits, bad images, image modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLASSES, TINY_DATASET, make_tiny_dataset
from PIL import Image

from rise_edge.config import load_recipe
from rise_edge.data.domains import EpochBatches, build_splits, load_rgb
from rise_edge.errors import UserError


def _cfg(root: Path, *overrides: str):
    return load_recipe(None, [f"data.root={root}", f"data.dataset={TINY_DATASET}",
                              "data.target_domain=sketch", *overrides]).data


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "data", images_per_cell=6)


def test_leave_one_domain_out(data_root: Path) -> None:
    splits = build_splits(_cfg(data_root, "data.val_fraction=0.34"), progress=False)
    assert splits.classes == tuple(sorted(TINY_CLASSES))
    assert splits.source_domains == ("cartoon", "photo") and splits.target_domain == "sketch"
    assert len(splits.test) == 3 * 6  # every target image is a test image
    for domain in splits.source_domains:
        train, val = {p for p, _ in splits.train[domain]}, {p for p, _ in splits.val[domain]}
        assert not train & val and len(train) + len(val) == 18 and len(val) == 6
        assert all(f"/{domain}/" in p for p in train | val)
    assert not any("/sketch/" in p for p, _ in splits.train_samples)  # never trained on
    assert splits.anchors() == ("cartoon", "photo")  # source names, never the target
    # Seeded: the same seed splits the same way, another seed differently.
    again = build_splits(_cfg(data_root, "data.val_fraction=0.34"), progress=False)
    other = build_splits(_cfg(data_root, "data.val_fraction=0.34", "data.split_seed=1"),
                         progress=False)
    assert again.val == splits.val and other.val != splits.val


def test_official_split_lists(data_root: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    for domain in ("cartoon", "photo"):
        images = sorted((data_root / TINY_DATASET / domain).rglob("*.png"))
        lines = [f"{p.relative_to(data_root)} 1" for p in images]
        (lists / f"{domain}_train_kfold.txt").write_text("\n".join(lines[:-2]) + "\n")
        (lists / f"{domain}_crossval_kfold.txt").write_text("\n".join(lines[-2:]) + "\n")
    splits = build_splits(_cfg(data_root, f"data.split_lists={lists}"), progress=False)
    assert [len(splits.val[d]) for d in ("cartoon", "photo")] == [2, 2]
    assert len(splits.train["cartoon"]) == 16
    (lists / "photo_crossval_kfold.txt").unlink()
    with pytest.raises(UserError, match="split list .*photo_crossval_kfold.txt not found"):
        build_splits(_cfg(data_root, f"data.split_lists={lists}"), progress=False)


def test_missing_domain_lists_what_exists(data_root: Path) -> None:
    with pytest.raises(UserError, match=r"domain 'clipart' not found .* domains present: cartoon, "
                                        r"photo, sketch"):
        build_splits(_cfg(data_root, "data.target_domain=clipart"), progress=False)
    with pytest.raises(UserError, match="also listed in data.source_domains"):
        build_splits(_cfg(data_root, "data.source_domains=[photo, sketch]"), progress=False)


def test_missing_dataset_folder_and_root(tmp_path: Path) -> None:
    (tmp_path / "PACS_old").mkdir()
    with pytest.raises(UserError, match="folders under .*: PACS_old"):
        build_splits(load_recipe(None, [f"data.root={tmp_path}", "data.dataset=PACS",
                                        "data.target_domain=sketch"]).data, progress=False)
    with pytest.raises(UserError, match="is not a folder"):
        build_splits(_cfg(tmp_path / "nope"), progress=False)


def test_known_dataset_missing_class(tmp_path: Path) -> None:
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        for cls in ("dog", "elephant", "giraffe", "guitar", "horse", "house"):  # no person
            folder = tmp_path / "PACS" / domain / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(UserError, match=r"class folder\(s\) person missing in .*art_painting"):
        build_splits(load_recipe(None, [f"data.root={tmp_path}", "data.dataset=PACS",
                                        "data.target_domain=sketch"]).data, progress=False)


def test_class_sets_that_differ_are_listed(data_root: Path) -> None:
    shutil.rmtree(data_root / TINY_DATASET / "photo" / "square")
    with pytest.raises(UserError, match="class sets differ between domains .*photo lacks square"):
        build_splits(_cfg(data_root), progress=False)


def test_unreadable_images_stop_the_run_or_are_skipped(data_root: Path) -> None:
    good = data_root / TINY_DATASET / "photo" / "circle" / "000.png"
    truncated = good.with_name("truncated.png")
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = data_root / TINY_DATASET / "sketch" / "square" / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(UserError) as info:
        build_splits(_cfg(data_root), progress=False)
    message = str(info.value)
    assert "2 unreadable image(s)" in message and str(truncated) in message and str(garbage) in message
    assert "data.skip_bad_images=true" in message
    splits = build_splits(_cfg(data_root, "data.skip_bad_images=true"), progress=False)
    assert set(splits.skipped_images) == {str(truncated), str(garbage)}
    every = [p for d in splits.source_domains for p, _ in splits.train[d] + splits.val[d]]
    assert str(truncated) not in every and str(garbage) not in [p for p, _ in splits.test]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK"])
def test_every_image_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image = Image.new("RGB", (6, 6), (200, 30, 30)).convert(mode)
    if mode == "RGBA":
        image.putpixel((0, 0), (0, 0, 0, 0))  # transparent pixel: composited on white
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (6, 6)
    if mode == "RGBA":
        assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_epoch_batches_shard_the_same_global_batches() -> None:
    single = EpochBatches(50, 8, seed=3)
    ranks = [EpochBatches(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    for whole, part0, part1 in zip(single, *ranks):
        assert sorted(whole) == sorted(part0 + part1)  # same images, same per-sample seeds
    assert len(single) == 6  # last partial batch dropped
    single.set_epoch(2, start_batch=4)  # resume mid-epoch
    assert len(list(single)) == 2
    with pytest.raises(UserError, match="does not split evenly"):
        EpochBatches(50, 7, seed=0, world_size=2)
    with pytest.raises(UserError, match="larger than the 5 training images"):
        EpochBatches(5, 8, seed=0)


def test_seeded_augmentation_depends_on_the_seed_alone(data_root: Path) -> None:
    import torch

    from rise_edge.data.domains import DomainImages
    from rise_edge.data.transforms import Preprocessing, train_transform

    splits = build_splits(_cfg(data_root), progress=False)
    images = DomainImages(splits.train_samples, train_transform(Preprocessing(8, (0.5,) * 3, (0.5,) * 3)))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, label = images[(0, 7)]
    torch.rand(5)  # whatever the caller draws in between
    again, _ = images[(0, 7)]
    other, _ = images[(0, 8)]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert label == splits.train_samples[0][1]
    torch.manual_seed(123)
    images[(0, 7)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left as it was


def test_the_splits_record_round_trips_with_paths_relative_to_the_folder(data_root: Path) -> None:
    import os

    from rise_edge.data.domains import splits_from_record, splits_to_record

    splits = build_splits(_cfg(data_root), progress=False)
    record = splits_to_record(splits)
    assert [p for p, _ in record["test"]] == [
        Path(os.path.relpath(p, splits.dataset_dir)).as_posix() for p, _ in splits.test]
    assert all(not p.startswith("/") for d in record["train"].values() for p, _ in d)
    assert splits_from_record(record) == splits
