"""Does the bench harness add overhead? ONNX Runtime p50 at batch 1, harness vs a bare loop.

    python benchmarks/bench_overhead.py [--onnx MODEL.onnx] [--rounds 15] [--iterations 40]

Three ways of timing the same ONNX model on the same (1, 3, 224, 224) input, in one process:
  harness       rise_edge.backends.latency.time_runner on an engines.OnnxRuntimeRunner (what `rise-edge bench` does)
  bare          a plain `InferenceSession(path).run(None, feed)` loop, default session options,
                perf_counter around each call
  bare-runner   the same plain loop on the harness runner's own session (tells session options apart
                from the timing loop, should the first two differ)
Each round runs all three back to back, in an order that alternates between rounds, so drift and the
other processes sharing this CPU hit them alike; the verdict compares the medians of the per-round p50s.

Without --onnx, a ResNet-18 (timm, random weights, seed 0) is exported at 224 px with the project's own
exporter into a temporary folder. Writes benchmarks/results/bench_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("harness", "bare", "bare-runner")


def export_resnet18(folder: Path) -> Path:
    import timm
    import torch

    from rise_edge.export.session import export_graph

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    path = folder / "resnet18-224.onnx"
    export_graph(model, torch.randn(2, 3, 224, 224), path, opset=18)
    return path


def bare_loop(session, feed: dict, warmup: int, iterations: int) -> np.ndarray:
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        begin = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - begin)
    return np.asarray(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, default=None, help="model to time (default: ResNet-18)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=40, help="timed runs per method per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_overhead.md")
    args = parser.parse_args()

    import onnxruntime as ort

    from rise_edge.backends.latency import TimingPlan, time_runner
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
    from rise_edge.bench.resources import machine_info
    from rise_edge.run_dir import software_versions

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.onnx or export_resnet18(Path(tmp))
        what = str(args.onnx) if args.onnx else "ResNet-18 (timm, random weights, seed 0), 224 px, opset 18"
        runner = OnnxRuntimeRunner(model)
        bare = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        shape = bare.get_inputs()[0].shape  # (batch, 3, H, W); H, W fixed by the model
        size = [d if isinstance(d, int) else 224 for d in shape[2:]]
        image = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
        feed = {bare.get_inputs()[0].name: image}
        runner_feed = {runner.input_name: image}
        plan = TimingPlan(warmup=args.warmup, iterations=args.iterations)

        def measure(method: str) -> float:
            if method == "harness":
                return time_runner(runner, image, plan)["p50_ms"]
            session, inputs = (bare, feed) if method == "bare" else (runner.session, runner_feed)
            return float(np.percentile(bare_loop(session, inputs, args.warmup, args.iterations), 50))

        rounds = []
        for r in range(args.rounds):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            found = {m: measure(m) for m in order}
            rounds.append(found)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {found[m]:.2f} ms" for m in METHODS),
                  file=sys.stderr, flush=True)

    medians = {m: float(np.median([r[m] for r in rounds])) for m in METHODS}
    ratio = medians["harness"] / medians["bare"]
    paired = float(np.median([r["harness"] / r["bare"] for r in rounds]))  # each round against itself
    result = {"command": shlex.join(["python", "benchmarks/bench_overhead.py", *sys.argv[1:]]),
              "model": what, "input_shape": list(image.shape), "rounds": rounds,
              "median_of_round_p50_ms": medians,
              "harness_over_bare": ratio,
              "median_of_round_ratios": paired, "within_5_percent": abs(ratio - 1) <= 0.05,
              "iterations_per_round": args.iterations, "warmup": args.warmup,
              "runner_intra_op_threads": runner.session.get_session_options().intra_op_num_threads,
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
              "machine": machine_info(), "versions": software_versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    machine, versions = result["machine"], result["versions"]
    medians = result["median_of_round_p50_ms"]
    lines = ["# Bench harness overhead: ONNX Runtime p50 at batch 1, harness vs bare loop", "",
             f"Command: `{result['command']}`  ",
             f"Model: {result['model']}; input {tuple(result['input_shape'])} float32, the same array "
             "for every method.  ",
             f"Machine: {machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} "
             f"logical cores, shared with other processes (1-minute load average "
             f"{result['load_average_1min']['before']:.2f} before, {result['load_average_1min']['after']:.2f} "
             "after).  ",
             "Versions: " + ", ".join(f"{k} {versions[k]}" for k in (
                 "python", "numpy", "onnxruntime", "torch", "rise_edge") if k in versions) + ".  ",
             f"{len(result['rounds'])} rounds; each runs the three methods back to back (order alternating "
             f"between rounds), {result['warmup']} warm-up + {result['iterations_per_round']} timed runs "
             "each; the figure per round is that round's p50.", "",
             "| round | " + " | ".join(f"{m} p50 ms" for m in METHODS) + " | harness / bare |",
             "|---|" + "---|" * (len(METHODS) + 1)]
    for i, r in enumerate(result["rounds"], 1):
        lines.append(f"| {i} | " + " | ".join(f"{r[m]:.3f}" for m in METHODS)
                     + f" | {r['harness'] / r['bare']:.3f} |")
    lines.append("| **median** | " + " | ".join(f"**{medians[m]:.3f}**" for m in METHODS)
                 + f" | **{result['harness_over_bare']:.3f}** |")
    verdict = "within" if result["within_5_percent"] else "NOT within"
    lines += ["", f"Harness p50 / bare-loop p50 (medians of the rounds) = {result['harness_over_bare']:.3f}: "
              f"{verdict} 5 %; median of the per-round ratios {result['median_of_round_ratios']:.3f}. "
              "harness = `rise_edge.backends.latency.time_runner` on `OnnxRuntimeRunner` (what `rise-edge bench` "
              "times); bare = `InferenceSession.run(None, feed)` with default options; bare-runner = the "
              "bare loop on the runner's own session."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
