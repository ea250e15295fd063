"""Timing an inference runner: the loop, and the statistics every report row carries.

What is timed is pure inference: `runner.run_staged(staged)` on a batch already staged where the backend
reads it (host array, device tensor, IOBinding), so decoding, preprocessing and host-to-device copies
stay out of it (decode + preprocess get their own figure in bench; the copies their own split on GPU).

    stats = time_runner(runner, images, TimingPlan(warmup=10, iterations=100))

Clocks. On the CPU, `time.perf_counter_ns` around each call. On CUDA, for runners that queue their work
on PyTorch's current stream (PyTorch eager, TensorRT, Torch-TensorRT), a pair of CUDA events around each
call and a wait on the second: device time, as trtexec's "GPU Compute Time". ONNX Runtime's CUDA
provider runs on its own stream, so it is timed by the host clock after a device synchronisation.
Every iteration ends synchronised: one query after the previous one finished, as in MLPerf's
SingleStream scenario. Python's garbage collector is off during the timed loop (as `timeit` does), so
a collection pause is not charged to the model.

Percentiles use linear interpolation between the closest ranks (numpy's default, `method="linear"`,
Hyndman & Fan type 7): for the timings 1, 2, ..., 100 ms, p50 = 50.5, p90 = 90.1, p99 = 99.01.
onnxruntime_perf_test and trtexec report the same family of figures (min, mean, median, p90/p95/p99,
max, throughput); their exact rank rules differ slightly and matter only for short runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILE_METHOD = "linear"
PERCENTILE_DEFINITION = ("linear interpolation between the closest ranks (numpy.percentile default, "
                         "Hyndman-Fan type 7)")
SPLIT_ITERATIONS = 50  # H2D / compute / D2H split: a short separate pass, after the main one


@dataclass(frozen=True)
class TimingPlan:
    """How long to time: `iterations` runs, or, when `duration_s` > 0, as many as fit in that time
    (at least one). `warmup` untimed runs come first."""

    warmup: int = 10
    iterations: int = 100
    duration_s: float = 0.0

    def describe(self) -> str:
        if self.duration_s > 0:
            return f"{self.duration_s:g} s after {self.warmup} warm-up runs"
        return f"{self.iterations} runs after {self.warmup} warm-up runs"


def percentile(times_ms: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) of `times_ms` by PERCENTILE_METHOD."""
    return float(np.percentile(np.asarray(times_ms, dtype=np.float64), q, method=PERCENTILE_METHOD))


