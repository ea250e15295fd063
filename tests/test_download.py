"""`rise-edge data download` against a loopback HTTP server serving a small PACS-shaped archive and
split lists: resume after a cut connection, checksums, refusals, a data set that appears only when
complete, and split lists placed where the PACS recipes read them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rise_edge.cli import main
from rise_edge.data.domains import KNOWN_DATASETS
from rise_edge.data.download import SOURCES, WORK_FOLDER, SplitLists

PACS = KNOWN_DATASETS["PACS"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def pacs_zip(*, top: str = "kfold", extra: dict[str, bytes] | None = None,
             drop_domain: str | None = None, per_class: int = 1) -> bytes:
    """A PACS-shaped zip: <top>/<domain>/<class>/<n>.png for every domain and class."""
    buffer = io.BytesIO()
    image = _png()
    with zipfile.ZipFile(buffer, "w") as zf:
        for domain in PACS.domains:
            if domain == drop_domain:
                continue
            for cls in PACS.classes or ():
                for n in range(per_class):
                    zf.writestr(f"{top}/{domain}/{cls}/{n}.png", image)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def split_lists() -> dict[str, bytes]:
    """PACS-shaped split lists as the public copy writes them (paths relative to the PACS folder,
    1-based labels): train lists name 0.png of every class, crossval lists 1.png."""
    classes = sorted(PACS.classes or ())
    return {f"{domain}_{split}_kfold.txt": "".join(
                f"{domain}/{cls}/{n}.png {i + 1}\n" for i, cls in enumerate(classes)).encode()
            for domain in PACS.domains for split, n in (("train", 0), ("crossval", 1))}


class _Server:
    """Serves `files` with Range support; `cut_after` bytes ends the first response early."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.content_type = "application/zip"
        self.ranges: list[str | None] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                outer.paths.append(self.path.lstrip("/"))
                if self.path.endswith(".zip") or self.path.endswith(".tar.gz"):
                    outer.ranges.append(self.headers.get("Range"))
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", outer.content_type)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if outer.cut_after is not None:
                    payload, outer.cut_after = payload[:outer.cut_after], None
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(autouse=True)
def pacs_lists(monkeypatch) -> dict[str, bytes]:
    """PACS's split lists are these test files: their sha256 stands in for the pinned copies'."""
    lists = split_lists()
    spec = SplitLists("PACS-splits", "http://127.0.0.1:9/lists",  # discard port: nothing listens
                      tuple((name, hashlib.sha256(data).hexdigest()) for name, data in lists.items()),
                      "the test's public copy")
    monkeypatch.setitem(SOURCES, "PACS", dataclasses.replace(SOURCES["PACS"], split_lists=spec))
    return lists


@pytest.fixture
def server(pacs_lists: dict[str, bytes]) -> Iterator[_Server]:
    srv = _Server()
    srv.files.update(pacs_lists)
    yield srv
    srv.httpd.shutdown()


def _download(root: Path, *args: str):
    return CliRunner().invoke(main, ["data", "download", "PACS", "--root", str(root), "--quiet", *args])


