"""`rise-edge bench` on the CPU, for real: a tiny run exported to ONNX FP32 + ONNX Runtime INT8, benched
end to end (library and command line); the report's schema, row statuses, percentile arithmetic, the
timing loop, and bad input (unknown domain or engine, corrupt ONNX, missing export or file, artefacts
this machine cannot run). GPU rows: marked, skipped here with the reason."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLASSES, TINY_DOMAINS, TINY_TARGET

from rise_edge.backend_table import backends
from rise_edge.backends.latency import TimingPlan, mlperf_style, percentile, summarize, time_runner
from rise_edge.backends.onnxruntime.runner import onnx_metadata
from rise_edge.bench.driver import BENCH_DIR, bench_run
from rise_edge.bench.resources import board_power_mw, parse_tegrastats_line
from rise_edge.cli import main
from rise_edge.config import BenchConfig
from rise_edge.errors import UserError
from rise_edge.export.session import PLACED_FOR, stamp_metadata
from rise_edge.files import file_sha256

onnx_stack = pytest.importorskip("onnxruntime", reason="the ONNX rows need the 'cpu' extra")

QUICK = BenchConfig(batch_sizes=(1,), warmup=1, iterations=3)
TOP_LEVEL = {"schema", "created", "seconds", "command", "argv", "run_dir", "student", "config", "machine",
             "versions", "reference", "domains", "preprocess", "latency_input", "definitions", "notes",
             "rows", "files"}
ROW_KEYS = {"engine", "backend", "format", "precision", "device", "target", "path", "status", "reason",
            "warnings", "size_bytes", "sha256", "accuracy", "latency", "mlperf", "resources", "seconds"}
LATENCY_KEYS = {"status", "batch_size", "warmup", "clock", "count", "min_ms", "mean_ms", "std_ms", "p50_ms",
                "p90_ms", "p99_ms", "max_ms", "total_ms", "images_per_s", "power"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _report(run: Path) -> dict:
    return json.loads((run / BENCH_DIR / "report.json").read_text())


def _rows(data: dict) -> dict[str, dict]:
    return {row["engine"]: row for row in data["rows"]}


@pytest.fixture(scope="module")
def exported_template(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with export/: ONNX FP32 and ONNX Runtime INT8 (built by the export library)."""
    from rise_edge.config import ExportConfig
    from rise_edge.export.driver import export_run

    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("bench_exported") / "run"))
    result = export_run(run, ExportConfig(formats=("onnx",), int8=True, calibration_size=24),
                        progress=False)
    assert not result.failed, result.table()
    return run


