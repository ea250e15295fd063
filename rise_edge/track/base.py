"""What every tracker does, the fan-out that feeds them, and the names records are logged under.

A tracker is fed from exactly the records training appends to metrics.jsonl (rise_edge.run_dir.
MetricsLog calls the fan-out after writing each line), so the tracker and the file can never
disagree; the file stays the record. A tracker that fails is reported once and dropped: logging is
never what stops a run, an export or a bench.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol

from rise_edge.logs import logger
from rise_edge.config import Recipe

# metrics.jsonl's keys of a training window that are not loss terms (every other number is one),
# logged under their own names. No name is another's prefix plus '/': MLflow's file store keeps
# 'a/b' as a file b in a folder a, so a metric 'a' and a metric 'a/b' cannot both be stored.
_WINDOW_KEYS = {"lr", "epoch", "images_per_s", "step_images_per_s", "loader_images_per_s"}
PARAM_CHARS = 500  # MLflow holds 6,000 from 2.x on; recipe.yaml (an artefact) holds every value whole


class Tracker(Protocol):
    """One experiment tracker (TensorBoard, MLflow): what rise-edge logs, in its own terms."""

    name: str

    def log_params(self, params: dict[str, str], recipe_text: str) -> None:
        """The resolved recipe, flattened (section.key -> value), and recipe.yaml itself."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_file(self, path: Path, folder: str, text: str) -> None:
        """A report (export.json, report.md): the file as an artefact where the tracker keeps
        files, `text` (Markdown) where it shows text; under `folder` (export, bench, sweep)."""

    def close(self, status: str | None) -> None:
        """End of the command; status: FINISHED, FAILED or KILLED (a run resumed later goes on),
        None: only release what is held (the tracker failed; its run's state is left as it is)."""


def metric_names(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record as (step, tracker metrics): a training window's loss terms as
    loss/<term> (loss/total for the objective), lr, epoch, images_per_s (end to end),
    step_images_per_s and loader_images_per_s; an evaluation's scores under their own names
    (val/<domain>, val_mean, target/<domain>, target_in/..., target_out/...) and, when it was
    selected, selected_step = its step."""
    step = int(record["step"])
    out: dict[str, float] = {}
    if isinstance(record.get("eval"), dict):
        out.update({k: float(v) for k, v in record["eval"].items() if _number(v)})
        if record.get("selected") is True:
            out["selected_step"] = float(step)
        return step, out
    for key, value in record.items():
        if key == "step" or not _number(value):
            continue
        name = key if key in _WINDOW_KEYS else "loss/total" if key == "loss" else f"loss/{key}"
        out[name] = float(value)
    return step, out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe flattened to section.key -> text (lists as JSON), every section."""
    params = {}
    for section in dataclasses.fields(recipe):
        for key, value in dataclasses.asdict(getattr(recipe, section.name)).items():
            text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
            params[f"{section.name}.{key}"] = text if len(text) <= PARAM_CHARS else (
                text[:PARAM_CHARS - 3] + "...")
    return params


class Trackers:
    """The fan-out: every call goes to each tracker; the first failure of one is a warning (once)
    and that tracker is dropped for the rest of the command."""

    def __init__(self, trackers: list[Tracker] | None = None, where: str = "") -> None:
        self.trackers = list(trackers or [])
        self.where = where

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker: said once, dropped
                self.trackers.remove(tracker)
                warn(f"{tracker.name} logging{self.where} failed and stops here "
                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
                     f"{'; metrics.jsonl keeps the record' if call == 'log_metrics' else ''}")
                if call != "close":
                    _close_quietly(tracker)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, as written (MetricsLog's listener)."""
        step, metrics = metric_names(record)
        if metrics:
            self._each("log_metrics", step, metrics)

    def log_params(self, params: dict[str, str], recipe_text: str) -> None:
        self._each("log_params", params, recipe_text)

    def log_file(self, path: Path, folder: str, text: str) -> None:
        self._each("log_file", path, folder, text)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.trackers.clear()


def _close_quietly(tracker: Tracker) -> None:
    try:
        tracker.close(None)
    except Exception:  # noqa: BLE001 - already reported as failed
        pass


def warn(message: str) -> None:
    logger("track").warning(f"warning: {message}")
