"""What the INT8 target costs on this CPU: the same runs quantized for x86-avx2 (7-bit weights) and
for x86-vnni (8-bit weights), run here, against FP32, per domain, the unseen one included.

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/int8_target.py \
        --group pacs_lite0=runs/sweeps/pacs_erm_lite0 --group demo_rise=runs/sweeps/demo_rise

For every run (each held-out domain of a sweep folder), with export's own quantizer, calibration set
and judge images (rise_edge.export): the all-INT8 ONNX Runtime model for each target (no fallback
layer, so that only the arithmetic differs), each run two ways on ONNX Runtime's CPU provider:
  kernels    the fused integer kernels this CPU runs (MLAS: on AVX2 without VNNI, u8 x s8 pairs are
             added in a saturating int16, vpmaddubsw);
  emulated   graph optimisations off, so every Q/DQ pair is dequantized and the layer runs in
             float: the exact integer arithmetic with no saturation, what a CPU of the target's
             kind computes (up to float summation order).
Kernels far from emulated on the same graph is saturation showing. Plus the INT8 artefact export
ships for this machine's kind (`rise-edge export RUN --int8`, fallbacks included) and its
recommendation. Per set (each source domain's judge images; every image of the unseen domain, or
a seeded --max-unseen of them): top-1 agreement with FP32 and top-1; and batch-1 latency, FP32 and
each target's kernels timed interleaved. Writes benchmarks/results/int8_target.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import header, log, record_of, run_dirs, write  # noqa: E402

KINDS = ("x86-avx2", "x86-vnni")


def cpu_session(path: Path, optimised: bool) -> Any:
    """ONNX Runtime's CPU session as a function of a batch. optimised=False: graph optimisations off,
    so every Q/DQ pair is dequantized and the layer runs in float (the exact integer arithmetic, no
    saturation); True: every optimisation, so the fused integer kernels this CPU runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _logits(runner: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(runner(images[i:i + batch]), np.float32)
                           for i in range(0, len(images), batch)])


def _figures(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"agreement_pct": round(100 * float(np.mean(fp32.argmax(1) == int8.argmax(1))), 2),
            "top1": round(100 * float(np.mean(int8.argmax(1) == labels)), 2),
            "fp32_top1": round(100 * float(np.mean(fp32.argmax(1) == labels)), 2),
            "images": int(labels.size)}


def _export_for_this_machine(run_dir: Path, data_root: str | None) -> dict[str, Any]:
    """export.json's document, with an INT8 model for this machine's kind: the run's own export
    when it has one (`rise-edge export RUN --int8`), else `rise-edge export RUN --int8 --no-qat`."""
    from rise_edge.export.driver import export_run, resolve_export_config
    from rise_edge.export.int8_target import this_machine
    from rise_edge.run_dir import open_run

    path = run_dir / "export" / "export.json"
    if path.is_file():
        document = json.loads(path.read_text())
        record = document.get("artefacts", {}).get("onnx-int8", {})
        if record.get("status") == "ok" and "recommended" in document and \
                (record.get("int8_target") or {}).get("kind") == this_machine():
            return document

    cfg = resolve_export_config(open_run(run_dir), formats=["onnx"], int8=True, qat="off",
                                int8_target="auto")
    result = export_run(run_dir, cfg, progress=False, data_root=data_root)
    if result.failed:
        raise SystemExit(f"{run_dir}: export failed\n{result.table()}")
    return json.loads(result.path.read_text())