def _one_warning(result, *needles: str) -> None:
    """Done (exit status 0: the data set is usable), with one `warning:` line holding each needle."""
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    for needle in needles:
        assert needle in warnings[0], warnings[0]


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_download_builds_the_layout_and_records_the_checksum(server: _Server, tmp_path: Path) -> None:
    archive = pacs_zip()
    server.files["PACS.zip"] = archive
    result = _download(tmp_path, "--mirror", server.url)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "PACS").iterdir()) == sorted(PACS.domains)
    assert (tmp_path / "PACS" / "sketch" / "person" / "0.png").is_file()
    record = json.loads((tmp_path / WORK_FOLDER / "checksums.json").read_text())
    import hashlib
    assert record["PACS.zip"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert not (tmp_path / WORK_FOLDER / "PACS.zip").exists()  # archive removed after extraction
    listed = CliRunner().invoke(main, ["data", "list", "--root", str(tmp_path)])
    assert "PACS" in listed.output and "complete" in listed.output

    requests = len(server.paths)
    again = _download(tmp_path, "--mirror", server.url)  # a second run touches nothing
    assert again.exit_code == 0 and "already complete" in again.output
    assert len(server.paths) == requests and len(server.ranges) == 1


def test_a_cut_download_resumes_where_it_stopped(server: _Server, tmp_path: Path) -> None:
    archive = pacs_zip()
    server.files["PACS.zip"] = archive
    server.cut_after = len(archive) // 3
    first = _download(tmp_path, "--mirror", server.url)
    _one_line_error(first, "PACS.zip", "run the same command again to resume")
    assert not (tmp_path / "PACS").exists()  # nothing a recipe could mistake for data
    part = tmp_path / WORK_FOLDER / "PACS.zip.part"
    assert part.stat().st_size == len(archive) // 3

    second = _download(tmp_path, "--mirror", server.url)
    assert second.exit_code == 0, second.output
    assert server.ranges == [None, f"bytes={len(archive) // 3}-"]  # only the rest was fetched
    assert (tmp_path / "PACS" / "photo" / "dog" / "0.png").is_file()


def test_a_changed_archive_is_refused_against_the_recorded_checksum(server: _Server,
                                                                    tmp_path: Path) -> None:
    server.files["PACS.zip"] = pacs_zip()
    assert _download(tmp_path, "--mirror", server.url, "--keep-archives").exit_code == 0
    kept = tmp_path / WORK_FOLDER / "PACS.zip"
    assert kept.is_file()
    # The data set is removed by the user, and the source now serves another file.
    import shutil
    shutil.rmtree(tmp_path / "PACS")
    kept.unlink()
    server.files["PACS.zip"] = pacs_zip(extra={"kfold/extra.txt": b"changed"})
    result = _download(tmp_path, "--mirror", server.url)
    _one_line_error(result, "sha256", "recorded when it was first downloaded", "removed")
    assert not (tmp_path / "PACS").exists() and not kept.exists()


def test_a_users_own_archive_is_used_offline_and_never_deleted(tmp_path: Path,
                                                               pacs_lists: dict) -> None:
    mine = tmp_path / "downloads" / "PACS.zip"
    mine.parent.mkdir()
    mine.write_bytes(pacs_zip())
    lists = _lists_folder(tmp_path / "my-lists", pacs_lists)
    result = _download(tmp_path / "data", "--archive", str(mine), "--split-lists", str(lists))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "PACS" / "art_painting").is_dir()
    assert mine.is_file() and len(list(lists.iterdir())) == 8


def test_an_existing_incomplete_folder_is_left_alone(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "PACS" / "photo").mkdir(parents=True)
    (tmp_path / "PACS" / "photo" / "mine.txt").write_text("my notes")
    server.files["PACS.zip"] = pacs_zip()
    result = _download(tmp_path, "--mirror", server.url)
    _one_line_error(result, "not a complete PACS", "left as it is")
    assert (tmp_path / "PACS" / "photo" / "mine.txt").read_text() == "my notes"
    assert server.paths == []  # refused before fetching anything


@pytest.mark.parametrize("case", ["traversal", "not an archive", "wrong archive", "incomplete",
                                  "web page", "missing", "unreachable"])
def test_bad_sources_are_one_line_and_place_no_data(server: _Server, tmp_path: Path, case: str) -> None:
    mirror = server.url
    if case == "traversal":
        server.files["PACS.zip"] = pacs_zip(extra={"../../escaped.txt": b"x"})
        needle = "outside"
    elif case == "not an archive":
        server.files["PACS.zip"] = b"this is not a zip"
        needle = "cannot be extracted"
    elif case == "wrong archive":
        server.files["PACS.zip"] = pacs_zip(top="something_else")
        needle = "does not hold the folder 'kfold'"
    elif case == "incomplete":
        server.files["PACS.zip"] = pacs_zip(drop_domain="sketch")
        needle = "missing: domain sketch"
    elif case == "web page":
        server.files["PACS.zip"] = b"<html>quota exceeded</html>"
        server.content_type = "text/html"
        needle = "web page"
    elif case == "missing":
        needle = "HTTP 404"
    else:
        mirror = "http://127.0.0.1:9"  # discard port: nothing listens
        needle = "cannot reach"
    result = _download(tmp_path, "--mirror", mirror)
    _one_line_error(result, needle)
    assert not (tmp_path / "PACS").exists()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_a_killed_extraction_is_cleaned_at_the_next_start(server: _Server, tmp_path: Path) -> None:
    staging = tmp_path / WORK_FOLDER / "PACS.staging" / "kfold" / "photo"
    staging.mkdir(parents=True)
    (staging / "half.png").write_bytes(b"half")
    server.files["PACS.zip"] = pacs_zip()
    assert _download(tmp_path, "--mirror", server.url).exit_code == 0
    assert not (tmp_path / WORK_FOLDER / "PACS.staging").exists()
    assert not (tmp_path / "PACS" / "photo" / "half.png").exists()


