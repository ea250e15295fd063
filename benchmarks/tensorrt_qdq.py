"""The TensorRT INT8 graph judged on a CPU: nvidia-modelopt's Q/DQ ONNX beside ONNX Runtime INT8 and
OpenVINO INT8, against FP32, per domain, the unseen one included.

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 .venv-gpu-stack/bin/python benchmarks/tensorrt_qdq.py \
        --group pacs_lite0=runs/sweeps/pacs_erm_lite0 --group demo_rise=runs/sweeps/demo_rise \
        --max-unseen 1000

Run it in a venv with the gpu_stack packages (nvidia-modelopt[onnx], onnxruntime-gpu; .ci/run's
.venv-gpu-stack) plus OpenVINO and NNCF (the dev extra). modelopt's Q/DQ graph is what a TensorRT
INT8 engine computes, up to kernel rounding; here ONNX Runtime's CPU provider runs it. For every run
(each held-out domain and seed of a sweep folder) a copy of the run is made under --work and
exported there (`rise-edge export COPY --format openvino --format tensorrt --int8 --no-qat`, with
`--format onnx` too where the run has no ONNX Runtime INT8 yet): the run's own export stays as it
was, and its FP32 ONNX and ONNX Runtime INT8 are the ones compared. Export's judge verdict of each
INT8 artefact is read from export.json. Per set (each source domain's judge images; the unseen domain's images, or a
seeded --max-unseen of them): top-1 agreement with FP32 and top-1. Writes
benchmarks/results/tensorrt_qdq.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from int8_target import _figures, _logits, cpu_session  # noqa: E402
from common import header, log, record_of, run_dirs, write  # noqa: E402

# export.json artefact -> how the table names it
INT8 = {"onnx-int8": "ONNX Runtime INT8", "openvino-int8": "OpenVINO INT8",
        "onnx-int8-tensorrt": "TensorRT Q/DQ graph"}
KERNELS = "onnx-int8-tensorrt, x86 kernels"
SCORED = {**INT8, KERNELS: "TensorRT Q/DQ graph through ONNX Runtime's fused x86 kernels"}


def _have(document: dict[str, Any]) -> list[str]:
    """The INT8 forms a copy's export.json holds, made and (the Q/DQ graph) judged as written."""
    artefacts = document.get("artefacts", {})
    return [a for a in INT8 if a not in _needed(document, INT8) and a in artefacts]


def _needed(document: dict[str, Any], wanted: Any) -> list[str]:
    """Export formats still to run on a copy for the `wanted` INT8 forms: each whose artefact is
    missing, and tensorrt when its Q/DQ graph was judged before the graph ran as written."""
    artefacts = document.get("artefacts", {})
    ok = {a for a in INT8 if artefacts.get(a, {}).get("status") == "ok"}
    if "as written" not in str(artefacts.get("onnx-int8-tensorrt", {}).get("judged_as", "")):
        ok.discard("onnx-int8-tensorrt")  # judged through the CPU kernels: export makes it again
    formats = {"onnx-int8": "onnx", "openvino-int8": "openvino", "onnx-int8-tensorrt": "tensorrt"}
    return [formats[a] for a in INT8 if a in wanted and a not in ok]


def _export_copy(run_dir: Path, copy: Path, data_root: str | None, wanted: Any) -> dict[str, Any]:
    """export.json of a copy of the run with all three INT8 forms (what a copy already has is kept).
    The run's own FP32 ONNX and ONNX Runtime INT8 are kept when it has them (the models
    benchmarks/int8_target.py measured); OpenVINO and the Q/DQ graph are made from that FP32 ONNX."""
    from rise_edge.export.driver import export_run, resolve_export_config
    from rise_edge.run_dir import open_run

    path = copy / "export" / "export.json"
    if not path.is_file():
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("bench", ".*.lock"))
    document = json.loads(path.read_text()) if path.is_file() else {}
    formats = _needed(document, wanted)
    if formats:  # a format asked for is made afresh; the others are left as they are
        cfg = resolve_export_config(open_run(copy), formats=formats, int8=True, qat="off",
                                    int8_target="auto")
        result = export_run(copy, cfg, progress=False, data_root=data_root)
        document = json.loads(result.path.read_text())
        if _needed(document, wanted):
            raise SystemExit(f"{copy}: export made no {', '.join(_needed(document, wanted))}\n"
                             f"{result.table()}")
    return document


def _verdict(record: dict[str, Any]) -> dict[str, Any]:
    budget = record.get("accuracy_budget", {})
    judge = budget.get("judge") or {}
    return {"met": budget.get("met"), "agreement_pct": judge.get("agreement_pct"),
            "worst_domain_agreement_pct": judge.get("worst_domain_agreement_pct"),
            "drop_upper95": judge.get("drop_upper95"), "kept_fp32_layers": len(budget.get("kept_fp32_layers", []))}


