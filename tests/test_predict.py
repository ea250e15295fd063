"""`rise-edge predict` and predict_run: top-1 equal to bench's for every artefact this machine runs,
streaming in constant memory (image lists, generators, a long video), the three output formats read
back, files written whole, and bad input refused with one line (exit 2, or 3 for an artefact this
machine cannot run)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import stat
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CLASSES, TINY_DATASET, TINY_TARGET

from rise_edge.backend_table import backends
from rise_edge.bench.driver import BENCH_DIR, bench_run
from rise_edge.cli import main
from rise_edge.config import BenchConfig, ExportConfig
from rise_edge.errors import UserError
from rise_edge.predict import predict_run
from rise_edge.predict.sources import expand_sources
from rise_edge.predict.stream import top_k
from rise_edge.run_dir import open_run, run_splits

pytest.importorskip("onnxruntime", reason="the ONNX artefacts need the 'cpu' extra")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _openvino_here() -> bool:
    return "openvino" in backends() and backends()["openvino"].unavailable() is None


@pytest.fixture(scope="module")
def benched(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to every CPU artefact this machine makes (ONNX FP32 and INT8, OpenVINO
    FP32 and INT8 where installed) and benched on all domains (report.json in RUN/bench/)."""
    from rise_edge.export.driver import export_run

    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("predict") / "run"))
    formats = ("onnx", "openvino") if _openvino_here() else ("onnx",)
    result = export_run(run, ExportConfig(formats=formats, int8=True, calibration_size=24),
                        progress=False)
    assert not result.failed, result.table()
    bench_run(run, BenchConfig(domains=("all",), batch_sizes=(1,), warmup=0, iterations=1),
              progress=False)
    return run


@pytest.fixture
def run_copy(benched: Path, tmp_path: Path) -> Path:
    """A writable copy of the exported run (for tests that change its records)."""
    return Path(shutil.copytree(benched, tmp_path / "exported_run"))


def _report(run: Path) -> dict:
    return json.loads((run / BENCH_DIR / "report.json").read_text())


def _domain_sources(run: Path, data_root: Path, tmp_path: Path) -> dict[str, list[str]]:
    """What bench scores per domain, as predict SOURCEs: the target's folder (all its images), and
    each source domain's validation split as a .txt list (relative paths, a comment, a blank)."""
    splits = run_splits(open_run(run))
    sources = {TINY_TARGET: [str(data_root / TINY_DATASET / TINY_TARGET)]}
    for name, samples in splits.val.items():
        listing = tmp_path / f"{name}.txt"
        lines = ["# the validation split bench scores", ""]
        lines += [str(Path(p).relative_to(tmp_path)) if Path(p).is_relative_to(tmp_path) else p
                  for p, _ in samples]
        listing.write_text("\n".join(lines) + "\n")
        sources[name] = [str(listing)]
    return sources


def test_top1_equals_bench_for_every_artefact_this_machine_runs(benched: Path, tiny_data_root: Path,
                                                                tmp_path: Path) -> None:
    rows = {r["engine"]: r for r in _report(benched)["rows"] if r["status"] == "ok"}
    expected = {"pytorch", "onnx-fp32", "onnx-int8"} | (
        {"openvino-fp32", "openvino-int8"} if _openvino_here() else set())
    assert expected <= set(rows)
    sources = _domain_sources(benched, tiny_data_root, tmp_path)
    for engine, row in rows.items():
        for domain, entry in row["accuracy"].items():
            confusion = np.zeros((len(TINY_CLASSES),) * 2, dtype=np.int64)
            predictions = predict_run(benched, sources[domain], artefact=engine, top_k=2)
            for p in predictions:
                confusion[TINY_CLASSES.index(Path(p.source).parent.name), p.class_indices[0]] += 1
            assert predictions.artefact == engine and predictions.images == entry["images"]
            # the same images, preprocessing and runner: bench's confusion matrix, image for image
            assert confusion.tolist() == entry["confusion_matrix"], (engine, domain)
            assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(entry["top1"])