@pytest.fixture
def exported(exported_template: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of the exported tiny run."""
    return Path(shutil.copytree(exported_template, tmp_path / "exported_run"))


@pytest.fixture(scope="module")
def benched(exported_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One full bench (all domains, batch 1 and 4) shared by the read-only checks below."""
    run = Path(shutil.copytree(exported_template, tmp_path_factory.mktemp("benched") / "run"))
    cfg = BenchConfig(domains=("all",), batch_sizes=(1, 4), warmup=1, iterations=5)
    report = bench_run(run, cfg, progress=False)
    assert report.path == run / BENCH_DIR
    return {"run": run, "data": _report(run), "table": report.table()}


# ---------------------------------------------------------------------------------------------------
# End to end


def test_report_files_and_json_schema(benched: dict) -> None:
    data, folder = benched["data"], benched["run"] / BENCH_DIR
    assert set(data) == TOP_LEVEL
    assert data["files"] == {"json": "report.json", "markdown": "report.md",
                             "accuracy_latency": "accuracy_latency.png",
                             "accuracy_per_domain": "accuracy_per_domain.png"}
    for name in data["files"].values():
        assert (folder / name).stat().st_size > 0
    for png in ("accuracy_latency.png", "accuracy_per_domain.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [d["name"] for d in data["domains"]] == sorted(TINY_DOMAINS)
    assert {d["name"]: d["role"] for d in data["domains"]}[TINY_TARGET] == "target"
    assert data["student"]["classes"] == list(TINY_CLASSES)
    assert data["machine"]["cpu"] and data["machine"]["logical_cores"] >= 1
    assert {"torch", "onnxruntime", "python"} <= set(data["versions"])
    assert data["command"].startswith("rise-edge bench ") and "--batch 1 --batch 4" in data["command"]
    assert "linear interpolation" in data["definitions"]["percentiles"]
    assert data["preprocess"]["images"] == sum(d["images"] for d in data["domains"])
    assert data["preprocess"]["images_per_s"] > 0
    for row in data["rows"]:
        assert set(row) == ROW_KEYS | ({"int8_judge"} if row["precision"] == "int8" else set())
    markdown = (folder / "report.md").read_text()
    for text in ("## Summary", "## Accuracy per domain", "## INT8 judge (export)", "## Latency",
                 "SingleStream", "## Resources",
                 "![accuracy_latency](accuracy_latency.png)", data["command"]):
        assert text in markdown


def test_rows_statuses_and_accuracy(benched: dict) -> None:
    data = benched["data"]
    rows = _rows(data)
    assert list(rows) == ["pytorch", "onnx-fp32", "onnx-int8"]  # the reference first, then export's order
    assert all(row["status"] == "ok" and row["reason"] == "" for row in rows.values())
    assert (rows["pytorch"]["precision"], rows["onnx-int8"]["precision"]) == ("fp32", "int8")
    assert rows["onnx-int8"]["backend"] == "onnxruntime" and rows["onnx-int8"]["device"] == "cpu"
    assert rows["onnx-int8"]["path"] == "export/model.int8-cpu.onnx"
    assert 0 < rows["onnx-int8"]["size_bytes"] < rows["onnx-fp32"]["size_bytes"]
    judge = rows["onnx-int8"]["int8_judge"]  # every INT8 row carries export's verdict
    assert judge["judged"] and {"budget_points", "drop_upper95", "rule", "met"} <= set(judge)
    assert "int8_judge" not in rows["onnx-fp32"]
    images = {d["name"]: d["images"] for d in data["domains"]}
    assert images[TINY_TARGET] == 3 * 8  # the target: every image
    for row in rows.values():
        for domain, entry in row["accuracy"].items():
            confusion = np.array(entry["confusion_matrix"])
            assert confusion.shape == (3, 3) and confusion.sum() == entry["images"] == images[domain]
            assert np.trace(confusion) == entry["correct"]
            assert entry["top1"] == pytest.approx(100 * entry["correct"] / entry["images"])
            reference = rows["pytorch"]["accuracy"][domain]["top1"]
            assert entry["drop_points"] == pytest.approx(reference - entry["top1"])
    for domain in images:
        assert rows["pytorch"]["accuracy"][domain]["drop_points"] == 0
        assert rows["onnx-fp32"]["accuracy"][domain]["agreement_with_reference"] == 1.0
    assert rows["pytorch"]["accuracy"][TINY_TARGET]["top1"] > 100 / 3  # the tiny student learnt something
    resources = rows["onnx-fp32"]["resources"]
    assert resources["peak_host_rss_bytes"] > 0 and resources["peak_gpu_allocated_bytes"] is None
    table = benched["table"]
    assert "onnx-int8" in table and f"{TINY_TARGET} top-1 %" in table and "b1 p50/p90/p99 ms" in table


def test_latency_entries_and_mlperf_figures(benched: dict) -> None:
    for row in benched["data"]["rows"]:
        assert [e["batch_size"] for e in row["latency"]] == [1, 4]
        for entry in row["latency"]:
            assert set(entry) == LATENCY_KEYS and entry["status"] == "ok"
            assert entry["count"] == 5 and entry["warmup"] == 1 and entry["clock"] == "host perf_counter"
            assert entry["min_ms"] <= entry["p50_ms"] <= entry["p90_ms"] <= entry["p99_ms"] <= entry["max_ms"]
            assert entry["images_per_s"] == pytest.approx(entry["batch_size"] * 5 / (entry["total_ms"] / 1e3))
        mlperf = row["mlperf"]
        assert mlperf["single_stream_p90_ms"] == row["latency"][0]["p90_ms"]
        assert mlperf["offline_images_per_s"] == max(e["images_per_s"] for e in row["latency"])


# ---------------------------------------------------------------------------------------------------
# Statistics and the timing loop


def test_percentiles_of_a_known_list_are_linear_interpolation() -> None:
    times = list(range(100, 0, -1))  # 1..100 ms, in any order
    stats = summarize(times, batch_size=2)
    # rank h = (n - 1) q / 100 between sorted values: p50 = 50.5, p90 = 90.1, p99 = 99.01
    assert (stats["p50_ms"], stats["p90_ms"], stats["p99_ms"]) == pytest.approx((50.5, 90.1, 99.01))
    assert (stats["min_ms"], stats["mean_ms"], stats["max_ms"]) == (1, 50.5, 100)
    assert stats["count"] == 100 and stats["total_ms"] == 5050
    assert stats["images_per_s"] == pytest.approx(2 * 100 / 5.05)
    assert percentile([10, 20, 30, 40], 50) == 25 and percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        summarize([])


class _CountingRunner:
    """A CPU runner stand-in: counts calls, sleeps `ms` per run."""

    name, precision, device = "fake", "fp32", "cpu"

    def __init__(self, ms: float = 0.0):
        self.ms, self.runs, self.syncs = ms, 0, 0

    def prepare(self, images: np.ndarray) -> np.ndarray:
        return images

    def run_staged(self, staged: np.ndarray) -> np.ndarray:
        self.runs += 1
        if self.ms:
            time.sleep(self.ms / 1e3)
        return staged

    def synchronize(self) -> None:
        self.syncs += 1


def test_timing_loop_warmup_iterations_and_duration() -> None:
    runner = _CountingRunner()
    stats = time_runner(runner, np.zeros((3, 3, 4, 4), np.float32), TimingPlan(warmup=4, iterations=7))
    assert runner.runs == 11 and stats["count"] == 7 and stats["batch_size"] == 3
    assert runner.syncs >= 11  # every timed run ends synchronised
    assert "split" not in stats  # CPU: no transfers to split
    runner = _CountingRunner(ms=2.0)
    stats = time_runner(runner, np.zeros((1, 3, 4, 4), np.float32),
                        TimingPlan(warmup=0, iterations=1000, duration_s=0.05))
    assert 5 <= stats["count"] < 1000 and stats["total_ms"] >= 40  # duration, not the iteration count
    assert stats["min_ms"] >= 2.0
    assert mlperf_style([{"status": "ok", "batch_size": 8, "p90_ms": 9.0, "images_per_s": 50.0},
                         {"status": "failed", "batch_size": 1}]) == {
        "single_stream_p90_ms": None, "offline_images_per_s": 50.0, "offline_batch_size": 8}


def test_tegrastats_lines_give_board_power() -> None:
    orin_nano = ("RAM 2461/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729] "
                 "EMC_FREQ 0% GR3D_FREQ 0% cpu@47.5C VDD_IN 4941mW/4941mW VDD_CPU_GPU_CV 554mW/554mW "
                 "VDD_SOC 1426mW/1426mW")
    agx_orin = "RAM 3000/30536MB SWAP 0/15268MB VDD_GPU_SOC 3190mW/3100mW VDD_CPU_CV 797mW/790mW " \
               "VIN_SYS_5V0 3692mW/3600mW VDDQ_VDD2_1V8AO 302mW/300mW"
    jetpack4 = "RAM 1900/3956MB (lfb 5x4MB) SWAP 0/1978MB CPU [5%@102] GR3D_FREQ 0%@76 POM_5V_IN 2345/2300 " \
               "POM_5V_GPU 0/0 POM_5V_CPU 400/390"
    rails = parse_tegrastats_line(orin_nano)
    assert rails == {"VDD_IN": 4941.0, "VDD_CPU_GPU_CV": 554.0, "VDD_SOC": 1426.0}
    assert board_power_mw(rails) == ("VDD_IN", 4941.0)
    assert board_power_mw(parse_tegrastats_line(agx_orin)) == ("VIN_SYS_5V0", 3692.0)
    assert board_power_mw(parse_tegrastats_line(jetpack4)) == ("POM_5V_IN", 2345.0)
    assert board_power_mw(parse_tegrastats_line("RAM 1/2MB SWAP 0/1MB")) is None


# ---------------------------------------------------------------------------------------------------
# The command line and bad input


def test_cli_bench_end_to_end(exported: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(exported), "--engines", "torch,onnxruntime",
                                       "--batch", "1", "--iterations", "3", "--warmup", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "onnx-int8" in result.output and "report:" in result.output and "report.md" in result.output
    data = _report(exported)
    assert [r["status"] for r in data["rows"]] == ["ok", "ok", "ok"]
    assert [d["name"] for d in data["domains"]] == [TINY_TARGET]  # the default: the target domain
    assert data["config"]["iterations"] == 3 and data["config"]["engines"] == ["torch", "onnxruntime"]
    both = CliRunner().invoke(main, ["bench", str(exported), "--iterations", "3", "--duration", "1"])
    assert both.exit_code == 2 and "not both" in both.output


def test_unknown_domain_lists_the_runs_domains(tiny_run: Path) -> None:
    with pytest.raises(UserError, match=r"unknown domain 'skech' \(did you mean 'sketch'\?\); this run's "
                                        r"domains: cartoon \(source\), photo \(source\), sketch \(target\)"):
        bench_run(tiny_run, dataclasses.replace(QUICK, domains=("skech",)), progress=False)
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--domain", "mars"])
    assert result.exit_code == 2 and "unknown domain 'mars'" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(UserError, match=r"unknown engine 'onx-int8' \(did you mean 'onnx-int8'\?\)"):
        bench_run(tiny_run, dataclasses.replace(QUICK, engines=("onx-int8",)), progress=False)


def test_corrupt_onnx_gets_a_row_status_and_the_others_complete(exported: Path) -> None:
    (exported / "export" / "model.int8-cpu.onnx").write_bytes(b"not a protobuf at all" * 10)
    result = CliRunner().invoke(main, ["bench", str(exported), "--batch", "1", "--iterations", "2",
                                       "--warmup", "0", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "tampered" in result.output and "1 engine(s) failed: onnx-int8" in result.output
    rows = _rows(_report(exported))
    assert rows["pytorch"]["status"] == rows["onnx-fp32"]["status"] == "ok"
    broken = rows["onnx-int8"]
    assert broken["status"] == "tampered" and broken["accuracy"] == {} and broken["latency"] == []
    assert "does not match the sha256 export.json recorded" in broken["reason"]


def test_an_artefact_swapped_for_another_model_is_not_benchmarked(exported: Path,
                                                                 tmp_path: Path) -> None:
    # A valid ONNX of the same input and output shape (the FP32 model under the INT8 name): it would
    # load and run, and be reported as this run's INT8 model, if its hash were not checked first.
    run = Path(shutil.copytree(exported, tmp_path / "run"))
    folder = run / "export"
    (folder / "model.int8-cpu.onnx").write_bytes((folder / "model.onnx").read_bytes())
    report = bench_run(run, QUICK, progress=False)
    rows = _rows(report.data)
    assert rows["onnx-int8"]["status"] == "tampered" and rows["onnx-int8"]["accuracy"] == {}
    assert rows["onnx-fp32"]["status"] == "ok" and report.failed == ["onnx-int8"]


def test_an_artefact_whose_hash_was_removed_from_the_record_is_not_trusted(exported: Path,
                                                                          tmp_path: Path) -> None:
    """A swapped file with its sha256 taken out of export.json: unverifiable, so not run."""
    run = Path(shutil.copytree(exported, tmp_path / "run"))
    folder = run / "export"
    (folder / "model.int8-cpu.onnx").write_bytes((folder / "model.onnx").read_bytes())
    record = json.loads((folder / "export.json").read_text())
    record["artefacts"]["onnx-int8"].pop("sha256")
    (folder / "export.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["bench", str(run), "--batch", "1", "--iterations", "2",
                                       "--warmup", "0", "--quiet"])
    assert result.exit_code == 1 and "1 engine(s) failed: onnx-int8" in result.output, result.output
    rows = _rows(_report(run))
    assert rows["onnx-int8"]["status"] == "unverified" and rows["onnx-int8"]["accuracy"] == {}
    assert "records no sha256" in rows["onnx-int8"]["reason"] and "rise-edge export" in \
        rows["onnx-int8"]["reason"]
    assert rows["onnx-fp32"]["status"] == "ok"


def test_missing_export_or_file_gives_rows_for_what_exists(tiny_run: Path, exported: Path) -> None:
    report = bench_run(tiny_run, QUICK, progress=False)  # never exported
    assert [(r["engine"], r["status"]) for r in report.rows] == [("pytorch", "ok")]
    assert "rise-edge export" in report.data["notes"][0] and not report.failed
    report = bench_run(tiny_run, dataclasses.replace(QUICK, engines=("onnxruntime", "onnx-int8")),
                       progress=False)
    rows = _rows(report.data)
    assert [r["status"] for r in rows.values()] == ["ok", "missing", "missing"]
    reason = rows["onnxruntime"]["reason"]
    assert "no onnx artefact" in reason and "--format onnx" in reason
    assert "not exported" in rows["onnx-int8"]["reason"]
    assert report.failed == ["onnxruntime", "onnx-int8"]

    (exported / "export" / "model.onnx").unlink()
    rows = _rows(bench_run(exported, QUICK, progress=False).data)
    assert rows["onnx-fp32"]["status"] == "missing" and "not on disk" in rows["onnx-fp32"]["reason"]
    assert rows["onnx-int8"]["status"] == "ok"  # its own file is intact


def test_artefacts_this_machine_cannot_run_get_rows_with_reasons(exported: Path) -> None:
    export_json = exported / "export" / "export.json"
    doc = json.loads(export_json.read_text())
    fp32 = doc["artefacts"]["onnx-fp32"]
    qdq_file = exported / "export" / "model.int8-qdq-tensorrt.onnx"
    shutil.copy(exported / "export" / "model.onnx", qdq_file)
    stamp_metadata(qdq_file, {**onnx_metadata(qdq_file), PLACED_FOR: "tensorrt"})
    doc["artefacts"]["onnx-int8-tensorrt"] = {**fp32, "precision": "int8", "target": "tensorrt",
                                              "path": "model.int8-qdq-tensorrt.onnx",
                                              "sha256": file_sha256(qdq_file)}
    doc["artefacts"]["tensorrt-int8"] = {**fp32, "format": "tensorrt", "precision": "int8",
                                         "target": "tensorrt", "path": "model.int8.engine"}
    doc["artefacts"]["torch-tensorrt-fp16"] = {"format": "torch-tensorrt", "precision": "fp16",
                                               "path": "model.fp16.torch-trt.ep", "target": "tensorrt",
                                               "status": "unavailable", "reason": "no CUDA GPU here."}
    doc["artefacts"]["onnx-fp32-uint8"] = {**fp32, "student_sha256": "0" * 64}
    export_json.write_text(json.dumps(doc))

    rows = _rows(bench_run(exported, QUICK, progress=False).data)
    assert list(rows) == ["pytorch", "onnx-fp32", "onnx-fp32-uint8", "onnx-int8", "onnx-int8-tensorrt",
                          "tensorrt-int8", "torch-tensorrt-fp16"]
    # The Q/DQ graph for TensorRT runs on ONNX Runtime's CPU provider here, labelled as the graph:
    # its accuracy is the engine's up to kernel rounding, its speed is not.
    qdq = rows["onnx-int8-tensorrt"]
    assert qdq["status"] == "ok" and qdq["device"] == "cpu", qdq
    # computed as written: ONNX Runtime's fused x86 kernels would saturate its 8-bit weights
    assert qdq["backend"] == "onnxruntime (Q/DQ as written)"
    assert "TensorRT INT8 Q/DQ graph" in qdq["warnings"][0] and "says nothing about TensorRT" in \
        qdq["warnings"][0]
    assert set(qdq["accuracy"]) == set(rows["onnx-fp32"]["accuracy"])
    assert rows["onnx-fp32-uint8"]["status"] == "stale"
    assert rows["torch-tensorrt-fp16"]["status"] == "not-exported"
    assert "export status 'unavailable': no CUDA GPU here." in rows["torch-tensorrt-fp16"]["reason"]
    why_not = backends()["tensorrt"].unavailable()  # the same check on any machine
    if why_not is not None:
        assert rows["tensorrt-int8"]["status"] == "unavailable"
        assert why_not.rstrip(".") in rows["tensorrt-int8"]["reason"]
    else:  # a GPU with TensorRT: the record is run, and its file was never made
        assert rows["tensorrt-int8"]["status"] == "missing"
    assert rows["onnx-int8"]["status"] == "ok"



# ---------------------------------------------------------------------------------------------------
# GPU rows (CUDA events, H2D/compute/D2H split, CUDA graphs): only where a GPU exists


@pytest.mark.gpu
def test_gpu_rows_use_cuda_events_split_and_graphs(tiny_run: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to PyTorch): GPU rows are timed with CUDA events")
    cfg = dataclasses.replace(QUICK, batch_sizes=(1, 4), cuda_graphs=True)
    row = bench_run(tiny_run, cfg, progress=False).rows[0]
    assert row["status"] == "ok" and row["device"] == "cuda"
    for entry in row["latency"]:
        assert entry["clock"] == "cuda events"
        split = entry["split"]
        assert {"h2d", "compute", "d2h", "end_to_end"} <= set(split) and split["clock"] == "cuda events"
        assert entry["cuda_graph"]["status"] == "ok", entry["cuda_graph"]
    assert row["resources"]["peak_gpu_allocated_bytes"] > 0