def measure_run(run_dir: Path, copy: Path, data_root: str | None, max_unseen: int, wanted: Any
                ) -> dict[str, Any]:
    from rise_edge.backend_table import runner_for
    from rise_edge.export.calibration import load_images
    from rise_edge.export.driver import resolve_export_config
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import open_run

    started = time.perf_counter()
    document = _export_copy(run_dir, copy, data_root, wanted)
    forms = _have(document)  # the wanted ones, and any a copy already had
    run = open_run(copy)
    session = ExportSession(run, resolve_export_config(run, formats=["onnx"], int8=True, qat="off"),
                            lambda m: None, data_root)
    artefacts, export_dir = document["artefacts"], copy / "export"
    # Every model on the CPU: the Q/DQ graph through ONNX Runtime's CPU provider, as bench runs it.
    models = {"fp32": runner_for(artefacts["onnx-fp32"], export_dir, device="cpu")}
    models.update({name: runner_for(artefacts[name], export_dir, device="cpu") for name in forms})
    # The same Q/DQ graph through ONNX Runtime's fused x86 kernels: why it must run as written here.
    models[KERNELS] = cpu_session(export_dir / artefacts["onnx-int8-tensorrt"]["path"],
                                  optimised=True)
    splits = session.splits
    unseen = list(splits.test)
    if max_unseen and len(unseen) > max_unseen:
        unseen = random.Random(0).sample(unseen, max_unseen)
    scored = [n for n in SCORED if n in forms or n == KERNELS]
    found: dict[str, dict[str, Any]] = {name: {} for name in scored}
    for domain in splits.source_domains:
        images, labels = session.fidelity.domains[domain]
        logits = {name: _logits(m, images) for name, m in models.items()}
        for name in scored:
            found[name][f"source/{domain}"] = _figures(logits["fp32"], logits[name], labels)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for i in range(0, len(unseen), 256):  # decoded in chunks: a whole domain can be GBs
        images = load_images([splits.dataset_dir / p for p, _ in unseen[i:i + 256]], session.pre)
        for name, m in models.items():
            chunks[name].append(_logits(m, images))
    labels = np.array([y for _, y in unseen])
    logits = {name: np.concatenate(v) for name, v in chunks.items()}
    for name in scored:
        found[name]["unseen"] = _figures(logits["fp32"], logits[name], labels)
    log(f"{run_dir}: " + ", ".join(f"{SCORED[n]} unseen agreement {f['unseen']['agreement_pct']}"
                                   for n, f in found.items()))
    return {"run": str(run_dir), "target": splits.target_domain, "seed": run.recipe.train.seed,
            "model": run.meta.model, "unseen_images": len(unseen), "unseen_of": len(splits.test),
            "models": found, "verdicts": {n: _verdict(artefacts[n]) for n in forms},
            "modelopt": {k: artefacts["onnx-int8-tensorrt"].get(k)
                         for k in ("calibration_method", "unquantized_layers", "note")},
            "seconds": round(time.perf_counter() - started, 1)}


