"""Experiment tracking read back with the trackers' own readers, no mocks: TensorBoard's event reader
and MLflow's client on a local file store hold what metrics.jsonl holds, the recipe as parameters,
export's and bench's reports as artefacts; a resumed run continues its MLflow run; a missing
tracker package and a mistyped `log:` key are one line; a tracker failing mid-run loses nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import train_cli_args

from rise_edge.cli import main
from rise_edge.config import load_recipe

_WINDOW_NAMES = {"lr": "lr", "epoch": "epoch", "images_per_s": "images_per_s",
                 "step_images_per_s": "step_images_per_s",
                 "loader_images_per_s": "loader_images_per_s", "loss": "loss/total"}


def _expected(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """The names docs/tracking.md promises for metrics.jsonl's records: name -> {step: value}."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        if "eval" in record:
            values = dict(record["eval"])
            if record["selected"]:
                values["selected_step"] = record["step"]
        else:
            values = {_WINDOW_NAMES.get(k, f"loss/{k}"): v for k, v in record.items() if k != "step"}
        for name, value in values.items():
            out.setdefault(name, {})[record["step"]] = float(value)
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(data_root: Path, run_dir: Path, recipe: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["train", str(recipe), *train_cli_args(
        data_root, run_dir, "--set", "train.log_every=2", "--set", "train.eval_every=4", *extra)])


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, then: Any = None) -> None:
    """Ctrl-C (or `then`) right after metrics.jsonl's line for `step` (a fault put into the run, not
    into a tracker)."""
    import rise_edge.train.loop as loop

    original = loop._log_window

    def log_window(*args: Any) -> None:
        original(*args)
        if args[4] == step:
            if then is None:
                raise KeyboardInterrupt
            then()

    monkeypatch.setattr(loop, "_log_window", log_window)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_data_root: Path) -> dict[str, Any]:
    """A run tracked by TensorBoard and MLflow (file store), interrupted at step 6 (checkpoint at
    4) and resumed to step 12; then exported and benched."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("tracked")
    recipe = folder / "erm.yaml"
    recipe.write_text("loss:\n  method: erm\nlog:\n  tensorboard: true\n  mlflow: true\n")
    run_dir, store = folder / "run", folder / "mlruns"
    args = ("--set", "train.steps=12", "--set", f"log.mlflow_tracking_uri={store}")
    with pytest.MonkeyPatch.context() as patch:
        _interrupt_at(patch, 6)
        first = _train(tiny_data_root, run_dir, recipe, *args)
    assert first.exit_code == 130, first.output
    started = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert _client(store).get_run(started["run_id"]).info.status == "KILLED"  # until resumed
    resumed = _train(tiny_data_root, run_dir, recipe, "--resume", *args)
    assert resumed.exit_code == 0, resumed.output
    exported = CliRunner().invoke(main, ["export", str(run_dir), "--format", "onnx", "--quiet"])
    assert exported.exit_code == 0, exported.output
    benched = CliRunner().invoke(main, ["bench", str(run_dir), "--domain", "all", "--batch", "1",
                                       "--iterations", "2", "--warmup", "0", "--quiet"])
    assert benched.exit_code == 0, benched.output
    for result in (first, resumed, exported, benched):  # nothing failed along the way
        assert "warning:" not in result.output, result.output
    return {"run_dir": run_dir, "store": store, "started": started, "output": resumed.output}


def _client(store: Path) -> Any:
    from mlflow.tracking import MlflowClient

    # MLflow 3 reads a file store only when asked to (rise-edge asks for the stores it writes)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=store.resolve().as_uri())


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _texts(events: Any, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


def test_tensorboard_reads_back_what_metrics_jsonl_holds(tracked: dict[str, Any]) -> None:
    run_dir = tracked["run_dir"]
    expected = _expected(_records(run_dir))
    assert {"loss/ce", "loss/total", "lr", "images_per_s", "val/cartoon", "val_mean",
            "target/sketch", "selected_step"} <= expected.keys()
    events = _events(run_dir / "tensorboard")
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, values in expected.items():
        # the interrupted attempt's step 6 is hidden (purged on resume), as metrics.jsonl dropped it
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged == pytest.approx(values, rel=1e-6), name  # event files hold float32
    results = json.loads((run_dir / "results.json").read_text())
    assert events.Scalars("selected_step")[-1].value == results["selected_step"]
    assert (run_dir / "recipe.yaml").read_text().splitlines()[0] in _texts(events, "recipe")[-1]
    assert "| onnx-fp32 | fp32 | ok |" in _texts(events, "export/export.json")[-1]
    assert _texts(events, "bench/report.md")[-1] == (run_dir / "bench" / "report.md").read_text()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # the HParams dashboard


def test_mlflow_reads_back_metrics_params_and_reports_of_the_resumed_run(tracked: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    run_dir, client = tracked["run_dir"], _client(tracked["store"])
    record = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert record == tracked["started"]  # the resumed run went on in the MLflow run it started
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for name, values in _expected(_records(run_dir)).items():
        history = client.get_metric_history(record["run_id"], name)
        # steps up to the checkpoint once; step 6 twice (the interrupted attempt's, then the resumed)
        assert {m.step for m in history} == set(values), name
        assert all(m.value == values[m.step] for m in history if m.step <= 4), name
        assert {(m.step, m.value) for m in history} >= set(values.items()), name
    steps = sorted(m.step for m in client.get_metric_history(record["run_id"], "lr"))
    assert steps == [2, 4, 6, 6, 8, 10, 12]  # as docs/tracking.md says of a resumed run
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    params = run.data.params
    assert set(params) == {f"{s}.{k}" for s, keys in recipe.items() for k in keys}
    assert params["optim.lr"] == "0.05" and params["data.target_domain"] == "sketch"
    assert params["log.mlflow"] == "True" and params["train.steps"] == "12"
    files = {f.path for folder in ("", "train", "export", "bench")
             for f in client.list_artifacts(record["run_id"], folder or None)}
    assert {"recipe.yaml", "train/results.json", "export/export.json", "bench/report.md",
            "bench/report.json"} <= files
    copy = Path(client.download_artifacts(record["run_id"], "export/export.json", str(tmp_path)))
    assert copy.read_bytes() == (run_dir / "export" / "export.json").read_bytes()
    copy = Path(client.download_artifacts(record["run_id"], "recipe.yaml", str(tmp_path)))
    assert yaml.safe_load(copy.read_text()) == recipe


def test_sweep_collect_logs_its_table_to_the_runs_experiment(tracked: dict[str, Any],
                                                             tmp_path: Path) -> None:
    from rise_edge.track import log_sweep_files

    run_dir, sweep = tracked["run_dir"], tmp_path / "my-sweep"
    sweep.mkdir()
    (sweep / "results.md").write_text("# Sweep\n\n| method | Avg |\n|---|---|\n| ERM | 50.0 |\n")
    log = load_recipe(run_dir / "recipe.yaml").log
    log_sweep_files(sweep, [(run_dir, log)], [sweep / "results.md", sweep / "results.json"])
    client = _client(tracked["store"])
    record = json.loads((sweep / "tracking.json").read_text())["mlflow"]
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "my-sweep"
    assert run.info.experiment_id == tracked["started"]["experiment_id"]
    assert {f.path for f in client.list_artifacts(record["run_id"], "sweep")} == {"sweep/results.md"}
    assert "| ERM | 50.0 |" in _texts(_events(sweep / "tensorboard"), "sweep/results.md")[-1]


@pytest.mark.parametrize("package,field", [("mlflow", "log.mlflow"),
                                           ("tensorboard", "log.tensorboard")])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        package: str, field: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without it imports
    run_dir = tmp_path / "run"
    result = _train(tiny_data_root, run_dir, recipe_file, "--set", f"{field}=true")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {field}=true needs the '{package}' package, which is not installed; install it "
        "with: pip install 'rise-edge[track]'"]
    assert not run_dir.exists() and not list(tmp_path.glob(".run*"))


def test_the_log_section_is_checked_like_every_section(tmp_path: Path, recipe_file: Path,
                                                       tiny_data_root: Path) -> None:
    from rise_edge.errors import UserError

    result = _train(tiny_data_root, tmp_path / "run", recipe_file, "--set", "log.tensorbaord=true")
    assert result.exit_code == 2 and "did you mean 'log.tensorboard'?" in result.output
    assert not (tmp_path / "run").exists()
    path = tmp_path / "r.yaml"
    path.write_text("log:\n  mlflow_trackinguri: mlruns\n")
    with pytest.raises(UserError, match="unknown key 'log.mlflow_trackinguri'; did you mean "
                                        "'log.mlflow_tracking_uri'"):
        load_recipe(path)
    with pytest.raises(UserError, match="'log.mlflow' must be true or false, got 'maybe'"):
        load_recipe(None, ["log.mlflow=maybe"])
    recipe = load_recipe(None, ["log.tensorboard=true"])
    assert recipe.log.tensorboard and not recipe.log.mlflow
    # no tracking: recipe data reads as before the section existed (sweep hashes unchanged)
    from rise_edge.config import recipe_to_dict

    assert "log" not in recipe_to_dict(load_recipe(None)) and "log" in recipe_to_dict(recipe)


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_finishes(
        tiny_data_root: Path, recipe_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    # the store vanishes after step 2's line (a server gone, a disk unmounted): a real failure
    _interrupt_at(monkeypatch, 2, then=lambda: shutil.rmtree(store))
    result = _train(tiny_data_root, run_dir, recipe_file, "--set", "train.steps=8",
                    "--set", "log.mlflow=true", "--set", f"log.mlflow_tracking_uri={store}")
    assert result.exit_code == 0, result.output
    warnings = re.findall(r"warning: [^\n]*", result.output)  # a progress bar may come before
    assert len(warnings) == 1 and "MLflow logging for training failed" in warnings[0]
    assert "metrics.jsonl keeps the record" in warnings[0]
    assert (run_dir / "results.json").is_file()
    assert [r["step"] for r in _records(run_dir) if "eval" in r] == [4, 8]


def test_a_tracker_failing_at_export_is_a_warning_and_the_export_stands(
        tracked: dict[str, Any], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(tracked["run_dir"], tmp_path / "run"))
    (tmp_path / "not-a-store").write_text("a file where the MLflow store was")
    record = json.loads((run_dir / "tracking.json").read_text())
    record["mlflow"]["tracking_uri"] = (tmp_path / "not-a-store").as_uri()
    (run_dir / "tracking.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "onnx", "--quiet"])
    assert result.exit_code == 0, result.output
    warnings = re.findall(r"warning: [^\n]*", result.output)
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow could not start for export")
    assert json.loads((run_dir / "export" / "export.json").read_text())["artefacts"]["onnx-fp32"][
        "status"] == "ok"
    texts = _texts(_events(run_dir / "tensorboard"), "export/export.json")  # TensorBoard still logs
    assert len(texts) == 2
