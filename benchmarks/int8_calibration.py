"""Which calibration set keeps ONNX Runtime's INT8 on the unseen domain: the sources as they are, or
the sources with a share of them shifted (export.calibration_shifted)?

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/int8_calibration.py \
        --group demo_rise=runs/sweeps/demo_rise --group pacs_lite0=runs/sweeps/pacs_erm_lite0

Every run must already have its FP32 ONNX (export.json with onnx-fp32). For each run and each
calibration variant (share shifted x calibration seed), the INT8 model export would ship is made the
way export makes it (rise_edge.backends.onnxruntime: the same quantizer, judge images and budget loop,
with the run's export settings but that calibration), then measured against the FP32 ONNX on:
  judge   the source validation images export judged it on (its verdict: drop, 95 % upper bound);
  unseen  every image of the held-out domain (reported only: no variant's making saw it).
Calibration seeds other than 0 show how much of a difference is the draw of calibration images
(the lottery) rather than the share. Writes benchmarks/results/int8_calibration.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common import header, log, measure_groups, record_of, write  # same folder

VARIANTS = ((0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1))  # (share shifted, calibration seed)


def measure_run(run_dir: Path, data_root: str | None, variants: list[tuple[float, int]]
                ) -> dict[str, Any]:
    from rise_edge.backends.onnxruntime import cpu_quantizer, fidelity_reference
    from rise_edge.backends.onnxruntime.int8 import quantize_within_budget
    from rise_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
    from rise_edge.config import ExportConfig
    from rise_edge.export.judge import verdict
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import open_run
    from rise_edge.site.assess import decoder

    run = open_run(run_dir)
    export = json.loads((run_dir / "export" / "export.json").read_text())
    saved = export["export_config"]
    base = ExportConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                           if k in ExportConfig.__dataclass_fields__})
    fp32_path = run_dir / "export" / export["artefacts"]["onnx-fp32"]["path"]
    fp32 = OnnxRuntimeRunner(fp32_path)
    first = ExportSession(run, base, lambda _: None, data_root)
    splits = first.splits
    paths, labels = [p for p, _ in splits.test], np.array([y for _, y in splits.test])
    decode = decoder(run.meta.preprocessing)
    unseen_images = [decode(paths[i:i + 64]) for i in range(0, len(paths), 64)]

    def predict(runner: Any) -> np.ndarray:
        return np.concatenate([np.asarray(runner(x)).argmax(1) for x in unseen_images])

    fp32_pred = predict(fp32)
    fp32_top1 = float(np.mean(fp32_pred == labels))
    found: dict[str, Any] = {"run": str(run_dir), "target": splits.target_domain,
                             "seed": run.recipe.train.seed, "model": run.meta.model,
                             "fp32_unseen_top1": round(100 * fp32_top1, 2),
                             "unseen_images": int(labels.size), "variants": []}
    for share, seed in variants:
        started = time.perf_counter()
        s = ExportSession(run, replace(base, calibration_shifted=share, calibration_seed=seed),
                          lambda _: None, data_root)
        # The judge's images stay those of seed 0, so every variant is judged on the same images.
        s._cache["fidelity_samples"] = first.fidelity_samples
        s._cache["fidelity"] = first.fidelity
        s._cache["splits"] = splits
        with tempfile.TemporaryDirectory(dir=run_dir / "export", prefix=".calib-") as work:
            work_dir, out = Path(work), Path(work) / "int8.onnx"
            quantizer = cpu_quantizer(s, fp32_path, work_dir)
            budget = quantize_within_budget(quantizer, out, s.fidelity, fidelity_reference(first),
                                            base.accuracy_budget, base.max_fallback_layers, work_dir)
            pred = predict(OnnxRuntimeRunner(out))
        judged = verdict(budget.final, base.accuracy_budget)
        row = {"shifted_share": share, "calibration_seed": seed, "met": judged.met,
               "judge_drop": judged.drop, "judge_upper95": judged.upper95,
               "kept_fp32": budget.kept_fp32,
               "unseen_drop": round(100 * (fp32_top1 - float(np.mean(pred == labels))), 3),
               "unseen_disagreement_pct": round(100 * float(np.mean(pred != fp32_pred)), 3),
               "seconds": round(time.perf_counter() - started, 1)}
        found["variants"].append(row)
        log(f"{run_dir} shifted {share} seed {seed}: judge {row['judge_drop']:+.2f} "
            f"(<= {row['judge_upper95']:.2f}), unseen {row['unseen_drop']:+.2f}, "
            f"{row['seconds']} s")
    return found


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, over the runs: mean and worst unseen drop, runs within 1 point, judge verdicts."""
    rows = []
    for share, seed in sorted({(v["shifted_share"], v["calibration_seed"])
                               for r in runs for v in r["variants"]}):
        got = [v for r in runs for v in r["variants"]
               if (v["shifted_share"], v["calibration_seed"]) == (share, seed)]
        drops = [v["unseen_drop"] for v in got]
        rows.append({"shifted_share": share, "calibration_seed": seed, "runs": len(got),
                     "unseen_drop_mean": round(statistics.fmean(drops), 3),
                     "unseen_drop_worst": round(max(drops), 3),
                     "within_1_point": sum(d <= 1.0 for d in drops),
                     "judge_met": sum(v["met"] for v in got),
                     "judge_drop_mean": round(statistics.fmean(v["judge_drop"] for v in got), 3)})
    return rows