def test_default_artefact_is_exports_recommendation(benched: Path, tiny_run: Path,
                                                    tiny_data_root: Path) -> None:
    folder = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle"
    recommended = json.loads((benched / "export" / "export.json").read_text())["recommended"]["int8"]
    assert predict_run(benched, [folder]).artefact == (recommended or "onnx-fp32")
    never_exported = predict_run(tiny_run, [folder])
    assert never_exported.artefact == "pytorch" and never_exported.device == "cpu"
    assert len(list(never_exported)) == 8 and never_exported.images_per_s > 0


def test_top_k_orders_by_logit_with_softmax_probabilities() -> None:
    logits = np.array([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    order, probabilities = top_k(logits, 3)
    assert order.tolist() == [[1, 2, 0], [0, 1, 2]]  # ties to the lower index, as arg-max
    assert order[:, 0].tolist() == logits.argmax(axis=1).tolist()
    full = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert probabilities[0] == pytest.approx(full[[1, 2, 0]])
    assert probabilities[1] == pytest.approx([0.25] * 3)


# ---------------------------------------------------------------------------------------------------
# Sources and streaming


def test_sources_folders_globs_and_lists(tiny_data_root: Path, tmp_path: Path) -> None:
    domain = tiny_data_root / TINY_DATASET / TINY_TARGET
    walked = [i.source for i in expand_sources([domain])]
    assert walked == sorted(walked, key=lambda s: Path(s).parts) and len(walked) == 24
    pattern = str(domain / "**" / "00[01].png")
    assert sorted(i.source for i in expand_sources([pattern])) == [
        str(domain / c / f"00{n}.png") for c in sorted(TINY_CLASSES) for n in (0, 1)]
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "list.txt"
    shutil.copy(domain / "square" / "003.png", tmp_path / "sub" / "a.png")
    listing.write_text(f"# comment\n\na.png\n  {domain / 'circle'}  \n")
    listed = [i.source for i in expand_sources([listing])]
    assert listed == [str(tmp_path / "sub" / "a.png"), *walked[:8]]


def test_the_first_prediction_comes_before_the_input_is_read(benched: Path, tiny_data_root: Path,
                                                            tmp_path: Path) -> None:
    image = tiny_data_root / TINY_DATASET / TINY_TARGET / "square" / "000.png"
    pulled = []

    def endless():  # a generator of sources that never ends: materialising it never returns
        for n in itertools.count():
            pulled.append(n)
            yield image

    stream = iter(predict_run(benched, endless(), artefact="onnx-fp32", batch=4))
    assert next(stream).classes and len(pulled) <= 5
    # a list is read line by line: a bad line far down is met only when the stream gets there
    listing = tmp_path / "long.txt"
    listing.write_text(f"{image}\n" * 6 + "missing.png\n" + f"{image}\n" * 5000)
    predictions = predict_run(benched, [listing], artefact="onnx-fp32", batch=2)
    first = list(itertools.islice(predictions, 6))
    assert [p.index for p in first] == list(range(6))
    with pytest.raises(UserError, match=r"missing\.png: no such file \(listed in .*long\.txt\)"):
        list(predictions)
    assert predictions.images == 6 and list(predictions) == []  # one stream, as a generator


def _write_video(path: Path, frames: int, size: int = 32) -> None:
    av = pytest.importorskip("av", reason="video input needs PyAV (the 'video' extra)")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for n in range(frames):
            pixels = np.full((size, size, 3), (n * 7) % 256, np.uint8)
            pixels[8:24, 8:24] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_are_named_timed_and_stepped(benched: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    _write_video(clip, 12)
    found = list(predict_run(benched, [clip], artefact="pytorch", frame_step=5, top_k=1))
    assert [p.source for p in found] == [f"{clip}#frame={n}" for n in (0, 5, 10)]
    assert [p.frame_time_s for p in found] == pytest.approx([0.0, 0.2, 0.4])


def test_memory_is_bounded_on_a_long_video(benched: Path, tmp_path: Path) -> None:
    clip = tmp_path / "long.mp4"
    _write_video(clip, 1500)
    predictions = predict_run(benched, [clip], artefact="onnx-fp32", batch=16)
    tracemalloc.start()
    try:
        stream = iter(predictions)
        for _ in itertools.islice(stream, 150):
            pass
        early = tracemalloc.get_traced_memory()[1]
        for _ in stream:
            pass
        late = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert predictions.images == 1500
    # ten times the frames, the same peak: nothing kept per frame (a list of the 1350 later
    # predictions alone would add over 500 kB)
    assert late - early < 200_000, (early, late)


def test_a_missing_video_library_is_named_with_the_extra(benched: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # import av raises ImportError
    with pytest.raises(UserError, match=r"needs the 'av' package.*pip install 'rise-edge\[video\]'"):
        list(predict_run(benched, [clip], artefact="pytorch"))


# ---------------------------------------------------------------------------------------------------
# The command line: outputs read back, files written whole


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, ["predict", *map(str, args), "--quiet"])


def test_cli_outputs_read_back_as_the_api_gives(benched: Path, tiny_data_root: Path,
                                                tmp_path: Path) -> None:
    folder = tiny_data_root / TINY_DATASET / TINY_TARGET
    api = list(predict_run(benched, [folder], artefact="onnx-int8", top_k=2))
    terminal = _cli(benched, folder, "--artefact", "onnx-int8", "--top-k", "2")
    assert terminal.exit_code == 0, terminal.output
    lines = [line.split() for line in terminal.stdout.splitlines()]
    assert [(w[0], w[1], w[3]) for w in lines] == [(p.source, *p.classes) for p in api]
    assert [float(w[2]) for w in lines] == pytest.approx([p.probabilities[0] for p in api], abs=6e-4)
    assert "24 images in" in terminal.stderr and "images/s) with onnx-int8 on cpu" in terminal.stderr

    out_csv, out_jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    for out in (out_csv, out_jsonl):
        result = _cli(benched, folder, "--artefact", "onnx-int8", "--top-k", "2", "--output", out)
        assert result.exit_code == 0 and result.stdout == "", result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["source", "frame_time_s", "class_1", "probability_1", "class_2",
                             "probability_2"]
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    for p, row, record in zip(api, rows, records, strict=True):
        assert [row["class_1"], row["class_2"]] == p.classes == record["classes"]
        assert [float(row["probability_1"]), float(row["probability_2"])] == pytest.approx(
            p.probabilities, abs=1e-6)
        assert record["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
        assert row["source"] == record["source"] == p.source and record["index"] == p.index
    assert list(tmp_path.glob(".*.tmp")) == []


def test_a_failed_run_leaves_an_existing_output_as_it_was(benched: Path, tiny_data_root: Path,
                                                          tmp_path: Path) -> None:
    good = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle"
    bad = tmp_path / "zz.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out.jsonl"
    out.write_text("earlier predictions\n")
    result = _cli(benched, good, bad, "--batch", "1", "--artefact", "pytorch", "--output", out)
    assert result.exit_code == 2 and f"{bad}: not a readable image" in result.output
    assert out.read_text() == "earlier predictions\n"
    assert list(tmp_path.glob(".*.tmp")) == []  # the half-written temporary is gone
    skipped = _cli(benched, good, bad, "--artefact", "pytorch", "--skip-bad-images", "--output", out)
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 1 unreadable image(s)" in skipped.stderr and str(bad) in skipped.stderr
    assert len(out.read_text().splitlines()) == 8


@pytest.mark.slow
def test_a_killed_predict_leaves_an_existing_output_whole(benched: Path, tiny_data_root: Path,
                                                          tmp_path: Path) -> None:
    image = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle" / "000.png"
    listing = tmp_path / "long.txt"
    listing.write_text(f"{image}\n" * 200_000)
    out = tmp_path / "out.csv"
    out.write_text("earlier predictions\n")
    child = subprocess.Popen([sys.executable, "-m", "rise_edge.cli", "predict", str(benched),
                              str(listing), "--artefact", "pytorch", "--output", str(out),
                              "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(t.stat().st_size for t in tmp_path.glob(".out.csv.*.tmp")):
            assert child.poll() is None and time.monotonic() < deadline, "predict never wrote"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert out.read_text() == "earlier predictions\n"  # half the rows exist, only in the temporary


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2 (3: an artefact this machine cannot run)


def _refused(result: object, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_bad_sources_are_refused_with_one_line(benched: Path, tmp_path: Path,
                                               tiny_data_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    _refused(_cli(benched, empty), 2, f"folder {empty} holds no images")
    text = tmp_path / "notes.md"
    text.write_text("hello")
    _refused(_cli(benched, text), 2, f"{text}: not a readable image", "--skip-bad-images")
    truncated = tmp_path / "cut.png"
    whole = (tiny_data_root / TINY_DATASET / TINY_TARGET / "circle" / "000.png").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    _refused(_cli(benched, truncated), 2, f"{truncated}: not a readable image")
    _refused(_cli(benched, tmp_path / "nope.png"), 2, "no such file or folder")
    _refused(_cli(benched, f"{empty}/*.png"), 2, "glob pattern", "holds no images")


def test_bad_artefacts_are_refused_as_bench_would_mark_them(run_copy: Path, tiny_run: Path,
                                                            tiny_data_root: Path) -> None:
    image = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle" / "000.png"
    _refused(_cli(run_copy, image, "--artefact", "onx-int8"), 2,
             "unknown artefact 'onx-int8'; did you mean 'onnx-int8'?")
    _refused(_cli(tiny_run, image, "--artefact", "onnx-int8"), 2, "not exported",
             "rise-edge export")
    (run_copy / "export" / "model.int8-cpu.onnx").write_bytes(b"swapped")
    _refused(_cli(run_copy, image, "--artefact", "onnx-int8"), 2, "tampered",
             "does not match the sha256")
    (run_copy / "export" / "model.onnx").unlink()
    _refused(_cli(run_copy, image, "--artefact", "onnx-fp32"), 2, "missing", "not on disk")


def test_an_artefact_this_machine_cannot_run_exits_3(run_copy: Path, tiny_data_root: Path) -> None:
    export_json = run_copy / "export" / "export.json"
    doc = json.loads(export_json.read_text())
    doc["artefacts"]["tensorrt-int8"] = {**doc["artefacts"]["onnx-fp32"], "format": "tensorrt",
                                         "precision": "int8", "target": "tensorrt",
                                         "path": "model.int8.engine"}
    export_json.write_text(json.dumps(doc))
    image = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle" / "000.png"
    result = _cli(run_copy, image, "--artefact", "tensorrt-int8")
    if backends()["tensorrt"].unavailable() is None:  # a GPU with TensorRT: the file is missing
        _refused(result, 2, "missing")
    else:
        _refused(result, 3, "cannot run on this machine", "--artefact")
        with pytest.raises(UserError) as raised:
            predict_run(run_copy, [image], artefact="tensorrt-int8")
        assert raised.value.exit_code == 3


def test_output_inside_the_run_directory_or_of_no_known_format_is_refused(
        benched: Path, tiny_data_root: Path, tmp_path: Path) -> None:
    image = tiny_data_root / TINY_DATASET / TINY_TARGET / "circle" / "000.png"
    record = benched / "export" / "export.json"
    before = record.read_bytes()
    _refused(_cli(benched, image, "--output", record, "--format", "jsonl"), 2,
             "lies inside the run directory", "nothing was written")
    assert record.read_bytes() == before
    _refused(_cli(benched, image, "--output", tmp_path / "p.xlsx"), 2, "--format")
    _refused(_cli(benched, image, "--output", tmp_path / "no" / "p.csv"), 2, "does not exist")
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)  # renamed over, a pipe (or a device such as /dev/full) would be replaced itself
    _refused(_cli(benched, image, "--output", pipe), 2, "not a regular file")
    assert stat.S_ISFIFO(pipe.stat().st_mode)
