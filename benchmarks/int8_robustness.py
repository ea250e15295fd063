"""Does INT8 keep the robustness FP32 has on the unseen domain? FP32, post-training INT8 before and
after the fixes, and QAT, per domain, with latency, on this CPU.

    python benchmarks/int8_robustness.py --run runs/pacs_erm_lite0-sketch --name pacs_lite0 \
        --qat-steps 60 --qat-batch-size 16
    python benchmarks/int8_robustness.py --demo-seeds 0 1 2 --name demo_rise

For each run:
1. `export_run` with --int8 --qat (this version): FP32 ONNX (static pads), post-training INT8 for
   ONNX Runtime (fidelity budget, first/last-layer policy), QAT's explicit Q/DQ ONNX (TensorRT's form)
   and QAT's weights quantized for the CPU.
2. "Before the fixes": the previous pipeline's all-INT8 model: the FP32 graph as the previous version
   exported it (timm's run-time 'same' padding arithmetic in the graph), quantized by ONNX Runtime's
   quantize_static over every node (no shape guard), same calibration images and settings.
3. Top-1 accuracy of every model on each source domain's validation split and on ALL images of the
   unseen target domain (reported; no choice anywhere used it), and batch-1 / batch-32 latency,
   the models interleaved round by round in one process.
Writes benchmarks/results/int8_robustness_<name>.json; --table merges every such JSON into
benchmarks/results/int8_robustness.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODELS = {"fp32": "ONNX FP32", "ptq_before": "PTQ before fixes", "ptq": "PTQ (export --int8)",
          "qat_qdq": "QAT Q/DQ (TensorRT form)", "qat_cpu": "QAT, CPU placement"}


def previous_pipeline_int8(run: Any, session: Any, out: Path, work: Path) -> None:
    """The all-INT8 model the previous version shipped before its fallback loop."""
    import torch
    from onnxruntime import quantization as q

    from rise_edge.backends.onnxruntime.int8 import _reader, cpu_quant_settings, preprocess
    from rise_edge.export.session import export_graph

    size = run.meta.preprocessing.input_size
    dynamic, pre = work / "dynamic.onnx", work / "dynamic-pre.onnx"
    export_graph(run.student, torch.randn(2, 3, size, size), dynamic, 18)
    preprocess(dynamic, pre)
    settings = cpu_quant_settings()
    q.quantize_static(str(pre), str(out), _reader("images", session.calibration_images, 16),
                      quant_format=q.QuantFormat.QDQ, per_channel=True,
                      reduce_range=settings.reduce_range,
                      activation_type=q.QuantType.QUInt8 if settings.activation_type == "uint8"
                      else q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax,
                      extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def accuracy(models: dict[str, Path], splits: Any, pre: Any) -> dict[str, dict]:
    """Top-1 (%) of every model on each source-val split and all target images."""
    from export_pacs import accuracy as top1  # the same chunked loop export_pacs.py uses

    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner

    runners = {name: OnnxRuntimeRunner(path) for name, path in models.items()}
    sets = {**{d: list(splits.val[d]) for d in splits.source_domains}, splits.target_domain: splits.test}
    table: dict[str, dict] = {name: {} for name in models}
    for domain, samples in sets.items():
        for name, value in top1(runners, samples, pre).items():
            table[name][domain] = {"accuracy": value, "images": len(samples)}
    return table


def latency(models: dict[str, Path], image: np.ndarray, rounds: int, iters: int) -> dict[str, dict]:
    from rise_edge.backends.latency import interleaved_ms
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner

    result: dict[str, dict] = {name: {} for name in models}
    for batch in (1, 32):
        runners = {name: OnnxRuntimeRunner(path) for name, path in models.items()}
        x = np.repeat(image[:1], batch, axis=0)
        times = interleaved_ms(runners, x, rounds, iters if batch == 1 else max(3, iters // 5))
        for name, t in times.items():
            result[name][f"batch{batch}_p50_ms"] = round(statistics.median(t), 3)
    return result


def measure_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rise_edge.bench.scoring import int8_judge
    from rise_edge.export.driver import export_run, resolve_export_config
    from rise_edge.export.recommend import recommended_int8
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import EXPORT_DIR, open_run

    run = open_run(run_dir)
    overrides = [f"export.qat_steps={args.qat_steps}"]
    if args.qat_batch_size:
        overrides.append(f"export.qat_batch_size={args.qat_batch_size}")
    cfg = resolve_export_config(run, overrides, formats=["onnx"], int8=True, qat="on",
                                accuracy_budget=args.budget)
    started = time.perf_counter()
    result = export_run(run_dir, cfg, progress=True)
    export_s = time.perf_counter() - started
    records = result.artefacts
    failed = [n for n in result.attempted if records[n]["status"] != "ok"]
    if failed:
        raise SystemExit(f"export failed: {failed}\n{result.table()}")
    folder = run_dir / EXPORT_DIR
    session = ExportSession(open_run(run_dir), cfg, lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory() as work:
        before = Path(work) / "before.onnx"
        previous_pipeline_int8(session.run, session, before, Path(work))
        models = {"fp32": folder / records["onnx-fp32"]["path"], "ptq_before": before,
                  "ptq": folder / records["onnx-int8"]["path"],
                  "qat_qdq": folder / records["onnx-int8-qat"]["path"],
                  "qat_cpu": folder / records["onnx-int8-qat-cpu"]["path"]}
        acc = accuracy(models, session.splits, session.pre)
        speed = latency(models, session.parity_images, args.rounds, args.iters)
    budget = records["onnx-int8"]["accuracy_budget"]
    qat = records["onnx-int8-qat"]["qat"]
    document = json.loads(result.path.read_text())
    return {"run": str(run_dir), "model": run.meta.model, "source_domains": list(run.meta.source_domains),
            "target_domain": run.meta.target_domain, "export_wall_s": round(export_s, 1),
            "accuracy": acc, "latency": speed,
            "ptq": {"met": budget["met"], "kept_fp32_layers": budget["kept_fp32_layers"],
                    "edge_policy": budget["edge_policy"], "chosen": budget["chosen"],
                    "fidelity": budget["fidelity"], "tried": budget["tried"]},
            "judge": {"ptq": int8_judge(records["onnx-int8"]),
                      "qat_cpu": int8_judge(records["onnx-int8-qat-cpu"]),
                      "qat_qdq": int8_judge(records["onnx-int8-qat"])},
            "recommended": recommended_int8(document),
            "judge_images": document.get("int8_images", {}),
            "qat": {"wall_time_s": qat["wall_time_s"], "steps": qat["steps"],
                    "batch_size": qat["batch_size"], "lr": qat["lr"], "selected_step": qat["selected_step"],
                    "history": qat["history"], "objective": records["onnx-int8-qat"]["objective"],
                    "parity": records["onnx-int8-qat"]["parity"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, action="append", default=[])
    parser.add_argument("--demo-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--demo-runs", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--name", default="")
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-batch-size", type=int, default=0)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--table", action="store_true", help="merge every record into the report")
    args = parser.parse_args()
    if args.table:
        return write_table()

    from rise_edge.bench.resources import machine_info
    from rise_edge.run_dir import software_versions

    runs = list(args.run)
    if args.demo_seeds:
        from rise_edge.config import load_recipe
        from rise_edge.demo.story import train_or_reuse
        for seed in args.demo_seeds:
            recipe = load_recipe(REPO / "recipes" / "demo.yaml", (f"train.seed={seed}",))
            path = args.demo_runs / f"seed{seed}" / "rise"
            train_or_reuse(recipe, path, progress=True)
            runs.append(path)
    measured = [measure_run(r, args) for r in runs]
    record = {"name": args.name, "command": shlex.join(["python", "benchmarks/int8_robustness.py",
                                                         *sys.argv[1:]]),
              "runs": measured, "machine": machine_info(), "versions": software_versions()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"int8_robustness_{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    write_table()


def write_table() -> None:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("int8_robustness_*.json"))]
    lines = ["# INT8 and the unseen domain: FP32, post-training INT8 before and after the fixes, QAT",
             "", "Top-1 % per domain (source domains: their validation splits; target: all its images, "
             "reported only: no choice used it). Latency: ONNX Runtime on this CPU, p50 ms per call, "
             "models interleaved in one process. 'QAT Q/DQ' is the explicit Q/DQ graph for TensorRT, "
             "run here by ONNX Runtime; 'QAT, CPU placement' is QAT's weights quantized with ONNX "
             "Runtime's CPU placement.", ""]
    for record in records:
        lines += [f"## {record['name']}", "", f"Command: `{record['command']}`  ",
                  f"Machine: {record['machine'].get('cpu', '')}, {record['machine'].get('logical_cores', '')} "
                  f"cores; versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()
                                                   if k in ("torch", "timm", "onnx", "onnxruntime")), ""]
        for run in record["runs"]:
            domains = [*run["source_domains"], run["target_domain"]]
            lines += [f"### {run['model']}, {run['run']} (unseen: {run['target_domain']})", "",
                      "| model | " + " | ".join(f"{d}{' (UNSEEN)' if d == run['target_domain'] else ''}"
                                                for d in domains) + " | b1 ms | b32 ms |",
                      "|---|" + "---|" * (len(domains) + 2)]
            for key, label in MODELS.items():
                acc = run["accuracy"][key]
                lat = run["latency"][key]
                lines.append(f"| {label} | " + " | ".join(f"{acc[d]['accuracy']:.2f}" for d in domains)
                             + f" | {lat['batch1_p50_ms']:.2f} | {lat['batch32_p50_ms']:.1f} |")
            fp32_t = run["accuracy"]["fp32"][run["target_domain"]]["accuracy"]
            notes = []
            for key in ("ptq", "qat_qdq", "qat_cpu"):
                delta = run["accuracy"][key][run["target_domain"]]["accuracy"] - fp32_t
                notes.append(f"{MODELS[key]} {delta:+.2f} points on {run['target_domain']}")
            speed = run["latency"]["fp32"]["batch1_p50_ms"] / run["latency"]["ptq"]["batch1_p50_ms"]
            judged = []
            for key in ("ptq", "qat_cpu"):
                v = run.get("judge", {}).get(key) or {}
                if v.get("judged"):
                    judged.append(f"{MODELS[key]}: drop {v['drop_points']:+.2f}, 95 % upper bound "
                                  f"{v['drop_upper95']:.2f}: {'met' if v['met'] else 'missed'}")
            per_domain = run.get("judge_images", {}).get("judge", {}).get("per_domain")
            lines += ["", f"Against FP32 on the unseen domain: {'; '.join(notes)}. PTQ batch-1 speed-up "
                      f"{speed:.2f}x. PTQ: {run['ptq']['chosen']}; kept FP32: "
                      f"{run['ptq']['kept_fp32_layers'] or 'none'}. "
                      + (f"Judge ({run['judge']['ptq'].get('budget_points', 1.0):g}-point budget, on "
                         + ", ".join(f"{d} {n}" for d, n in (per_domain or {}).items())
                         + " source validation images): " + "; ".join(judged)
                         + f"; export ships {run.get('recommended')}. " if judged else "")
                      + f"QAT: {run['qat']['steps']} steps of {run['qat']['batch_size']} "
                      f"in {run['qat']['wall_time_s']:.0f} s, selected step {run['qat']['selected_step']}"
                      f" ({run['qat']['objective']}). Export took {run['export_wall_s']:.0f} s.", ""]
    from rise_edge.export.judge import RULE

    lines += [f"Judge's rule (rise_edge.export.judge): {RULE}."]
    (RESULTS / "int8_robustness.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "int8_robustness.json").write_text(json.dumps(records, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
