"""Export a trained PACS run and measure, on this CPU, what the export promises.

    python benchmarks/export_pacs.py runs/<pacs-resnet18-run> [--calibration-method minmax]

1. `export_run` with INT8 (ONNX Runtime, QDQ) and the accuracy budget (default 1.0 point).
2. ONNX FP32 vs PyTorch parity (from export.json: real source-val images).
3. ORT INT8 vs ORT FP32 latency at batch 1 and 32, in this process, the engines interleaved round by
   round (median and p90 of per-call times); PyTorch eager FP32 at batch 1 for reference.
4. Top-1 accuracy of ORT FP32 and ORT INT8 on every PACS domain: the source domains' validation
   splits (held out from training) and ALL images of the unseen target domain. The INT8 drop must be
   within the budget on each source domain; the target's drop is reported as it is.

Writes benchmarks/results/export_pacs.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rise_edge.backends.base import physical_cores
from rise_edge.backends.latency import interleaved_ms
from rise_edge.backends.onnxruntime import OnnxRuntimeRunner
from rise_edge.backends.pytorch import TorchRunner
from rise_edge.bench.resources import machine_info
from rise_edge.config import CALIBRATION_METHODS
from rise_edge.data.domains import build_splits
from rise_edge.export.calibration import load_images
from rise_edge.export.driver import export_run, resolve_export_config
from rise_edge.run_dir import EXPORT_DIR, open_run, software_versions

RESULTS = Path(__file__).parent / "results"


def latency(runners: dict[str, object], batch: np.ndarray, rounds: int, iters: int) -> dict:
    """Per-call milliseconds per runner, interleaved so a busy neighbour slows all of them alike."""
    times = interleaved_ms(runners, batch, rounds, iters)
    return {name: {"median_ms": round(statistics.median(t), 3),
                   "p90_ms": round(float(np.percentile(t, 90)), 3), "calls": len(t)}
            for name, t in times.items()}


def accuracy(runners: dict[str, OnnxRuntimeRunner], samples: list[tuple[str, int]], pre,
             chunk: int = 256) -> dict[str, float]:
    """Top-1 (%) per runner over `samples`, decoding in chunks so a domain never sits in memory."""
    correct = {name: 0 for name in runners}
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        images = load_images([p for p, _ in part], pre)
        labels = np.array([y for _, y in part])
        for name, runner in runners.items():
            logits = np.concatenate([runner(images[i:i + 32]) for i in range(0, len(images), 32)])
            correct[name] += int((logits.argmax(1) == labels).sum())
    return {name: round(100.0 * c / len(samples), 2) for name, c in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--calibration-method", default=None, choices=CALIBRATION_METHODS)
    parser.add_argument("--calibration-size", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-export", action="store_true", help="measure the existing export")
    parser.add_argument("--out", default="export_pacs", help="results/<out>.{md,json}")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    run = open_run(args.run_dir)
    cfg = resolve_export_config(run, (), formats=["onnx"], int8=True,
                                calibration_method=args.calibration_method,
                                calibration_size=args.calibration_size, accuracy_budget=args.budget)
    began = time.perf_counter()
    if not args.skip_export:
        result = export_run(args.run_dir, cfg, progress=True)
        if result.failed:
            sys.exit(f"export failed:\n{result.table()}")
    export_seconds = round(time.perf_counter() - began, 1)
    document = json.loads((args.run_dir / EXPORT_DIR / "export.json").read_text())
    fp32_record, int8_record = document["artefacts"]["onnx-fp32"], document["artefacts"]["onnx-int8"]

    export_dir = args.run_dir / EXPORT_DIR
    ort = {"onnxruntime-fp32": OnnxRuntimeRunner(export_dir / fp32_record["path"]),
           "onnxruntime-int8": OnnxRuntimeRunner(export_dir / int8_record["path"])}
    size = run.meta.preprocessing.input_size
    rng = np.random.default_rng(0)
    load_before = round(os.getloadavg()[0], 2)  # other jobs on a shared machine skew latency
    print("timing batch 1 and 32", file=sys.stderr)
    lat1 = latency({**ort, "pytorch-fp32": TorchRunner(module=run.student, device="cpu")},
                   rng.standard_normal((1, 3, size, size), dtype=np.float32), args.rounds, 20)
    lat32 = latency(ort, rng.standard_normal((32, 3, size, size), dtype=np.float32), args.rounds, 3)

    splits = build_splits(run.recipe.data, check_images=False, progress=False)
    domains = {d: ("source-val", splits.val[d]) for d in splits.source_domains}
    domains[splits.target_domain] = ("target (all images)", splits.test)
    acc = {}
    for domain, (kind, samples) in domains.items():
        print(f"accuracy on {domain} ({len(samples)} images)", file=sys.stderr)
        acc[domain] = {"split": kind, "images": len(samples),
                       **accuracy(ort, samples, run.meta.preprocessing)}
        acc[domain]["drop_points"] = round(acc[domain]["onnxruntime-fp32"]
                                           - acc[domain]["onnxruntime-int8"], 2)
    budget = int8_record["accuracy_budget"]
    speedup1 = lat1["onnxruntime-fp32"]["median_ms"] / lat1["onnxruntime-int8"]["median_ms"]
    speedup32 = lat32["onnxruntime-fp32"]["median_ms"] / lat32["onnxruntime-int8"]["median_ms"]
    source_ok = all(acc[d]["drop_points"] <= budget["budget_points"] for d in splits.source_domains)
    report = {
        "command": command, "run_dir": str(args.run_dir), "student": run.meta.model,
        "trained_steps": run.meta.step, "recipe_train": dataclasses.asdict(run.recipe.train),
        "machine": {"cpu": machine_info()["cpu"], "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
                    "platform": platform.platform()},
        "load_average_1min": {"before_timing": load_before, "after_accuracy": round(os.getloadavg()[0], 2)},
        "versions": software_versions(), "export_seconds": export_seconds,
        "export_config": dataclasses.asdict(cfg),
        "parity_onnx_vs_pytorch": fp32_record["parity"], "exporter": fp32_record["exporter"],
        "quantization": int8_record["quantization"], "calibration": {  # no machine paths in a record
            k: (Path(os.path.relpath(v)).as_posix() if k == "dataset_dir" else v)
            for k, v in document["calibration"].items() if k != "files"},
        "budget_step": {k: budget[k] for k in ("budget_points", "met", "kept_fp32_layers",
                                               "fidelity_all_int8", "fidelity", "edge_policy",
                                               "chosen")},
        "latency_batch1": lat1, "latency_batch32": lat32,
        "speedup_int8_vs_fp32": {"batch1": round(speedup1, 2), "batch32": round(speedup32, 2)},
        "accuracy": acc, "source_drops_within_budget": source_ok,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report, splits.source_domains,
                                                     splits.target_domain))
    print(markdown(report, splits.source_domains, splits.target_domain))


def markdown(r: dict, sources: tuple[str, ...], target: str) -> str:
    m = r["machine"]
    lines = [
        f"# Export of a PACS run on the CPU: ONNX FP32 vs ONNX Runtime INT8 ({r['student']})", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} physical cores "
        f"used as ONNX Runtime intra-op threads); {m['platform']}; 1-minute load average "
        f"{r['load_average_1min']['before_timing']} before timing, "
        f"{r['load_average_1min']['after_accuracy']} at the end  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "  ",
        f"Run: `{r['run_dir']}`, student trained {r['trained_steps']} steps "
        f"(batch {r['recipe_train']['batch_size']}). Export took {r['export_seconds']} s.", "",
        "## Parity: ONNX FP32 (ONNX Runtime) vs PyTorch", "",
        f"Exporter: {r['exporter']}. On {r['parity_onnx_vs_pytorch']['images']} source-validation "
        f"images: max |logit difference| {r['parity_onnx_vs_pytorch']['max_abs_logit_diff']:.2e} "
        f"(tolerance {r['parity_onnx_vs_pytorch']['tolerance']}), top-1 agreement "
        f"{r['parity_onnx_vs_pytorch']['top1_agreement']:.2%}.", "",
        "## Latency (ms per call, median / p90, same process, interleaved)", "",
        "| engine | batch 1 | batch 32 |", "|---|---|---|"]
    for name in ("onnxruntime-fp32", "onnxruntime-int8", "pytorch-fp32"):
        b1 = r["latency_batch1"].get(name)
        b32 = r["latency_batch32"].get(name)
        cell = lambda x: f"{x['median_ms']:.2f} / {x['p90_ms']:.2f}" if x else "-"  # noqa: E731
        lines.append(f"| {name} | {cell(b1)} | {cell(b32)} |")
    s = r["speedup_int8_vs_fp32"]
    q = r["quantization"]
    lines += ["", f"INT8 / FP32 speed-up: **{s['batch1']}x at batch 1**, {s['batch32']}x at batch 32. "
              f"INT8 flavour: {q['reason']} (activations {q['activation_type']}, per-channel weights "
              f"{q['per_channel']}, reduce_range {q['reduce_range']}).", "",
              "## Accuracy (top-1 %) per PACS domain", "",
              "| domain | split | images | ORT FP32 | ORT INT8 | drop (points) |",
              "|---|---|---|---|---|---|"]
    for domain in (*sources, target):
        a = r["accuracy"][domain]
        lines.append(f"| {domain} | {a['split']} | {a['images']} | {a['onnxruntime-fp32']:.2f} | "
                     f"{a['onnxruntime-int8']:.2f} | {a['drop_points']:+.2f} |")
    b = r["budget_step"]
    c = r["calibration"]
    lines += ["", f"Budget step: budget {b['budget_points']} point(s) on every source domain; met: "
              f"{b['met']} (worst drop {b['fidelity']['worst_drop_points']:.2f} points against FP32 on "
              f"{sum(d['images'] for d in b['fidelity']['per_domain'].values())} source images; "
              f"{b['chosen']}); layers kept in FP32: {', '.join(b['kept_fp32_layers']) or 'none'}. "
              f"Source-domain INT8 drops within the budget (measured above): "
              f"{r['source_drops_within_budget']}. The target-domain drop is reported as it is; "
              "the target took no part in export.", "",
              f"Calibration: {c['size']} source-domain training images ({c['method']}), per domain "
              f"{c['per_domain']}, sha256 {c['sha256'][:16]}...", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