def paired_effect(runs: list[dict[str, Any]], share: float) -> dict[str, Any] | None:
    """Shifted share vs none, paired on (run, calibration seed): mean change of the unseen drop with
    its standard error, and on how many pairs it was smaller."""
    diffs = []
    for r in runs:
        by = {(v["shifted_share"], v["calibration_seed"]): v["unseen_drop"] for v in r["variants"]}
        for (s, seed), drop in by.items():
            if s == share and (0.0, seed) in by:
                diffs.append(drop - by[(0.0, seed)])
    if len(diffs) < 2:
        return None
    return {"pairs": len(diffs), "mean_change_points": round(statistics.fmean(diffs), 3),
            "stderr": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 3),
            "smaller_in": sum(d < 0 for d in diffs), "larger_in": sum(d > 0 for d in diffs)}


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("INT8 calibration: the sources as they are, or partly shifted", record,
                     ("python", "torch", "onnxruntime", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min.", "",
             "For each run and calibration variant, the ONNX Runtime INT8 model export's budget loop "
             "ships (same quantizer, judge images and budget; only the calibration set differs). "
             "Drop = FP32 top-1 minus INT8 top-1, points (positive: INT8 worse). Judge: the source "
             "validation images, the same for every variant; unseen: every image of the held-out "
             "domain, reported only. Shifted share: the part of the run's calibration images "
             "(export.calibration_size: 512 by default, 256 in the demo recipe) given one of the "
             "stress shifts (grayscale, line drawing, posterised, blurred) in turn.", ""]
    for group, runs in record["groups"].items():
        lines += [f"## {group}", "", "| shifted share | calibration seed | runs | unseen drop, mean | "
                  "unseen drop, worst | runs within 1 point | judge met | judge drop, mean |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in record["summary"][group]:
            lines.append(f"| {r['shifted_share']:g} | {r['calibration_seed']} | {r['runs']} | "
                         f"{r['unseen_drop_mean']:+.2f} | {r['unseen_drop_worst']:+.2f} | "
                         f"{r['within_1_point']} of {r['runs']} | {r['judge_met']} of {r['runs']} | "
                         f"{r['judge_drop_mean']:+.2f} |")
        effect = record["effect"][group]
        if effect:
            lines += ["", f"Shifted share {effect['share']:g} against none, paired on run and "
                      f"calibration seed: the unseen drop changed by {effect['mean_change_points']:+.2f}"
                      f" +- {effect['stderr']:.2f} points (mean +- standard error over "
                      f"{effect['pairs']} pairs); smaller in {effect['smaller_in']}, larger in "
                      f"{effect['larger_in']}."]
        lines += ["", "| target | seed | FP32 unseen top-1 | shifted share | calibration seed | "
                  "judge drop (95 % upper) | met | unseen drop | unseen disagr. % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for run in runs:
            for v in run["variants"]:
                lines.append(f"| {run['target']} | {run['seed']} | {run['fp32_unseen_top1']:.2f} | "
                             f"{v['shifted_share']:g} | {v['calibration_seed']} | "
                             f"{v['judge_drop']:+.2f} ({v['judge_upper95']:.2f}) | "
                             f"{'yes' if v['met'] else 'no'} | {v['unseen_drop']:+.2f} | "
                             f"{v['unseen_disagreement_pct']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--data-root", default=os.environ.get("RISE_EDGE_DATA"))
    parser.add_argument("--variant", action="append", metavar="SHARE:SEED",
                        help=f"calibration variants (default: {' '.join(f'{a:g}:{b}' for a, b in VARIANTS)})")
    parser.add_argument("--name", default="int8_calibration")
    args = parser.parse_args()
    variants = ([(float(v.split(":")[0]), int(v.split(":")[1])) for v in args.variant]
                if args.variant else list(VARIANTS))
    started = time.perf_counter()
    groups = measure_groups(args.group, lambda run, _: measure_run(run, args.data_root, variants),
                            temporary=False)
    shares = sorted({s for s, _ in variants if s > 0})
    effects = {g: paired_effect(runs, shares[-1]) if shares else None for g, runs in groups.items()}
    record = {**record_of("int8_calibration.py",
                          [a for g in args.group for a in ("--group", g)]
                          + [a for v in (args.variant or []) for a in ("--variant", v)],
                          started, groups),
              "summary": {g: summary(runs) for g, runs in groups.items()},
              "effect": {g: {"share": shares[-1], **e} if e else None for g, e in effects.items()}}
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
