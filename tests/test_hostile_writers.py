"""Hostile writers: a command that reads a run never writes into it (a destination inside, equal to
or holding what it reads is one line, checked before anything is written), reading needs no write
access, a full disk is one line naming the place being written, a killed or failed writer leaves
nothing behind for the next start, serving formats refuse class names their label files cannot
carry, a download whose mirror lacks the split lists still places a usable data set, and messages
quote only options the user gave. Each case: the exit status, one line, no traceback, and the
run (or data) that was only read left byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_DATASET, train_cli_args
from test_download import _Server, pacs_zip, split_lists

from rise_edge.cli import main
from rise_edge.files import run_lock, write_json_atomic
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON


def _tree(folder: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under `folder`, hidden ones included."""
    return {str(p.relative_to(folder)): "folder" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _error_line(result, exit_code: int = 2, *needles: str) -> str:
    """The one `error:` line of a refused command (progress bars aside), holding each needle."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.replace("\r", "\n").splitlines()
             if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def site(tmp_path: Path, tiny_data_root: Path) -> Path:
    """The target domain's images, flat: a site folder."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i, p in enumerate(sorted((tiny_data_root / TINY_DATASET / "sketch").rglob("*.png"))):
        shutil.copy(p, folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def _exported_template(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to ONNX FP32 (all a Triton bundle of onnx-fp32, or a DeepStream bundle
    of tensorrt-fp32, reads)."""
    from rise_edge.config import ExportConfig
    from rise_edge.export.driver import export_run

    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("writers") / "run"))
    assert not export_run(run, ExportConfig(formats=("onnx",)), progress=False).failed
    return run


@pytest.fixture
def exported(_exported_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(_exported_template, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# Writing into what must only be read


def _make_bundle_holding(run: Path) -> Path:
    """A rise-edge bundle folder with the run moved inside it (replacing it deletes the run)."""
    bundle = run.parent / "old-bundle"
    bundle.mkdir()
    write_json_atomic(bundle / "manifest.json", {"kind": "rise-edge serving bundle", "schema": 1})
    return Path(shutil.move(run, bundle / "run"))


@pytest.mark.parametrize("case, needle", [
    ("adapt child inside the parent", "lies inside the parent run"),
    ("adapt child is the parent", "is the parent run"),
    ("adapt child holds the parent", "holds the parent run"),
    ("adapt child inside the parent through a link", "lies inside the parent run"),
    ("bundle is the run", "is the run"),
    ("bundle inside the run's export folder", "lies inside the run's export folder"),
    ("bundle holds the run", "holds the run"),
])
def test_a_writer_never_writes_into_the_run_it_reads(exported: Path, site: Path, tmp_path: Path,
                                                     case: str, needle: str) -> None:
    run = _make_bundle_holding(exported) if case == "bundle holds the run" else exported
    (tmp_path / "link").symlink_to(run)
    dest = {"adapt child inside the parent": run / "child",
            "adapt child is the parent": run,
            "adapt child holds the parent": run.parent,
            "adapt child inside the parent through a link": tmp_path / "link" / "child",
            "bundle is the run": run,
            "bundle inside the run's export folder": run / EXPORT_DIR / "bundle",
            "bundle holds the run": run.parent}[case]
    watched = run.parent if case == "bundle holds the run" else run
    before = _tree(watched)
    if case.startswith("adapt"):
        result = _run("adapt", run, "--site", site, "--run-dir", dest, "--no-export", "--quiet")
        option = "--run-dir"
    else:
        result = _run("export", run, "--format", "triton", "--serve", "onnx-fp32",
                      "--bundle-dir", dest, "--quiet")
        option = "--bundle-dir"
    _error_line(result, 2, needle, option, "nothing was written")
    assert _tree(watched) == before


def test_a_sweep_never_puts_its_runs_into_the_data_set(tiny_data_root: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    import rise_edge.sweep.launch as launch

    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data"))
    (tmp_path / "base.yaml").write_text(
        f"data: {{root: '{data}', dataset: {TINY_DATASET}, val_fraction: 0.25, num_workers: 0}}\n"
        "student: {model: test_resnet, pretrained: none, image_size: 32}\n"
        "train: {steps: 2, batch_size: 8}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: base.yaml\ntargets: [sketch]\nseeds: [0]\n"
                     f"output_dir: '{data / TINY_DATASET / 'sweeps'}'\n")
    # Were the sweep to start, its runs would train into the data set: stood in for by nothing.
    monkeypatch.setattr(launch, "_local_pool", lambda *a, **k: None)
    before = _tree(data)
    _error_line(_run("sweep", sweep), 2, "output_dir", "lies inside the data set",
                "nothing was written")
    assert _tree(data) == before


@pytest.mark.parametrize("place", ["the demo world", "the demo teacher"])
def test_the_demo_never_puts_its_runs_into_its_world_or_teacher(tmp_path: Path, monkeypatch,
                                                                place: str) -> None:
    from rise_edge.config import load_recipe
    from rise_edge.demo.story import _built_places, default_demo_recipe

    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))
    folder = dict((w, p) for p, w in _built_places(load_recipe(default_demo_recipe())))[place]
    folder.mkdir(parents=True)
    (folder / "kept.txt").write_text("built once, then only read")
    # Were the demo to go on, it would build and train: its steps are stood in for.
    monkeypatch.setattr("rise_edge.demo.story._story", lambda *a, **k: pytest.fail("went on"))
    before = _tree(folder.parent)
    _error_line(_run("demo", "--out", folder / "runs"), 2, "--out", f"lies inside {place}")
    assert _tree(folder.parent) == before


# ---------------------------------------------------------------------------------------------------
# Reading a run needs no write access to it


def _read_only(monkeypatch, folder: Path) -> None:
    """Every write under `folder` fails as on a read-only mount (EROFS). The tests run as root,
    whom file permissions do not stop, so the os calls themselves refuse."""
    base = os.path.realpath(folder)

    def inside(path) -> bool:
        try:
            real = os.path.realpath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return real == base or real.startswith(base + os.sep)

    def refuse(path) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_io_open = os.open, io.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and inside(path):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and inside(file):
            raise refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def refusing(name: str):
        real = getattr(os, name)

        def call(path, *args, **kwargs):
            if inside(path) or (args and isinstance(args[0], (str, Path)) and inside(args[0])):
                raise refuse(path)
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr("builtins.open", io_open)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, refusing(name))


@pytest.mark.parametrize("lock_file", ["none yet", "left by an earlier command"])
def test_adapt_reads_a_parent_in_a_read_only_folder(tiny_run: Path, site: Path, tmp_path: Path,
                                                    monkeypatch, lock_file: str) -> None:
    shelf = tmp_path / "shelf"  # the read-only folder holding the parent run
    shelf.mkdir()
    parent = Path(shutil.move(tiny_run, shelf / "run"))
    if lock_file != "none yet":
        (shelf / ".run.rise-edge.lock").write_text("rise-edge export (pid 1)")
    before = _tree(shelf)
    with monkeypatch.context() as patch:
        _read_only(patch, shelf)
        result = _run("adapt", parent, "--site", site, "--no-export", "--quiet", "--run-dir",
                      tmp_path / "child")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "child" / "adapt.json").is_file()
    assert _tree(shelf) == before
    # A reader still never reads a run while a writer holds it.
    with run_lock(parent, "export"):
        _error_line(_run("adapt", parent, "--site", site, "--no-export", "--quiet", "--run-dir",
                         tmp_path / "child2"), 2, "in use by rise-edge export")
    assert not (tmp_path / "child2").exists()


# ---------------------------------------------------------------------------------------------------
# A full disk while adapt writes its child


def _fail_copies_to(monkeypatch, part: str) -> None:
    """A full disk for the copies whose destination path holds `part` (shutil copies with
    os.sendfile on Linux, and names the copy's source in the error it raises)."""
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, *args):
        if part in os.readlink(f"/proc/self/fd/{out_fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(out_fd, in_fd, *args)
    monkeypatch.setattr(os, "sendfile", sendfile)


def _fail_writer(monkeypatch, name: str, file: str) -> None:
    """rise_edge.site.child's `name` writes half of its temporary, then meets a full disk."""
    def full(folder_or_path, *args, **kwargs) -> None:
        folder = Path(folder_or_path)
        folder = folder if folder.is_dir() else folder.parent
        tmp = folder / f".{file}.abcd1234.tmp"
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    monkeypatch.setattr(f"rise_edge.site.child.{name}", full)


@pytest.mark.parametrize("writing", ["recipe.yaml", "text_embeddings/classes.safetensors",
                                     "student.safetensors", "adapt.json"])
def test_a_full_disk_while_adapt_writes_its_child_names_the_child(
        tiny_run: Path, site: Path, tmp_path: Path, monkeypatch, writing: str) -> None:
    (tiny_run / "text_embeddings").mkdir()
    (tiny_run / "text_embeddings" / "classes.safetensors").write_bytes(b"stand-in embeddings")
    if writing == "student.safetensors":
        _fail_writer(monkeypatch, "save_student", writing)
    elif writing == "adapt.json":
        _fail_writer(monkeypatch, "write_json_atomic", writing)
    else:
        _fail_copies_to(monkeypatch, Path(writing).name)
    before = _tree(tiny_run)
    result = _run("adapt", tiny_run, "--site", site, "--no-export", "--quiet")  # its default place
    line = _error_line(result, 2, "No space left on device", f"(writing {writing})",
                       "give --run-dir DIR")
    child = line.split("cannot write the adapted run ")[1].split(":")[0]
    assert Path(child).parent == tiny_run.parent and Path(child) != tiny_run
    assert str(tiny_run) + "/" not in line  # never a path in the parent
    assert "choose a writable --run-dir" not in line  # an option the user did not give
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(tiny_run.name)) == ["run"]
    assert not [p for p in tmp_path.iterdir() if ".work" in p.name]
    assert _tree(tiny_run) == before


# ---------------------------------------------------------------------------------------------------
# Leftovers after a kill or a failure


@pytest.mark.slow
def test_a_bundle_killed_mid_write_leaves_nothing_for_the_next_start(exported: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "served"
    out.mkdir()
    (out / ".work-bundle-x-abcd1234").mkdir()  # another bundle's work folder: never ours to remove
    kill = ("import os, signal, sys\n"
            "import rise_edge.serving.bundle as bundle\n"
            "bundle.replace_whole = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from rise_edge.cli import main\n"
            "main(sys.argv[1:])\n")
    args = ["export", str(exported), "--format", "triton", "--serve", "onnx-fp32", "--quiet",
            "--bundle-dir", str(out / "bundle")]
    killed = subprocess.run([sys.executable, "-c", kill, *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".work-bundle-")
            and p.name != ".work-bundle-x-abcd1234"]  # the kill left its work folder
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert (out / "bundle" / "manifest.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".work")) == [
        ".work-bundle-x-abcd1234"]


def test_a_failed_bench_report_leaves_the_earlier_report_whole(tiny_run: Path,
                                                               monkeypatch) -> None:
    quick = ["--engines", "pytorch", "--iterations", "1", "--warmup", "0", "--batch", "1",
             "--max-images", "6", "--quiet"]
    assert _run("bench", tiny_run, *quick).exit_code == 0
    before = _tree(tiny_run)
    real = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(".report.md."):  # the disk fills while the report is written
            real(self, text[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = _run("bench", tiny_run, *quick)
    _error_line(result, 2, "No space left on device", str(tiny_run / "bench" / "report.md"))
    assert _tree(tiny_run) == before  # every report file as it was, no temporary left


def test_a_failed_sweep_plot_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from rise_edge.sweep.collect import _plot

    (tmp_path / "results.png").write_bytes(b"the earlier plot")

    def savefig(self, fname, *args, **kwargs) -> None:
        Path(fname).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(Figure, "savefig", savefig)
    data = {"tables": {"PACS": {"targets": ["photo"], "methods": {"erm": {"training": {
        "photo": [50.0, 1.0, 3], "avg": [50.0, 1.0, 3]}}}}}}
    with pytest.raises(OSError):
        _plot(data, tmp_path / "results.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.png"]
    assert (tmp_path / "results.png").read_bytes() == b"the earlier plot"


# ---------------------------------------------------------------------------------------------------
# Serving formats and class names


@pytest.mark.parametrize("fmt, name, rule", [
    ("triton", "dog\ncat", "one class a line"),
    ("triton", "dog\rcat", "one class a line"),
    ("deepstream", "dog;cat", "separates the classes"),
    ("deepstream", "dog\ncat", "on one line"),
])
def test_a_class_name_a_label_file_cannot_carry_is_refused_before_writing(
        exported: Path, fmt: str, name: str, rule: str) -> None:
    export_json = exported / EXPORT_DIR / EXPORT_JSON
    document = json.loads(export_json.read_text())
    document["student"]["classes"][1] = name
    write_json_atomic(export_json, document)
    before = _tree(exported)
    serve = "onnx-fp32" if fmt == "triton" else "tensorrt-fp32"
    result = _run("export", exported, "--format", fmt, "--serve", serve, "--quiet")
    _error_line(result, 2, f"--format {fmt}", repr(name), rule, "nothing was written")
    assert _tree(exported) == before
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".work")]


# ---------------------------------------------------------------------------------------------------
# Data download: the data set and its split lists are two results


@pytest.fixture
def lists_source(monkeypatch) -> dict[str, bytes]:
    """PACS's split lists are the test files of test_download (their sha256 pinned)."""
    import dataclasses

    from rise_edge.data.download import SOURCES, SplitLists

    lists = split_lists()
    spec = SplitLists("PACS-splits", "http://127.0.0.1:9/lists",  # nothing listens there
                      tuple((n, hashlib.sha256(d).hexdigest()) for n, d in lists.items()),
                      "the test's public copy")
    monkeypatch.setitem(SOURCES, "PACS", dataclasses.replace(SOURCES["PACS"], split_lists=spec))
    return lists


@pytest.mark.parametrize("mirror", ["has no split lists", "has a changed split list",
                                    "is unreachable for the lists"])
def test_a_mirror_without_the_split_lists_still_gives_a_usable_data_set(
        lists_source: dict[str, bytes], tmp_path: Path, mirror: str) -> None:
    server = _Server()
    server.files["PACS.zip"] = pacs_zip(per_class=2)
    args = ["--mirror", server.url]
    if mirror == "has a changed split list":
        server.files.update(lists_source)
        server.files["photo_train_kfold.txt"] = b"photo/dog/0.png 1\n"
    elif mirror == "is unreachable for the lists":
        archive = tmp_path / "PACS.zip"
        archive.write_bytes(server.files["PACS.zip"])
        args = ["--archive", str(archive)]  # the lists then come from their (dead) source
    try:
        root = tmp_path / "data"
        result = _run("data", "download", "PACS", "--root", root, "--quiet", *args)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "Traceback" not in result.output, result.output
        assert f"rise-edge data download PACS --root {root}`" in warnings[0]
        assert "but not its split lists" in warnings[0]
        assert (root / "PACS" / "photo" / "dog").is_dir() and not (root / "PACS-splits").exists()
        assert not list((root / ".rise-edge-downloads").glob("*kfold*"))
        # The recipes that read the lists say so at train time, in one line.
        trained = _run("train", "pacs_erm_lite0", "--set", f"data.root={root}", "--run-dir",
                       tmp_path / "run")
        _error_line(trained, 2, f"{root / 'PACS-splits'} is not a folder",
                    f"rise-edge data download PACS --root {root}`", 'data.split_lists=""')
        # Fetched later, as the warning says: the data set kept, only the lists fetched.
        server.files.update(lists_source)
        kept = _tree(root / "PACS")
        later = _run("data", "download", "PACS", "--root", root, "--quiet", "--mirror", server.url)
        assert later.exit_code == 0 and "warning" not in later.output, later.output
        assert len(list((root / "PACS-splits").iterdir())) == 8 and _tree(root / "PACS") == kept
    finally:
        server.httpd.shutdown()


# ---------------------------------------------------------------------------------------------------
# Messages that quote only what the user gave, and name the right path


def test_resuming_in_a_users_folder_says_there_is_nothing_to_resume(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    before = _tree(mine)
    result = _run("train", recipe_file, *train_cli_args(tiny_data_root, mine), "--resume")
    _error_line(result, 2, f"nothing to resume in {mine}", "not a rise-edge run directory",
                "notes.txt", "nothing in it was touched")
    assert _tree(mine) == before


@pytest.mark.parametrize("case", ["run name without letters", "default bundle place is theirs",
                                  "train's default run directory is theirs",
                                  "adapt's default child exists", "full disk in a bundle copy"])
def test_messages_quote_only_options_given_and_name_the_path_written(
        exported: Path, site: Path, tiny_data_root: Path, recipe_file: Path, tmp_path: Path,
        monkeypatch, case: str) -> None:
    run = exported
    args: list = ["export", run, "--format", "triton", "--serve", "onnx-fp32", "--quiet"]
    never, needles = "", []
    if case == "run name without letters":
        run = Path(shutil.move(exported, tmp_path / "§§§"))
        args[1] = run
        never = "--model-name '"
        needles = ["run directory's name '§§§'", "give --model-name NAME"]
    elif case == "default bundle place is theirs":
        (run / "bundle").mkdir()
        (run / "bundle" / "notes.txt").write_text("theirs")
        never, needles = "another --bundle-dir", ["give --bundle-dir DIR"]
    elif case == "train's default run directory is theirs":
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs" / "mine").mkdir(parents=True)
        (tmp_path / "runs" / "mine" / "notes.txt").write_text("theirs")
        args = ["train", recipe_file, *train_cli_args(tiny_data_root, Path("x"))[2:],
                "--set", "train.output_dir=runs", "--set", "train.run_name=mine"]
        never, needles = "another --run-dir", ["give --run-dir DIR"]
    elif case == "adapt's default child exists":
        from rise_edge.data.site_images import find_site_images
        from rise_edge.site.child import default_child_dir

        default = default_child_dir(run, "adabn", find_site_images(site, runs=(run,)), "sources")
        default.mkdir()
        args = ["adapt", run, "--site", site, "--no-export", "--quiet"]
        never, needles = "another --run-dir", ["already exists", "give --run-dir DIR"]
    else:
        _fail_copies_to(monkeypatch, "model.onnx")
        never = f"{EXPORT_DIR}/model.onnx"  # the copy's source, never the place that is full
        needles = ["No space left on device", f"cannot write the bundle {run / 'bundle'}",
                   "(writing triton/run_onnx_fp32/1/model.onnx)"]
    before = _tree(run)
    line = _error_line(_run(*args), 2, *needles)
    assert never not in line
    assert _tree(run) == before