def summary(groups: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per group and INT8 form: mean agreement over runs (worst source domain, unseen), the unseen
    drop, and how many runs export's judge passed."""
    rows = []
    for group, all_runs in groups.items():
        for name in SCORED:
            runs_with = [r for r in all_runs if name in r["models"]]
            if not runs_with:
                continue
            runs = runs_with
            source = [min(f["agreement_pct"] for k, f in r["models"][name].items()
                          if k.startswith("source/")) for r in runs]
            unseen = [r["models"][name]["unseen"]["agreement_pct"] for r in runs]
            drop = [r["models"][name]["unseen"]["fp32_top1"] - r["models"][name]["unseen"]["top1"]
                    for r in runs]
            rows.append({"group": group, "model": SCORED[name], "runs": len(runs),
                         "worst_source_agreement_mean": round(float(np.mean(source)), 2),
                         "unseen_agreement_mean": round(float(np.mean(unseen)), 2),
                         "unseen_agreement_min": round(float(np.min(unseen)), 2),
                         "unseen_drop_mean": round(float(np.mean(drop)), 2),
                         "judge_met": (sum(bool(r["verdicts"][name]["met"]) for r in runs)
                                       if name in INT8 else None)})
    return rows


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("The TensorRT INT8 Q/DQ graph beside ONNX Runtime and OpenVINO INT8, on a CPU",
                     record, ("python", "torch", "onnxruntime", "modelopt", "onnx", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min.", "",
             "Each run's INT8 forms: its own ONNX Runtime INT8 (`rise-edge export RUN --int8 "
             "--no-qat`, made beforehand, where it exists) and, on a copy of the run, `rise-edge "
             "export COPY --format openvino --format tensorrt --int8 --no-qat` (the same FP32 ONNX "
             "and calibration images for all three). 'TensorRT Q/DQ graph' is nvidia-modelopt's explicit-quantization ONNX "
             "(symmetric INT8, per-channel weights, Q/DQ where TensorRT fuses them, unquantized "
             "layers in FP32), run by ONNX Runtime's CPU provider with its Q/DQ computed as written "
             "(graph optimisations off): what a TensorRT INT8 engine built from it computes, up to "
             "kernel rounding; no engine was built (no GPU). The same graph through ONNX Runtime's "
             "fused x86 kernels is shown beside it: on a CPU without VNNI those add u8 x s8 pairs in "
             "a saturating int16, which its 8-bit weights overflow, so that row is the CPU kernels' "
             "arithmetic, not TensorRT's. Agreement = % "
             "of images whose top-1 class equals FP32's; sources: the judge's validation images of "
             "each source domain; unseen: the held-out domain (reported, never used to choose). "
             "'judge met': runs where export's INT8 judge passed the artefact (accuracy budget and "
             "agreement on the source domains).", "",
             "## Summary", "",
             *([record["notes"], ""] if record.get("notes") else []),
             "| group | INT8 form | runs | worst source domain's agreement % (mean) | unseen agreement % "
             "(mean) | unseen agreement % (lowest) | unseen drop, points (mean) | judge met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["summary"]:
        lines.append(f"| {r['group']} | {r['model']} | {r['runs']} | {r['worst_source_agreement_mean']} "
                     f"| {r['unseen_agreement_mean']} | {r['unseen_agreement_min']} | "
                     f"{r['unseen_drop_mean']:+.2f} | "
                     + (f"{r['judge_met']} of {r['runs']} |" if r["judge_met"] is not None else "- |"))
    lines.append("")
    for group, runs in record["groups"].items():
        first = runs[0]["models"]["onnx-int8-tensorrt"]
        lines += [f"## {group}", "", "| target | seed | INT8 form | "
                  + " | ".join(k.replace("source/", "") + " agr. %" for k in first if k != "unseen")
                  + " | unseen agr. % | unseen top-1 (FP32) | judge |",
                  "|---|---|---|" + "---|" * (len(first) + 2)]
        for r in runs:
            for name, sets in r["models"].items():
                cells = [f"{f['agreement_pct']:.1f}" for k, f in sets.items() if k != "unseen"]
                u, v = sets["unseen"], r["verdicts"].get(name)
                judged = "-" if v is None else ("met" if v["met"] else "missed")
                lines.append(f"| {r['target']} | {r['seed']} | {SCORED[name]} | " + " | ".join(cells)
                             + f" | {u['agreement_pct']:.1f} | {u['top1']:.1f} ({u['fp32_top1']:.1f}) "
                             f"| {judged} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR[@FORMS]")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/tensorrt_qdq"),
                        help="where the exported copies of the runs go (default: runs/tensorrt_qdq)")
    parser.add_argument("--max-unseen", type=int, default=0,
                        help="score at most this many unseen images per run, a seeded sample (0: all)")
    parser.add_argument("--forms", default=",".join(INT8),
                        help="INT8 forms to make where a copy lacks them (comma-separated; default all: "
                        + ", ".join(INT8) + "); forms a copy already holds are measured too")
    parser.add_argument("--note", default="", help="a sentence the record carries (what it left out, and why)")
    parser.add_argument("--name", default="tensorrt_qdq")
    args = parser.parse_args()
    started = time.perf_counter()
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in args.group:
        name, _, folder = item.partition("=")
        folder, _, forms = folder.partition("@")  # NAME=DIR@form,form: this group's own --forms
        runs = run_dirs(Path(folder))
        if not runs:
            raise SystemExit(f"--group {item}: no run directories under {folder}")
        wanted = [f.strip() for f in (forms or args.forms).split(",") if f.strip()]
        unknown = sorted(set(wanted) - set(INT8))
        if unknown:
            raise SystemExit(f"--forms: unknown {', '.join(unknown)}; forms: {', '.join(INT8)}")
        groups[name] = [measure_run(r, args.work / name / r.relative_to(folder), args.data_root,
                                    args.max_unseen, wanted) for r in runs]
    record = record_of("tensorrt_qdq.py", sys.argv[1:], started, groups)
    record["summary"] = summary(groups)
    if args.note:
        record["notes"] = args.note
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