def test_tar_archives_refuse_links_that_leave_the_folder(tmp_path: Path) -> None:
    vlcs = tmp_path / "VLCS.tar.gz"
    with tarfile.open(vlcs, "w:gz") as tf:
        link = tarfile.TarInfo("VLCS/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tf.addfile(link)
    result = CliRunner().invoke(main, ["data", "download", "vlcs", "--root", str(tmp_path / "data"),
                                       "--archive", str(vlcs), "--quiet"])
    _one_line_error(result, "VLCS.tar.gz", "cannot be extracted")
    assert vlcs.is_file() and not (tmp_path / "data" / "VLCS").exists()


@pytest.mark.parametrize("args, needle", [
    (["data", "download", "ImageNet", "--root", "ROOT"], "unknown data set 'ImageNet'"),
    (["data", "download", "PACS"], "RISE_EDGE_DATA"),
    (["data", "download", "PACS", "--root", "ROOT", "--archive", "ROOT/nope.zip"], "not a file"),
    (["data", "download", "PACS", "--root", "FILE"], "is a file"),
])
def test_bad_download_arguments_are_one_line(tmp_path: Path, monkeypatch, args: list[str],
                                             needle: str) -> None:
    monkeypatch.delenv("RISE_EDGE_DATA", raising=False)
    (tmp_path / "file").write_text("x")
    args = [a.replace("ROOT", str(tmp_path)).replace("FILE", str(tmp_path / "file")) for a in args]
    _one_line_error(CliRunner().invoke(main, args), needle)


def test_a_downloaded_pacs_trains(server: _Server, tmp_path: Path, recipe_file: Path) -> None:
    """The layout the download makes is the one training reads."""
    from rise_edge.config import load_recipe
    from rise_edge.data.domains import build_splits

    server.files["PACS.zip"] = pacs_zip()
    assert _download(tmp_path, "--mirror", server.url).exit_code == 0
    recipe = load_recipe(recipe_file, [f"data.root={tmp_path}", "data.dataset=PACS",
                                       "data.target_domain=sketch", 'data.split_lists=""'])
    splits = build_splits(recipe.data, progress=False)
    assert len(splits.classes) == 7 and splits.target_domain == "sketch" and len(splits.test) == 7


@pytest.mark.parametrize("mirror", ["ftp://example.org/pacs", "file:///tmp", "not a url"])
def test_a_mirror_that_is_not_http_is_one_line(tmp_path: Path, mirror: str) -> None:
    _one_line_error(_download(tmp_path / "data", "--mirror", mirror), "http:// or https://")
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_data_root_that_is_a_file_is_said_so(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "root.txt"
    root.write_text("not a folder")
    monkeypatch.setenv("RISE_EDGE_DATA", str(root))
    result = CliRunner().invoke(main, ["data", "list"])
    _one_line_error(result, "is a file, not a folder", "RISE_EDGE_DATA")
    _one_line_error(CliRunner().invoke(main, ["data", "list", "--root", str(root)]), "(--root)")


# ---------------------------------------------------------------------------------------------------
# Split lists


def _lists_folder(folder: Path, lists: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in lists.items():
        (folder / name).write_bytes(data)
    return folder


def test_pacs_split_lists_land_where_the_pacs_recipes_read_them(server: _Server, tmp_path: Path,
                                                                pacs_lists: dict) -> None:
    from rise_edge.config import load_recipe, resolve_recipe
    from rise_edge.data.domains import build_splits

    server.files["PACS.zip"] = pacs_zip(per_class=2)
    result = _download(tmp_path, "--mirror", server.url)
    assert result.exit_code == 0, result.output
    assert "8 files fetched, each matching its pinned sha256" in result.output
    placed = tmp_path / "PACS-splits"
    assert {p.name: p.read_bytes() for p in placed.iterdir()} == pacs_lists
    record = json.loads((tmp_path / WORK_FOLDER / "checksums.json").read_text())
    assert record["PACS-splits/photo_train_kfold.txt"]["sha256"] == hashlib.sha256(
        pacs_lists["photo_train_kfold.txt"]).hexdigest()
    assert not list((tmp_path / WORK_FOLDER).glob("*kfold*"))  # nothing left in the work folder

    recipe = load_recipe(resolve_recipe("pacs_erm_lite0"), [f"data.root={tmp_path}"])
    splits = build_splits(recipe.data, progress=False)  # the recipe's data.split_lists: PACS-splits
    assert {Path(p).name for p, _ in splits.train["photo"]} == {"0.png"}
    assert {Path(p).name for p, _ in splits.val["photo"]} == {"1.png"}
    assert len(splits.train["photo"]) == len(splits.val["cartoon"]) == 7

    again = _download(tmp_path, "--mirror", server.url)
    assert again.exit_code == 0 and "already there, left as they are" in again.output
    listed = CliRunner().invoke(main, ["data", "list", "--root", str(tmp_path)])
    assert f"split lists in {placed}" in listed.output, listed.output


def test_a_changed_split_list_is_refused_and_nothing_half_placed(server: _Server,
                                                                 tmp_path: Path) -> None:
    server.files["PACS.zip"] = pacs_zip()
    server.files["sketch_crossval_kfold.txt"] = b"sketch/dog/0.png 1\n"  # not the pinned bytes
    result = _download(tmp_path, "--mirror", server.url)
    _one_warning(result, "is in", "but not its split lists", "sketch_crossval_kfold.txt",
                 "sha256 of that file at the pinned commit", "removed",
                 f"rise-edge data download PACS --root {tmp_path}")
    assert (tmp_path / "PACS" / "photo").is_dir()  # the data set itself is complete and kept
    assert not (tmp_path / "PACS-splits").exists()
    server.files.update(split_lists())  # the source is right again: the next run completes
    assert _download(tmp_path, "--mirror", server.url).exit_code == 0
    assert len(list((tmp_path / "PACS-splits").iterdir())) == 8


def test_unreachable_split_lists_say_where_to_get_them(tmp_path: Path, pacs_lists) -> None:
    mine = tmp_path / "PACS.zip"
    mine.write_bytes(pacs_zip())
    result = _download(tmp_path / "data", "--archive", str(mine))  # lists from their (dead) source
    _one_warning(result, "but not its split lists", "cannot reach", "the test's public copy",
                 "--split-lists PATH", 'data.split_lists=""')
    assert (tmp_path / "data" / "PACS").is_dir() and not (tmp_path / "data" / "PACS-splits").exists()
    listed = CliRunner().invoke(main, ["data", "list", "--root", str(tmp_path / "data")])
    assert "split lists missing (rise-edge data download PACS fetches them)" in listed.output


@pytest.mark.parametrize("damage, needle", [
    (lambda f: (f / "photo_train_kfold.txt").unlink(), "photo_train_kfold.txt is missing"),
    (lambda f: (f / "photo_train_kfold.txt").write_text("photo/dog/0.png 2\n"), "label 2 for class dog"),
    (lambda f: (f / "photo_train_kfold.txt").write_text("sketch/dog/0.png 1\n"), "expected '<photo/"),
    (lambda f: (f / "photo_train_kfold.txt").write_text("photo/cat/0.png 1\n"), "expected '<photo/"),
    (lambda f: (f / "photo_train_kfold.txt").write_text("\n"), "is empty"),
    (lambda f: (f / "photo_train_kfold.txt").write_bytes(b"\xff\xfe"), "UTF-8"),
])
def test_given_split_lists_are_checked_before_anything_is_fetched(
        server: _Server, tmp_path: Path, pacs_lists: dict, damage, needle: str) -> None:
    lists = _lists_folder(tmp_path / "mine", pacs_lists)
    damage(lists)
    server.files["PACS.zip"] = pacs_zip()
    result = _download(tmp_path / "data", "--mirror", server.url, "--split-lists", str(lists))
    _one_line_error(result, needle)
    assert server.paths == [] and not (tmp_path / "data" / "PACS").exists()


def test_given_split_lists_may_name_paths_from_the_data_root(server: _Server, tmp_path: Path,
                                                             pacs_lists: dict) -> None:
    """The RISE code's copies write 'PACS/photo/dog/x.jpg': checked, copied as they are, and read."""
    from rise_edge.config import load_recipe, resolve_recipe
    from rise_edge.data.domains import build_splits

    prefixed = {n: b"".join(b"PACS/" + line + b"\n" for line in d.splitlines())
                for n, d in pacs_lists.items()}
    lists = _lists_folder(tmp_path / "mine", prefixed)
    server.files["PACS.zip"] = pacs_zip(per_class=2)
    result = _download(tmp_path / "data", "--mirror", server.url, "--split-lists", str(lists))
    assert result.exit_code == 0 and "checked and copied from --split-lists" in result.output
    assert (tmp_path / "data" / "PACS-splits" / "cartoon_train_kfold.txt").read_bytes() == \
        prefixed["cartoon_train_kfold.txt"]
    assert all(not p.endswith(".txt") for p in server.paths)  # nothing fetched for the lists
    recipe = load_recipe(resolve_recipe("pacs_rise_lite0"), [f"data.root={tmp_path / 'data'}"])
    splits = build_splits(recipe.data, check_images=False, progress=False)
    assert {Path(p).name for p, _ in splits.val["art_painting"]} == {"1.png"}


def test_an_incomplete_split_list_folder_is_left_alone(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "PACS-splits").mkdir()
    (tmp_path / "PACS-splits" / "notes.txt").write_text("mine")
    server.files["PACS.zip"] = pacs_zip()
    result = _download(tmp_path, "--mirror", server.url)
    _one_warning(result, "PACS-splits exists but lacks", "left as it is")
    assert (tmp_path / "PACS-splits" / "notes.txt").read_text() == "mine"
    assert not any(p.endswith(".txt") for p in server.paths)


def pacs_lists_for_a_data_set_without_them_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "download", "VLCS", "--root", str(tmp_path),
                                       "--split-lists", str(tmp_path), "--quiet"])
    _one_line_error(result, "VLCS has no official split lists")
