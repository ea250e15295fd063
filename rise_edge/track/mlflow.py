"""MLflow: one MLflow run per rise-edge run, through MlflowClient on any tracking URI."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

_BATCH_PARAMS = 100  # MlflowClient.log_batch takes at most 100 params and 1,000 metrics a call
_BATCH_METRICS = 1000


def resolved_uri(text: str) -> str:
    """A tracking URI as MLflow takes it, a plain path made an absolute file: URI (so export and
    bench, run from anywhere, reach the store training used)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text) or text.startswith("databricks"):
        return text
    return Path(text).expanduser().resolve().as_uri()


def is_file_store(uri: str) -> bool:
    return uri.startswith("file:")


def client(uri: str) -> Any:
    """An MlflowClient on `uri`. MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is
    set; a recipe that names one (or rise-edge's default, mlruns/ beside the run) asks for it, so it
    is allowed here unless the environment says otherwise."""
    from mlflow.tracking import MlflowClient

    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _experiment_id(mlflow: Any, name: str) -> str:
    """The experiment's id, made when missing (two runs of a sweep may race to make it)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name)
    except Exception:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / and spaces); a domain named otherwise
    keeps its other characters as _."""
    return re.sub(r"[^\w\-. /]", "_", name)


class MlflowTracker:
    """Logs to the MLflow run `run_id`; `owned`: this command started or resumed the run and ends
    it (training), else it only adds to it (export, bench)."""

    name = "MLflow"

    def __init__(self, mlflow: Any, run: Any, *, owned: bool, resumed: bool = False) -> None:
        self.mlflow, self.owned, self.resumed = mlflow, owned, resumed
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str], *,
              experiment_id: str | None = None) -> MlflowTracker:
        """A new run in the experiment named `experiment` (made when missing), or the one whose id
        is given."""
        mlflow = client(uri)
        run = mlflow.create_run(experiment_id or _experiment_id(mlflow, experiment),
                                run_name=run_name, tags=tags)
        return cls(mlflow, run, owned=True)

    @classmethod
    def attach(cls, uri: str, run_id: str, *, resume: bool = False) -> MlflowTracker:
        """The recorded run (it must exist); on resume it is running again."""
        mlflow = client(uri)
        run = mlflow.get_run(run_id)
        if resume and run.info.status != "RUNNING":
            mlflow.update_run(run_id, status="RUNNING")
        return cls(mlflow, run, owned=resume, resumed=resume)

    def log_params(self, params: dict[str, str], recipe_text: str) -> None:
        from mlflow.entities import Param

        # A parameter is written once in MLflow: a resumed run keeps the values it started with
        # (only fields that do not change training may differ); recipe.yaml is the resumed one.
        logged = self.mlflow.get_run(self.run_id).data.params if self.resumed else {}
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), _BATCH_PARAMS):
            self.mlflow.log_batch(self.run_id, params=new[i:i + _BATCH_PARAMS])
        self.mlflow.log_text(self.run_id, recipe_text, "recipe.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), _BATCH_METRICS):
            self.mlflow.log_batch(self.run_id, metrics=batch[i:i + _BATCH_METRICS])

    def log_file(self, path: Path, folder: str, text: str) -> None:
        self.mlflow.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, status: str | None) -> None:
        if status and self.owned:
            self.mlflow.set_terminated(self.run_id, status)

    def end_earlier(self, run_id: str) -> None:
        """An attempt that was started again from nothing: its run is marked KILLED, not left
        running."""
        if run_id != self.run_id:
            self.mlflow.set_terminated(run_id, "KILLED")
