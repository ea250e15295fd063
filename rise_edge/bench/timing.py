"""Latency: every batch size of the bench config timed on real images (rise_edge.backends.latency
does the timing), within the engine's batch profile, with power where the device reports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rise_edge.backends.base import Runner
from rise_edge.backends.latency import TimingPlan, time_runner
from rise_edge.bench.plan import EngineSpec
from rise_edge.bench.resources import TegraStats
from rise_edge.config import BenchConfig


def max_batch(spec: EngineSpec) -> int | None:
    profile = (spec.record or {}).get("batch_profile")
    return int(profile[-1]) if isinstance(profile, list) and profile else None


def latency_entries(runner: Runner, spec: EngineSpec, cfg: BenchConfig, images: np.ndarray,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One entry per batch size of `cfg`: timing statistics, or why that size was not timed.
    `images`: (N, 3, S, S) real images, repeated to fill larger batches."""
    plan = TimingPlan(cfg.warmup, cfg.iterations, cfg.duration_s)
    entries = []
    for batch in cfg.batch_sizes:
        limit = max_batch(spec)
        if limit is not None and batch > limit:
            entries.append({"batch_size": batch, "status": "unsupported",
                            "reason": f"beyond the engine's batch profile (max {limit})"})
            continue
        images = np.resize(images, (batch, *images.shape[1:]))
        log(f"{spec.name}: timing batch {batch} ({plan.describe()})")
        try:
            with TegraStats() as power:
                stats = time_runner(runner, images, plan, cuda_graphs=cfg.cuda_graphs)
        except Exception as exc:  # a backend failing at one shape must not lose the others
            entries.append({"batch_size": batch, "status": "failed",
                            "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"})
            continue
        stats["power"] = power.summary(stats["total_ms"] / 1e3, stats["count"] * batch)
        entries.append({"status": "ok", **stats})
    return entries
