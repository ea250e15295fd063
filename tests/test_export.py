"""`rise-edge export` on the CPU, for real: ONNX FP32 (+ folded preprocessing), ONNX Runtime INT8 with
the accuracy budget, the calibration set, atomic failure behaviour, errors; GPU formats marked and
skipped with the reason where there is no CUDA/TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLASSES, TINY_TARGET, tiny_recipe_overrides

from rise_edge.backend_table import artefacts, backends, runner_for
from rise_edge.backends.onnxruntime import OnnxRuntimeRunner, onnx_metadata
from rise_edge.backends.pytorch import TorchRunner
from rise_edge.cli import main
from rise_edge.config import ExportConfig, load_recipe
from rise_edge.data.domains import build_splits
from rise_edge.errors import UserError
from rise_edge.export.calibration import select_calibration_set
from rise_edge.export.driver import export_run, plan_artefacts
from rise_edge.export.judge import RULE
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON, open_run, save_student

CPU_ALL = ExportConfig(formats=("onnx",), int8=True, fold_preprocessing=True, calibration_size=24)


def _export_json(run: Path) -> dict:
    return json.loads((run / EXPORT_DIR / EXPORT_JSON).read_text())


@pytest.fixture(scope="module")
def exported(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CPU export (FP32, folded uint8 graph, INT8) shared by the read-only checks below."""
    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("exported") / "run"))
    result = export_run(run, CPU_ALL, progress=False)
    assert not result.failed, result.table()
    return run


def test_onnx_metadata_carries_everything_a_runtime_needs(exported: Path) -> None:
    meta = onnx_metadata(exported / EXPORT_DIR / "model.onnx")
    run = open_run(exported)
    assert meta["classes"] == list(TINY_CLASSES)
    assert meta["input_size"] == 32
    assert meta["mean"] == list(run.meta.preprocessing.mean)
    assert meta["std"] == list(run.meta.preprocessing.std)
    assert meta["interpolation"] == run.meta.preprocessing.interpolation
    assert meta["source_domains"] == ["cartoon", "photo"] and meta["target_domain"] == TINY_TARGET
    assert meta["recipe"]["student"]["model"] == "test_resnet"
    assert meta["precision"] == "fp32" and meta["input"] == "float32-nchw"
    model = onnx.load(str(exported / EXPORT_DIR / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    assert onnx_metadata(exported / EXPORT_DIR / "model.int8-cpu.onnx")["precision"] == "int8"

    document = _export_json(exported)
    assert document["student"]["classes"] == list(TINY_CLASSES)
    assert document["student"]["target_domain"] == TINY_TARGET
    assert document["student"]["preprocessing"]["mean"] == list(run.meta.preprocessing.mean)
    assert {"onnx", "onnxruntime", "torch"} <= set(document["versions"])
    for name in ("onnx-fp32", "onnx-fp32-uint8", "onnx-int8"):
        record = document["artefacts"][name]
        assert record["status"] == "ok"
        path = exported / EXPORT_DIR / record["path"]
        assert path.is_file() and record["bytes"] == path.stat().st_size
    assert not [p for p in (exported / EXPORT_DIR).iterdir() if p.name.startswith(".")]  # no temp left


def test_parity_recorded_and_within_tolerance(exported: Path) -> None:
    parity = _export_json(exported)["artefacts"]["onnx-fp32"]["parity"]
    assert parity["images"] == 12  # every source-val image of the tiny set (6 per source domain)
    assert parity["max_abs_logit_diff"] <= parity["tolerance"] == CPU_ALL.parity_tolerance
    assert parity["top1_agreement"] == 1.0
    # ...and the runners agree with that record independently
    run = open_run(exported)
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    onnx_logits = OnnxRuntimeRunner(exported / EXPORT_DIR / "model.onnx")(images)
    torch_logits = TorchRunner(module=run.student, device="cpu")(images)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4


def test_folded_preprocessing_takes_uint8_frames(exported: Path) -> None:
    path = exported / EXPORT_DIR / "model.uint8-nhwc.onnx"
    model = onnx.load(str(path))
    graph_input = model.graph.input[0].type.tensor_type
    assert graph_input.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in graph_input.shape.dim][1:] == [32, 32, 3]
    record = _export_json(exported)["artefacts"]["onnx-fp32-uint8"]
    assert record["parity"]["max_abs_logit_diff_same_pixels"] <= CPU_ALL.parity_tolerance
    # camera pixels in, the same logits as normalising them by hand and running PyTorch
    run = open_run(exported)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    runner = OnnxRuntimeRunner(path)
    out = runner.session.run(None, {runner.input_name: pixels})[0]
    pre = run.meta.preprocessing
    images = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.reshape(pre.mean, (1, 3, 1, 1))) / np.reshape(
        pre.std, (1, 3, 1, 1))
    with torch.no_grad():
        expected = run.student(torch.from_numpy(images.astype(np.float32))).numpy()
    assert np.abs(out - expected).max() < 1e-4