def measure_run(run_dir: Path, data_root: str | None, max_unseen: int) -> dict[str, Any]:
    from rise_edge.backends.latency import interleaved_ms
    from rise_edge.backends.onnxruntime import OnnxRuntimeRunner, cpu_quantizer
    from rise_edge.backends.onnxruntime.int8 import cpu_quant_settings
    from rise_edge.export.calibration import load_images
    from rise_edge.export.driver import resolve_export_config
    from rise_edge.export.int8_target import this_machine
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import open_run

    started = time.perf_counter()
    document = _export_for_this_machine(run_dir, data_root)
    run = open_run(run_dir)
    cfg = resolve_export_config(run, formats=["onnx"], int8=True, qat="off")
    session = ExportSession(run, cfg, lambda m: None, data_root)
    export_dir = run_dir / "export"
    fp32_path = export_dir / document["artefacts"]["onnx-fp32"]["path"]
    shipped_path = export_dir / document["artefacts"]["onnx-int8"]["path"]
    splits = session.splits
    unseen = list(splits.test)
    if max_unseen and len(unseen) > max_unseen:
        unseen = random.Random(0).sample(unseen, max_unseen)
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".int8-target-") as work:
        base = cpu_quantizer(session, fp32_path, Path(work))
        paths = {}
        for kind in KINDS:
            paths[kind] = Path(work) / f"{kind}.onnx"
            dataclasses.replace(base, settings=cpu_quant_settings(kind)).quantize(paths[kind])
        models: dict[str, Any] = {"fp32": OnnxRuntimeRunner(fp32_path, device="cpu")}
        for kind in KINDS:
            models[f"{kind} kernels"] = OnnxRuntimeRunner(paths[kind], precision="int8", device="cpu")
            models[f"{kind} emulated"] = cpu_session(paths[kind], optimised=False)
        models["shipped"] = OnnxRuntimeRunner(shipped_path, precision="int8", device="cpu")
        sets: dict[str, tuple[np.ndarray, np.ndarray]] = {
            f"source/{d}": session.fidelity.domains[d] for d in splits.source_domains}
        found = {name: {} for name in models if name != "fp32"}
        for key, (images, labels) in sets.items():
            logits = {name: _logits(m, images) for name, m in models.items()}
            for name in found:
                found[name][key] = _figures(logits["fp32"], logits[name], labels)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in models}
        for i in range(0, len(unseen), 256):  # decoded in chunks: a whole domain can be GBs
            images = load_images([splits.dataset_dir / p for p, _ in unseen[i:i + 256]],
                                 session.pre)
            for name, m in models.items():
                chunks[name].append(_logits(m, images))
        labels = np.array([y for _, y in unseen])
        logits = {name: np.concatenate(v) for name, v in chunks.items()}
        for name in found:
            found[name]["unseen"] = _figures(logits["fp32"], logits[name], labels)
        timed = {k: models[k] for k in ("fp32", "x86-avx2 kernels", "x86-vnni kernels", "shipped")}
        times = interleaved_ms(timed, session.parity_images[:1], rounds=5, iterations=20)
    latency = {k: round(float(np.median(v)), 3) for k, v in times.items()}
    shipped = document["artefacts"]["onnx-int8"]
    log(f"{run_dir}: " + ", ".join(f"{n} unseen agreement {f['unseen']['agreement_pct']}"
                                   for n, f in found.items()))
    return {"run": str(run_dir), "target": splits.target_domain, "seed": run.recipe.train.seed,
            "model": run.meta.model, "this_machine": this_machine(),
            "unseen_images": len(unseen), "unseen_of": len(splits.test),
            "models": found, "latency_batch1_ms": latency,
            "shipped": {"int8_target": shipped.get("int8_target"),
                        "kept_fp32_layers": shipped["accuracy_budget"]["kept_fp32_layers"],
                        "judge": shipped["accuracy_budget"]["judge"],
                        "recommendation": document["recommended"]["candidates"].get("onnx-int8")},
            "seconds": round(time.perf_counter() - started, 1)}