def summarize(times_ms: Sequence[float] | np.ndarray, batch_size: int = 1) -> dict[str, float]:
    """min, mean, std, p50, p90, p99, max and total of per-run times (ms), and images/s.

    images_per_s = batch_size * runs / (sum of the timed runs): the throughput of back-to-back runs,
    with nothing but inference between them.
    """
    times = np.asarray(times_ms, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no timings to summarise")
    total = float(times.sum())
    p50, p90, p99 = np.percentile(times, [50, 90, 99], method=PERCENTILE_METHOD)
    return {"count": int(times.size), "min_ms": float(times.min()), "mean_ms": float(times.mean()),
            "std_ms": float(times.std()), "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": float(p99), "max_ms": float(times.max()), "total_ms": total,
            "images_per_s": batch_size * times.size / (total / 1e3) if total > 0 else float("inf")}


# ---------------------------------------------------------------------------------------------------
# Which clock a runner gets


def _on_torch_stream(runner: Any) -> bool:
    """True for CUDA runners whose work is queued on PyTorch's current stream (events can time it)."""
    return runner.device == "cuda" and bool(getattr(runner, "torch_stream", False))


def clock_of(runner: Any) -> str:
    if runner.device != "cuda":
        return "host perf_counter"
    return "cuda events" if _on_torch_stream(runner) else "host perf_counter after device sync"


# ---------------------------------------------------------------------------------------------------
# The loops


def _host_loop(run: Callable[[], Any], sync: Callable[[], None], plan: TimingPlan) -> np.ndarray:
    """Per-run milliseconds by the host clock; every run is followed by `sync()`."""
    clock = time.perf_counter_ns
    times: list[int] = []
    append = times.append
    if plan.duration_s > 0:
        deadline = clock() + int(plan.duration_s * 1e9)
        while True:
            begin = clock()
            run()
            sync()
            end = clock()
            append(end - begin)
            if end >= deadline:
                break
    else:
        for _ in range(plan.iterations):
            begin = clock()
            run()
            sync()
            append(clock() - begin)
    return np.asarray(times, dtype=np.float64) / 1e6


def _cuda_event_loop(run: Callable[[], Any], plan: TimingPlan) -> np.ndarray:
    """Per-run milliseconds between two CUDA events on the current stream, waiting after each run."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []
    deadline = time.perf_counter() + plan.duration_s
    count = 0
    while True:
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        count += 1
        if (plan.duration_s > 0 and time.perf_counter() >= deadline) or (
                plan.duration_s <= 0 and count >= plan.iterations):
            break
    return np.asarray(times, dtype=np.float64)


def _timed(run: Callable[[], Any], runner: Any, plan: TimingPlan) -> np.ndarray:
    for _ in range(plan.warmup):
        run()
        runner.synchronize()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if _on_torch_stream(runner):
            return _cuda_event_loop(run, plan)
        return _host_loop(run, runner.synchronize, plan)
    finally:
        if gc_was_enabled:
            gc.enable()


def time_runner(runner: Any, images: np.ndarray, plan: TimingPlan, *, cuda_graphs: bool = False,
                split: bool = True) -> dict[str, Any]:
    """Time `runner` on one batch (`images`: float32 NCHW, the batch size is images.shape[0]).

    Returns summarize()'s figures plus batch_size, warmup, clock, and on CUDA:
    `split` (H2D / compute / D2H, each summarised, from a separate short pass) and, when asked,
    `cuda_graph` (the same loop replaying a captured CUDA graph, or why it could not be captured).
    """
    batch_size = int(images.shape[0])
    staged = runner.prepare(images)
    runner.synchronize()
    run_staged = runner.run_staged

    def run() -> Any:
        return run_staged(staged)

    times = _timed(run, runner, plan)
    result: dict[str, Any] = {"batch_size": batch_size, "warmup": plan.warmup, "clock": clock_of(runner),
                              **summarize(times, batch_size)}
    if runner.device == "cuda":
        result["split"] = transfer_split(runner, images) if split else None
        if cuda_graphs:
            result["cuda_graph"] = _time_cuda_graph(runner, staged, plan, batch_size)
    return result


# ---------------------------------------------------------------------------------------------------
# GPU extras: H2D / compute / D2H split, CUDA graphs


def transfer_split(runner: Any, images: np.ndarray, iterations: int = SPLIT_ITERATIONS
                   ) -> dict[str, Any]:
    """Host-to-device (prepare), compute (run_staged) and device-to-host (to_numpy) per query.

    CUDA events for runners on PyTorch's stream; the host clock with a device sync between the parts
    otherwise. `end_to_end` is their sum per query (trtexec's "Latency").
    """
    parts: dict[str, list[float]] = {"h2d": [], "compute": [], "d2h": [], "end_to_end": []}
    if _on_torch_stream(runner):
        import torch

        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        for _ in range(iterations):
            marks[0].record()
            staged = runner.prepare(images)
            marks[1].record()
            outputs = runner.run_staged(staged)
            marks[2].record()
            runner.to_numpy(outputs)
            marks[3].record()
            marks[3].synchronize()
            spans = [marks[i].elapsed_time(marks[i + 1]) for i in range(3)]
            for key, value in zip(("h2d", "compute", "d2h"), spans):
                parts[key].append(value)
            parts["end_to_end"].append(sum(spans))
        clock = "cuda events"
    else:
        for _ in range(iterations):
            t0 = time.perf_counter()
            staged = runner.prepare(images)
            runner.synchronize()
            t1 = time.perf_counter()
            outputs = runner.run_staged(staged)
            runner.synchronize()
            t2 = time.perf_counter()
            runner.to_numpy(outputs)
            t3 = time.perf_counter()
            for key, value in zip(("h2d", "compute", "d2h"), (t1 - t0, t2 - t1, t3 - t2)):
                parts[key].append(value * 1e3)
            parts["end_to_end"].append((t3 - t0) * 1e3)
        clock = "host perf_counter after device sync"
    batch = int(images.shape[0])
    return {"clock": clock, "iterations": iterations,
            **{key: summarize(values, batch) for key, values in parts.items()}}


def capture_cuda_graph(runner: Any, staged: Any) -> Callable[[], None]:
    """Capture one `run_staged(staged)` into a CUDA graph; returns its replay. Raises if the runner's
    work cannot be captured (it is not on PyTorch's stream, or it synchronises inside)."""
    import torch

    if not _on_torch_stream(runner):
        raise RuntimeError(f"{runner.name} does not run on PyTorch's CUDA stream, so its work cannot "
                           "be captured here (ONNX Runtime's CUDA provider has its own "
                           "enable_cuda_graph session option)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            runner.run_staged(staged)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.run_staged(staged)
    torch.cuda.synchronize()
    return graph.replay


def _time_cuda_graph(runner: Any, staged: Any, plan: TimingPlan, batch_size: int) -> dict[str, Any]:
    try:
        replay = capture_cuda_graph(runner, staged)
    except Exception as exc:  # capture fails in backend-specific ways; the plain timing stands
        return {"status": "unsupported", "reason": f"{type(exc).__name__}: {exc}"}
    times = _timed(replay, runner, plan)
    return {"status": "ok", "clock": "cuda events", **summarize(times, batch_size)}


# ---------------------------------------------------------------------------------------------------
# MLPerf-style summaries of a row's measurements


def interleaved_ms(runners: dict[str, Any], images: np.ndarray, rounds: int, iterations: int,
                   warmup: int = 3) -> dict[str, list[float]]:
    """Per-call milliseconds per runner (host clock), the runners taking turns round by round so a
    busy neighbour on a shared CPU slows all of them alike. For CPU runners, compared in one process."""
    staged = {name: r.prepare(images) for name, r in runners.items()}
    for name, r in runners.items():
        for _ in range(warmup):
            r.run_staged(staged[name])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            for _ in range(iterations):
                begin = time.perf_counter()
                r.run_staged(staged[name])
                times[name].append((time.perf_counter() - begin) * 1e3)
    return times


def mlperf_style(latency: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """SingleStream: p90 latency of one-image queries run one after another (the batch-1 measurement).
    Offline: the best images/s over the measured batch sizes, with the batch that gave it.

    "Style" because no LoadGen drives it: a fixed loop on a staged batch, no query-sample library,
    no minimum query count or duration rules.
    """
    measured = [entry for entry in latency if entry.get("status") == "ok"]
    single = next((e for e in measured if e["batch_size"] == 1), None)
    best = max(measured, key=lambda e: e["images_per_s"], default=None)
    return {"single_stream_p90_ms": single["p90_ms"] if single else None,
            "offline_images_per_s": best["images_per_s"] if best else None,
            "offline_batch_size": best["batch_size"] if best else None}


def int8_speed(fp32: Any, int8: Any, image: np.ndarray, target: str, rounds: int = 5,
               iterations: int = 20) -> dict[str, Any]:
    """An INT8 model's batch-1 speed against its own backend's FP32 model, timed interleaved in this
    process (`image`: (1, 3, S, S)), and whether this machine is of the kind it was built for
    (rise_edge.export.int8_target): a speed-up measured on another kind says nothing of its own."""
    import statistics

    from rise_edge.export.int8_target import this_machine

    times = interleaved_ms({"fp32": fp32, "int8": int8}, image, rounds, iterations)
    fp32_ms, int8_ms = (statistics.median(times[k]) for k in ("fp32", "int8"))
    here = this_machine()
    return {"batch": 1, "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3),
            "speedup": round(fp32_ms / max(int8_ms, 1e-9), 3), "measured_on": here,
            "on_target": here == target,
            "how": f"median of {rounds} x {iterations} interleaved calls each, in one process"}
