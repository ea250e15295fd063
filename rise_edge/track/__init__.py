"""Experiment tracking (TensorBoard, MLflow) fed from the records metrics.jsonl gets (docs/tracking.md).

Nothing here imports a tracker's package until a recipe asks for it (`log:`); both come with the
`track` extra.
"""

from rise_edge.track.base import Tracker, Trackers, metric_names, recipe_params
from rise_edge.track.session import (TENSORBOARD_DIR, TRACK_FILE, finish_training, log_run_files,
                                     log_sweep_files, read_track_record, require_trackers,
                                     start_training)

__all__ = ["TENSORBOARD_DIR", "TRACK_FILE", "Tracker", "Trackers", "finish_training",
           "log_run_files", "log_sweep_files", "metric_names", "read_track_record", "recipe_params",
           "require_trackers", "start_training"]