def summary(groups: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per group and model: mean agreement over runs, sources (worst domain) and unseen."""
    rows = []
    for group, runs in groups.items():
        for name in runs[0]["models"]:
            source = [min(f["agreement_pct"] for k, f in r["models"][name].items()
                          if k.startswith("source/")) for r in runs]
            unseen = [r["models"][name]["unseen"]["agreement_pct"] for r in runs]
            drop = [r["models"][name]["unseen"]["fp32_top1"] - r["models"][name]["unseen"]["top1"]
                    for r in runs]
            rows.append({"group": group, "model": name, "runs": len(runs),
                         "worst_source_agreement_mean": round(float(np.mean(source)), 2),
                         "unseen_agreement_mean": round(float(np.mean(unseen)), 2),
                         "unseen_agreement_min": round(float(np.min(unseen)), 2),
                         "unseen_drop_mean": round(float(np.mean(drop)), 2)})
    return rows


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("The INT8 target on this CPU: 7-bit against 8-bit weights", record,
                     ("python", "torch", "onnxruntime", "onnx", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min. This machine's INT8 kind: "
             f"{record['this_machine']}.", "",
             "All-INT8 ONNX Runtime models (no fallback layer) of each run, quantized for x86-avx2 "
             "(U8S8, 7-bit weights) and x86-vnni (U8S8, 8-bit weights) from the same calibration "
             "ranges; 'kernels' is what this CPU's fused integer kernels compute, 'emulated' the "
             "same graph with ONNX Runtime's graph optimisations off (every layer dequantized and "
             "run in float: the exact integer arithmetic, no saturation). 'shipped' is the INT8 "
             "model `rise-edge export RUN --int8` writes for this machine (fallback layers "
             "included). Agreement = % of images whose top-1 class equals FP32's; sources: the "
             "judge's validation images of each source domain; unseen: the held-out domain "
             "(reported, never used to choose).", "",
             "## Summary", "",
             "| runs | model | runs | worst source domain's agreement % (mean) | unseen agreement % "
             "(mean) | unseen agreement % (lowest) | unseen drop, points (mean) |",
             "|---|---|---|---|---|---|---|"]
    for r in record["summary"]:
        lines.append(f"| {r['group']} | {r['model']} | {r['runs']} | {r['worst_source_agreement_mean']} "
                     f"| {r['unseen_agreement_mean']} | {r['unseen_agreement_min']} | "
                     f"{r['unseen_drop_mean']:+.2f} |")
    lines.append("")
    for group, runs in record["groups"].items():
        lines += [f"## {group}", "", "| target | seed | model | "
                  + " | ".join(k.replace("source/", "") + " agr. %" for k in runs[0]["models"]["shipped"]
                               if k != "unseen") + " | unseen agr. % | unseen top-1 (FP32) |",
                  "|---|---|---|" + "---|" * (len(runs[0]["models"]["shipped"]) + 1)]
        for r in runs:
            for name, sets in r["models"].items():
                cells = [f"{f['agreement_pct']:.1f}" for k, f in sets.items() if k != "unseen"]
                u = sets["unseen"]
                lines.append(f"| {r['target']} | {r['seed']} | {name} | " + " | ".join(cells)
                             + f" | {u['agreement_pct']:.1f} | {u['top1']:.1f} ({u['fp32_top1']:.1f}) |")
        lines += ["", "Batch-1 latency (ms, median, interleaved in one process):", "",
                  "| target | seed | FP32 | x86-avx2 kernels | x86-vnni kernels | shipped | shipped "
                  "speed-up | export's verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            t = r["latency_batch1_ms"]
            verdict = (r["shipped"].get("recommendation") or {}).get("verdict", "-")
            lines.append(f"| {r['target']} | {r['seed']} | {t['fp32']} | {t['x86-avx2 kernels']} | "
                         f"{t['x86-vnni kernels']} | {t['shipped']} | "
                         f"{t['fp32'] / t['shipped']:.2f}x | {verdict} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--max-unseen", type=int, default=0,
                        help="score at most this many unseen images per run, a seeded sample (0: all)")
    parser.add_argument("--name", default="int8_target")
    args = parser.parse_args()
    started = time.perf_counter()
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in args.group:
        name, _, folder = item.partition("=")
        runs = run_dirs(Path(folder))
        if not runs:
            raise SystemExit(f"--group {item}: no run directories under {folder}")
        groups[name] = [measure_run(r, args.data_root, args.max_unseen) for r in runs]
    record = record_of("int8_target.py", sys.argv[1:], started, groups)
    from rise_edge.export.int8_target import this_machine

    record.update(this_machine=this_machine(), summary=summary(groups))
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
