"""Which trackers a command gets: started or resumed by train, attached by export and bench, a
sweep's own for its collected table; and tracking.json, the record of a folder's MLflow run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rise_edge.config import LogConfig, Recipe, dump_recipe
from rise_edge.errors import UserError, missing_extra
from rise_edge.files import read_json_record, write_json_atomic
from rise_edge.track.base import Tracker, Trackers, recipe_params, warn
from rise_edge.track.text import report_text

TRACK_FILE = "tracking.json"   # <run>/tracking.json, <sweep>/tracking.json: the MLflow run logged to
TENSORBOARD_DIR = "tensorboard"  # <run>/tensorboard/, <sweep>/tensorboard/: event files


def missing_packages(cfg: LogConfig) -> list[tuple[str, str]]:
    """(recipe field, package) for each tracker the recipe asks for whose package does not import."""
    missing = []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            missing.append(("log.tensorboard", "tensorboard"))
    if cfg.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            missing.append(("log.mlflow", "mlflow"))
    return missing


def require_trackers(cfg: LogConfig) -> None:
    """One line naming the extra when a tracker the recipe asks for is not installed: train calls
    it before anything is written."""
    for field, package in missing_packages(cfg):
        raise missing_extra(package, "track", f"{field}=true")


def mlflow_uri(cfg: LogConfig, beside: Path) -> str:
    """log.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else the file store mlruns/ in `beside`
    (the folder holding the run directory), as an absolute URI."""
    from rise_edge.track.mlflow import resolved_uri

    text = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return resolved_uri(text) if text else (Path(beside).resolve() / "mlruns").as_uri()


def read_track_record(folder: Path) -> dict[str, str] | None:
    """<folder>/tracking.json's MLflow run (tracking_uri, run_id, experiment_id), each field
    checked; None when there is no record or it names no MLflow run."""
    fix = f"delete {TRACK_FILE} to log to a new MLflow run"
    record = read_json_record(Path(folder) / TRACK_FILE, fix, missing_ok=True)
    mlflow = None if record is None else record.mapping("mlflow", optional=True)
    if mlflow is None:
        return None
    return {key: str(mlflow.string(key, expected="a string"))
            for key in ("tracking_uri", "run_id", "experiment_id")}


def _write_record(folder: Path, uri: str, tracker: Any) -> None:
    write_json_atomic(folder / TRACK_FILE, {"schema": 1, "mlflow": {
        "tracking_uri": uri, "run_id": tracker.run_id, "experiment_id": tracker.experiment_id}})


def _opened(trackers: Trackers, name: str, make: Callable[[], Tracker]) -> None:
    """Add the tracker `make` opens; one that cannot open is a warning, never a failed command."""
    try:
        trackers.trackers.append(make())
    except Exception as exc:  # noqa: BLE001 - a server down, a store unwritable: said, not fatal
        warn(f"{name} could not start{trackers.where} ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:300]}); going on without it")


# ---------------------------------------------------------------------------------------------------
# train


def start_training(trackers: Trackers, run_dir: Path, recipe: Recipe, resume: bool, step: int
                   ) -> None:
    """Open the recipe's trackers into `trackers` for a run starting, or resumed at `step` (the
    same MLflow run continues; TensorBoard hides what the interrupted attempt logged past `step`),
    and log the resolved recipe to them. A damaged tracking.json stops here, before training."""
    cfg = recipe.log
    if not cfg.enabled:
        return
    trackers.where = " for training"
    earlier = read_track_record(run_dir)
    if cfg.tensorboard:
        _opened(trackers, "TensorBoard", lambda: _tensorboard(run_dir, resume, step))
    if cfg.mlflow:
        _opened(trackers, "MLflow", lambda: _mlflow(run_dir, cfg, resume, earlier))
    trackers.log_params(recipe_params(recipe), dump_recipe(recipe))


def _tensorboard(run_dir: Path, resume: bool, step: int) -> Tracker:
    from rise_edge.track.tensorboard import TensorBoardTracker

    folder = run_dir / TENSORBOARD_DIR
    if not resume and folder.is_dir():  # events of an attempt that is started again from nothing
        shutil.rmtree(folder)
    return TensorBoardTracker(folder, purge_step=step + 1 if resume else None)


def _mlflow(run_dir: Path, cfg: LogConfig, resume: bool, earlier: dict[str, str] | None) -> Tracker:
    from rise_edge.track.mlflow import MlflowTracker

    if resume and earlier is not None:
        uri = earlier["tracking_uri"]
        tracker = MlflowTracker.attach(uri, earlier["run_id"], resume=True)
    else:
        uri = mlflow_uri(cfg, run_dir.parent)
        tracker = MlflowTracker.start(uri, cfg.mlflow_experiment, cfg.mlflow_run_name or run_dir.name,
                                      {"rise_edge.run_dir": str(run_dir.resolve())})
        if earlier is not None and earlier["tracking_uri"] == uri:
            try:
                tracker.end_earlier(earlier["run_id"])
            except Exception:  # noqa: BLE001 - the earlier run may be gone: nothing to end
                pass
    _write_record(run_dir, uri, tracker)
    return tracker


def finish_training(trackers: Trackers, run_dir: Path) -> None:
    """results.json (the selected student's accuracies) logged beside the metrics."""
    if trackers and (run_dir / "results.json").is_file():
        trackers.log_file(run_dir / "results.json", "train", report_text(run_dir / "results.json"))


# ---------------------------------------------------------------------------------------------------
# export, bench, sweep collect


def log_run_files(run_dir: Path, recipe: Recipe, kind: str, files: Sequence[Path]) -> None:
    """export's or bench's reports to the trackers of a run whose recipe tracks: artefacts of its
    MLflow run (under `kind`/), text in its TensorBoard folder. Never raises: a tracker that fails
    (or is not installed here) is a warning, and the export or bench stands."""
    cfg = recipe.log
    if not cfg.enabled:
        return
    trackers = Trackers(where=f" for {kind}")
    try:
        _attach(trackers, Path(run_dir), cfg, kind)
        for path in files:
            if Path(path).is_file():
                trackers.log_file(Path(path), kind, report_text(Path(path)))
    except Exception as exc:  # noqa: BLE001 - logging never fails the command that made the file
        warn(f"{kind}'s reports were not logged to the trackers ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:300]})")
    finally:
        trackers.close(None)


def _attach(trackers: Trackers, folder: Path, cfg: LogConfig, kind: str) -> None:
    missing = dict(missing_packages(cfg))
    for field, package in missing.items():
        warn(f"{field} is on but '{package}' is not installed here (pip install "
             f"'rise-edge[track]'): {kind}'s reports were not logged to it")
    try:
        record = read_track_record(folder)
    except UserError as exc:
        warn(f"{exc}; {kind}'s reports were not logged to MLflow")
        record, missing["log.mlflow"] = None, "mlflow"
    if cfg.tensorboard and "log.tensorboard" not in missing:
        from rise_edge.track.tensorboard import TensorBoardTracker

        _opened(trackers, "TensorBoard", lambda: TensorBoardTracker(folder / TENSORBOARD_DIR))
    if cfg.mlflow and "log.mlflow" not in missing:
        if record is None:
            warn(f"log.mlflow is on but {folder} records no MLflow run ({TRACK_FILE}: training "
                 f"was not tracked): {kind}'s reports were not logged to MLflow")
            return
        from rise_edge.track.mlflow import MlflowTracker

        _opened(trackers, "MLflow", lambda: MlflowTracker.attach(record["tracking_uri"],
                                                                 record["run_id"]))


def log_sweep_files(folder: Path, runs: Sequence[tuple[Path, LogConfig]], files: Sequence[Path]
                    ) -> None:
    """A sweep's collected table to the trackers its runs' recipes name: an MLflow run named after
    the sweep folder, in the experiment (and store) of its first tracked run; text in
    <folder>/tensorboard/. Never raises."""
    configs = [cfg for _, cfg in runs]
    if not any(cfg.enabled for cfg in configs):
        return
    folder = Path(folder)
    cfg = LogConfig(tensorboard=any(c.tensorboard for c in configs),
                    mlflow=any(c.mlflow for c in configs))
    trackers = Trackers(where=" for sweep collect")
    try:
        if cfg.mlflow and not missing_packages(LogConfig(mlflow=True)) and \
                read_track_record(folder) is None:
            _start_sweep_run(folder, runs)
        _attach(trackers, folder, cfg, "sweep")
        for path in files:
            if Path(path).is_file():
                trackers.log_file(Path(path), "sweep", report_text(Path(path)))
    except Exception as exc:  # noqa: BLE001 - the tables are written; logging them is extra
        warn(f"the sweep's tables were not logged to the trackers ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:300]})")
    finally:
        trackers.close(None)


def _start_sweep_run(folder: Path, runs: Sequence[tuple[Path, LogConfig]]) -> None:
    """The sweep's MLflow run, recorded in <folder>/tracking.json: in the store and experiment its
    first run with an MLflow record logged to, else where its first MLflow recipe points."""
    from rise_edge.track.mlflow import MlflowTracker

    for run_dir, cfg in runs:
        record = read_track_record(run_dir) if cfg.mlflow else None
        if record is not None:
            uri, experiment = record["tracking_uri"], {"id": record["experiment_id"]}
            break
    else:
        cfg = next(c for _, c in runs if c.mlflow)
        uri, experiment = mlflow_uri(cfg, folder), {"name": cfg.mlflow_experiment}
    tracker = MlflowTracker.start(uri, experiment.get("name", ""), folder.name,
                                  {"rise_edge.sweep": str(folder.resolve())},
                                  experiment_id=experiment.get("id"))
    tracker.close("FINISHED")
    _write_record(folder, uri, tracker)
