"""The training loader's side of throughput: how many worker processes decode images by default, and
batches that carry the time it took to make them, so the loader's own rate can be set beside the
training step's.

A batch is made (decoded, augmented, collated) in one process: a worker, or the training process
with no workers. `TimedBatches` does all three in `__getitems__` (the DataLoader's batch fetch) and
returns `(images, labels, seconds)`; with W workers making batches side by side the loader can
deliver W x batch / seconds images per second, which is the figure to compare with the step's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate


MAX_AUTO_WORKERS = 8
_MIN_WORKER_BYTES = 1 << 30


def _cores() -> int:
    """Cores this process may run on (its affinity mask, as taskset and cgroup cpusets set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident_memory() -> int:
    """Bytes this process holds in memory now (its resident set)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def auto_workers(device_type: str, processes_per_node: int = 1) -> int:
    """The default number of loader workers for one training process.

    Cores: this process's share of the node's (several torchrun processes split them), less those
    the training step itself keeps busy (its torch threads on a CPU; one feeding a GPU). Memory: a
    forked worker can come to hold as much as the process it was forked from, so no more workers
    than half the available memory holds at this process's present size (at least 1 GiB each).
    At most MAX_AUTO_WORKERS: beyond that, workers rarely add images per second.
    """
    share = max(1, _cores() // max(1, processes_per_node))
    step_cores = torch.get_num_threads() if device_type == "cpu" else 1
    by_cores = max(0, share - step_cores)
    available = _available_memory()
    if available is not None:
        per_worker = max(_MIN_WORKER_BYTES, _resident_memory())
        by_memory = available // 2 // max(1, processes_per_node) // per_worker
        by_cores = min(by_cores, by_memory)
    return int(min(by_cores, MAX_AUTO_WORKERS))


def loader_workers(setting: int | str, device_type: str) -> int:
    """data.num_workers as a number: 'auto' resolved for this process (LOCAL_WORLD_SIZE processes
    per node under torchrun)."""
    if setting != "auto":
        return int(setting)
    return auto_workers(device_type, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


class TimedBatches(Dataset):
    """A training dataset (DomainImages, or rise_edge.data.views.ViewImages) fetched a batch at a
    time, each batch timed where it is made: its items collated field by field, then the seconds,
    e.g. `(images (B, 3, S, S) float32, labels (B,) int64, seconds)`, or with views
    `(images, labels, indices (B,), view indices (B,), seconds)`. Use with `collate=made_batch`."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.images[key]

    def __getitems__(self, keys: Sequence[Any]) -> tuple[Any, ...]:
        started = time.perf_counter()
        fields = default_collate([self.images[k] for k in keys])
        return (*fields, time.perf_counter() - started)


def made_batch(batch: Any) -> Any:
    """The DataLoader's collate for TimedBatches: the batch is collated already (a module-level
    function, so that worker processes can be given it)."""
    return batch