def test_int8_artefact_and_budget_record(exported: Path) -> None:
    record = _export_json(exported)["artefacts"]["onnx-int8"]
    model = onnx.load(str(exported / EXPORT_DIR / record["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    budget = record["accuracy_budget"]
    fidelity = budget["fidelity"]["per_domain"]
    assert set(fidelity) == {"cartoon", "photo"}  # source domains only, never the target
    for domain in fidelity.values():
        low, high = domain["agreement_ci95"]
        assert 0 <= low <= domain["agreement"] <= high <= 100
        assert domain["images"] > 0
    assert budget["budget_points"] == 1.0 and budget["met"] is True
    stress = budget["stress"]  # the same judge images, shifted: reported beside, deciding nothing
    assert stress["decides"] is False and set(stress["fidelity"]["per_domain"]) == {"cartoon", "photo"}
    assert [d["images"] for d in stress["fidelity"]["per_domain"].values()] == [
        d["images"] for d in fidelity.values()]
    assert set(budget["edge_policy"]) >= {"first", "last", "rule"}
    assert record["calibration_method"] == "minmax"
    assert record["quantization"]["per_channel"] is True
    assert {"fp32", "int8"} <= set(record["latency_batch1_ms"])
    runner = runner_for(record, exported / EXPORT_DIR, device="cpu")
    assert runner.precision == "int8"
    logits = runner(np.zeros((2, 3, 32, 32), np.float32))
    assert logits.shape == (2, len(TINY_CLASSES))


def test_calibration_list_in_export_json_is_source_training_only(exported: Path) -> None:
    calibration = _export_json(exported)["calibration"]
    run = open_run(exported)
    splits = build_splits(run.recipe.data, progress=False)
    train = {str(Path(p).relative_to(splits.dataset_dir).as_posix())
             for d in splits.source_domains for p, _ in splits.train[d]}
    val = {str(Path(p).relative_to(splits.dataset_dir).as_posix())
           for d in splits.source_domains for p, _ in splits.val[d]}
    files = calibration["files"]
    assert len(files) == calibration["size"] == 24 and len(set(files)) == 24
    assert not [f for f in files if f.split("/")[0] == TINY_TARGET]
    assert set(files) <= train and not set(files) & val
    assert calibration["per_domain"] == {"cartoon": 12, "photo": 12}
    assert calibration["per_class"] == {c: 8 for c in TINY_CLASSES}
    assert len(calibration["sha256"]) == 64


def test_calibration_selection_is_balanced_seeded_and_content_hashed(tiny_data_root: Path,
                                                                     tmp_path: Path) -> None:
    recipe = load_recipe(None, tiny_recipe_overrides(tiny_data_root))
    splits = build_splits(recipe.data, progress=False)
    for size in (5, 7, 12):  # any prefix is as balanced as possible over (domain, class) cells
        chosen = select_calibration_set(splits, size)
        per_cell: dict[tuple[str, int], int] = {}
        for f, y in zip(chosen.files, chosen.labels):
            per_cell[(f.split("/")[0], y)] = per_cell.get((f.split("/")[0], y), 0) + 1
        counts = list(per_cell.values()) + [0] * (6 - len(per_cell))
        assert max(counts) - min(counts) <= 1, (size, per_cell)
    everything = select_calibration_set(splits, 10_000)  # capped by what exists
    assert len(everything.files) == len(splits.train_samples)
    assert select_calibration_set(splits, 12, seed=0) == select_calibration_set(splits, 12, seed=0)
    assert select_calibration_set(splits, 12, seed=1).files != select_calibration_set(splits, 12).files

    # the hash follows the images' bytes, not only their names
    data = Path(shutil.copytree(tiny_data_root, tmp_path / "data_copy"))
    copied = dataclasses.replace(splits, dataset_dir=data / splits.dataset_dir.name, train={
        d: [(str(data / Path(p).relative_to(tiny_data_root)), y) for p, y in s]
        for d, s in splits.train.items()})
    before = select_calibration_set(copied, 6)
    assert before.sha256 == select_calibration_set(splits, 6).sha256
    victim = before.paths[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    after = select_calibration_set(copied, 6)
    assert after.files == before.files and after.sha256 != before.sha256


def test_shifted_calibration_share_spreads_loads_shifted_and_changes_the_hash(
        tiny_data_root: Path) -> None:
    from rise_edge.data.transforms import Preprocessing

    recipe = load_recipe(None, tiny_recipe_overrides(tiny_data_root))
    splits = build_splits(recipe.data, progress=False)
    plain = select_calibration_set(splits, 12)
    half = select_calibration_set(splits, 12, shifted_share=0.5)
    assert half.files == plain.files and half.sha256 != plain.sha256  # never the same range cache
    assert plain.shifted_indices() == [] and half.shifted_indices() == [1, 3, 5, 7, 9, 11]
    assert select_calibration_set(splits, 12, shifted_share=1.0).shifted_indices() == list(range(12))
    assert len(select_calibration_set(splits, 12, shifted_share=0.25).shifted_indices()) == 3
    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    clean, shifted = plain.load(pre), half.load(pre)
    assert shifted.shape == clean.shape == (12, 3, 32, 32) and shifted.dtype == np.float32
    same = [bool(np.array_equal(clean[i], shifted[i])) for i in range(12)]
    assert same == [i % 2 == 0 for i in range(12)]  # the shifted half, and only it, differs
    record = half.to_record(TINY_CLASSES)["shifted"]
    assert record["share"] == 0.5 and record["images"] == 6


def test_calibration_methods_and_range_cache_keyed_on_data_method_and_model(tiny_run: Path) -> None:
    cache = tiny_run / EXPORT_DIR / "cache"
    seen = set()
    for method in ("entropy", "percentile", "entropy"):
        cfg = ExportConfig(int8=True, calibration_size=24, calibration_method=method)
        record = export_run(tiny_run, cfg, progress=False).artefacts["onnx-int8"]
        assert record["status"] == "ok" and record["calibration_method"] == method
        seen |= {p.name for p in cache.glob("ort-ranges-*.json")}
    import inspect

    from onnxruntime import quantization

    if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
        assert seen == set()  # onnxruntime < 1.28 keeps no ranges: each export calibrates again
        return
    assert len(seen) == 2  # one range cache per method; the second entropy run reused its own
    export_run(tiny_run, ExportConfig(int8=True, calibration_size=12), progress=False)
    assert len(list(cache.glob("ort-ranges-*.json"))) == 3  # other images: other key


def _inject_outlier(run_dir: Path, bias: float = 3000.0) -> None:
    """One channel of the last block gets a huge constant activation that the classifier ignores:
    FP32 predictions are unchanged, but per-tensor INT8 ranges stretched by it crush every other
    channel of the layers it passes through (the classic activation-outlier failure of INT8)."""
    run = open_run(run_dir)
    with torch.no_grad():
        run.student.backbone.layer4[0].bn2.bias[0] = bias
        run.student.classifier.weight[:, 0] = 0.0
    save_student(run_dir, run.student, run.meta, run.recipe)


def test_budget_fallback_keeps_sensitive_layers_in_fp32(tiny_run: Path) -> None:
    _inject_outlier(tiny_run)
    cfg = ExportConfig(int8=True, calibration_size=24, accuracy_budget=0.0, max_fallback_layers=8)
    record = export_run(tiny_run, cfg, progress=False).artefacts["onnx-int8"]
    budget = record["accuracy_budget"]
    assert budget["fidelity_all_int8"]["worst_drop_points"] > 0  # INT8 really broke it...
    assert budget["kept_fp32_layers"]  # ...so layers fell back...
    assert budget["met"] is True  # ...until the budget held
    assert budget["fidelity"]["worst_drop_points"] <= 0.0
    added = [r["added_nsr"] for r in budget["ranking"]]
    assert added == sorted(added, reverse=True)
    assert all(name.endswith(("Conv", "Gemm")) for name in budget["kept_fp32_layers"])  # real layers
    assert "/classifier/Gemm" in budget["kept_fp32_layers"]  # it reads the outlier channel
    assert "int8_with_fallback" in record["latency_batch1_ms"]
    meta = onnx_metadata(tiny_run / EXPORT_DIR / record["path"])
    assert meta["kept_fp32_layers"] == budget["kept_fp32_layers"]

    limited = dataclasses.replace(cfg, max_fallback_layers=1)
    budget = export_run(tiny_run, limited, progress=False).artefacts["onnx-int8"]["accuracy_budget"]
    assert len(budget["tried"]) <= 2  # the first/last-layer policy's model, then one fallback at most


def test_parity_failure_is_loud_and_writes_nothing(tiny_run: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(tiny_run), "--int8", "--quiet",
                                       "--set", "export.parity_tolerance=1e-12"])
    assert result.exit_code == 1, result.output
    records = _export_json(tiny_run)["artefacts"]
    assert records["onnx-fp32"]["status"] == "failed"
    assert "export.parity_tolerance" in records["onnx-fp32"]["reason"]
    assert records["onnx-int8"]["status"] == "skipped"
    assert not (tiny_run / EXPORT_DIR / "model.onnx").exists()


def _replace_maker(monkeypatch: pytest.MonkeyPatch, name: str, make) -> None:
    """Swap one artefact's maker in the backend registry for this test."""
    import dataclasses

    import rise_edge.backend_table as registry
    artefacts()  # the registry is filled on first use
    monkeypatch.setitem(registry._ARTEFACTS, name, dataclasses.replace(registry._ARTEFACTS[name],
                                                                       make=make))


def test_failure_midway_keeps_earlier_artefacts_and_records(tiny_run: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    export_run(tiny_run, ExportConfig(), progress=False)
    model = tiny_run / EXPORT_DIR / "model.onnx"
    good_bytes = model.read_bytes()
    good_record = _export_json(tiny_run)["artefacts"]["onnx-fp32"]

    def half_written(session: object, tmp: Path) -> dict:
        tmp.write_bytes(b"half an ONNX file")
        raise RuntimeError("disk full")

    _replace_maker(monkeypatch, "onnx-fp32", half_written)
    result = export_run(tiny_run, ExportConfig(int8=True, calibration_size=24), progress=False)
    assert model.read_bytes() == good_bytes  # the good artefact survived
    records = _export_json(tiny_run)["artefacts"]  # and export.json is whole and says what happened
    # The intact earlier file keeps its ok record (bench goes on using it); the attempt is noted.
    assert records["onnx-fp32"]["status"] == "ok"
    assert records["onnx-fp32"]["sha256"] == good_record["sha256"]
    attempt = records["onnx-fp32"]["last_attempt"]
    assert attempt["status"] == "failed" and "disk full" in attempt["reason"]
    assert "kept" in attempt["reason"]
    assert result.artefacts["onnx-fp32"]["status"] == "failed"  # this run's own outcome
    assert records["onnx-int8"]["status"] == "ok"  # made from the intact FP32 graph
    assert result.failed == ["onnx-fp32"]
    assert not [p for p in (tiny_run / EXPORT_DIR).iterdir() if p.name.startswith(".")]

    # a failure in a later format leaves the earlier ones complete
    monkeypatch.undo()

    def int8_fails(session: object, tmp: Path) -> dict:
        raise RuntimeError("quantizer crashed")

    _replace_maker(monkeypatch, "onnx-int8", int8_fails)
    export_run(tiny_run, ExportConfig(int8=True, calibration_size=24), progress=False)
    records = _export_json(tiny_run)["artefacts"]
    assert records["onnx-fp32"]["status"] == "ok"
    assert records["onnx-int8"]["status"] == "ok"  # the INT8 file made above is intact, and kept
    assert "quantizer crashed" in records["onnx-int8"]["last_attempt"]["reason"]


def test_reexport_merges_records_and_reuses_matching_onnx(tiny_run: Path) -> None:
    export_run(tiny_run, ExportConfig(int8=True, calibration_size=24), progress=False)
    export_run(tiny_run, ExportConfig(), progress=False)  # FP32 only this time
    records = _export_json(tiny_run)["artefacts"]
    assert records["onnx-int8"]["status"] == "ok"  # the other format's record is kept
    # a GPU format reuses the FP32 ONNX whose recorded hash matches (the device workflow)
    result = export_run(tiny_run, ExportConfig(formats=("tensorrt",)), progress=False)
    assert result.artefacts["onnx-fp32"].get("reused") is True
    # a retrained student makes earlier artefacts stale rather than silently current
    _inject_outlier(tiny_run, bias=1.0)
    result = export_run(tiny_run, ExportConfig(formats=("tensorrt",)), progress=False)
    assert not result.artefacts["onnx-fp32"].get("reused")
    assert _export_json(tiny_run)["artefacts"]["onnx-int8"]["status"] == "stale"


def _gpu_stack_present() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_gpu_stack_present(), reason="this machine has CUDA and TensorRT")
def test_gpu_format_on_cpu_machine_is_unavailable_with_one_sentence(tiny_run: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(tiny_run), "--format", "tensorrt", "--format",
                                       "onnx", "--format", "torch-tensorrt", "--fp16", "--quiet"])
    assert result.exit_code == 3, result.output  # done, but not all that was asked for
    records = _export_json(tiny_run)["artefacts"]
    assert records["onnx-fp32"]["status"] == "ok"  # the CPU format still completes
    for name in ("tensorrt-fp16", "torch-tensorrt-fp16"):
        reason = records[name]["reason"]
        assert records[name]["status"] == "unavailable"
        assert "CUDA" in reason and "on the device" in reason
        assert reason.count(". ") == 0 and reason.endswith(".")  # one sentence
    assert "unavailable" in result.output


def test_missing_run_directory_and_checkpoint_are_user_errors(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        export_run(tmp_path / "nope", ExportConfig(), progress=False)
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "run directory" in result.output and "Traceback" not in result.output
    (tiny_run / "student.safetensors").unlink()
    result = CliRunner().invoke(main, ["export", str(tiny_run)])
    assert result.exit_code == 2 and "no student.safetensors" in result.output
    with pytest.raises(UserError, match="unknown export format 'onx'; did you mean 'onnx'"):
        plan_artefacts(ExportConfig(formats=("onx",)))


def test_engines_table_covers_every_artefact_and_runners_share_one_interface(exported: Path) -> None:
    assert {spec.runs_on for spec in artefacts().values()} <= set(backends())
    images = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    runners = [TorchRunner(exported, device="cpu"),
               OnnxRuntimeRunner(exported / EXPORT_DIR / "model.onnx")]
    outputs = []
    for runner in runners:
        staged = runner.prepare(images)
        runner.synchronize()
        outputs.append(runner.to_numpy(runner.run_staged(staged)))
    assert np.abs(outputs[0] - outputs[1]).max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# GPU: written against the documented TensorRT / Torch-TensorRT / modelopt APIs, skipped here.


def _require(module: str, cuda: bool = True) -> None:
    if cuda and not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU (none visible) for {module}")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs the '{module}' package (pip install 'rise-edge[gpu]')")


@pytest.mark.gpu
def test_tensorrt_engines_fp32_fp16_int8(tiny_run: Path) -> None:
    _require("tensorrt")
    cfg = ExportConfig(formats=("tensorrt",), int8=True, fp16=True, calibration_size=24)
    result = export_run(tiny_run, cfg, progress=False)
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        record = result.artefacts[name]
        assert record["status"] == "ok", record
        assert record["parity"]["top1_agreement"] >= 0.9
        if name == "tensorrt-int8":  # judged like every INT8 artefact, on the same images
            assert record["accuracy_budget"]["judge"]["rule"] == RULE
        runner = runner_for(record, tiny_run / EXPORT_DIR)
        for batch in (1, 8, 32):  # the dynamic-batch profile
            assert runner(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 3)
    assert list((tiny_run / EXPORT_DIR / "cache").glob("timing-*.cache"))


@pytest.mark.gpu
def test_torch_tensorrt_program(tiny_run: Path) -> None:
    _require("torch_tensorrt")
    cfg = ExportConfig(formats=("torch-tensorrt",), fp16=True)
    record = export_run(tiny_run, cfg, progress=False).artefacts["torch-tensorrt-fp16"]
    assert record["status"] == "ok", record
    runner = runner_for(record, tiny_run / EXPORT_DIR)
    assert runner(np.zeros((4, 3, 32, 32), np.float32)).shape == (4, 3)


def test_calibration_tensors_kept_for_the_device_are_float32(tiny_run: Path) -> None:
    """The images a device without the data set calibrates TensorRT from are the very float32
    tensors calibration used here (float16 rounded them)."""
    export_run(tiny_run, ExportConfig(formats=("onnx", "tensorrt"), int8=True, calibration_size=12),
               progress=False)
    files = list((tiny_run / EXPORT_DIR).glob("calibration-*.npy"))
    assert len(files) == 1 and np.load(files[0]).dtype == np.float32
