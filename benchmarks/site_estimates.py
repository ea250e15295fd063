"""How far the label-free site estimates of `rise-edge bench --site` are from the truth.

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/site_estimates.py \
        --group pacs=runs/sweeps/pacs_erm_lite0 --group demo=runs/sweeps/demo_rise

Every run of every group (a sweep folder: each domain held out in turn, any seeds) is exported
(`rise-edge export RUN --format onnx --int8 --no-qat` where its export.json lacks them), and its held-out
domain becomes a site: a temporary folder of links with anonymous names, so the estimators receive
pixels and nothing else. For the FP32 and the INT8 ONNX artefact, the estimators of
rise_edge.site (the very functions bench --site calls: ATC, difference of confidences, and
teacher agreement where the run distils from a teacher) are calibrated on the run's source
validation images and applied to the site's logits. The truth is then computed apart: the same
logits against the held-out labels, which the script keeps to itself and no estimator is given.
Per method: mean absolute error (points), the largest error, and how often the 95 % interval holds
the truth. Writes benchmarks/results/site_estimates.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import anonymous_site, ensure_export, header, log, measure_groups, record_of, write

ARTEFACTS = {"onnx-fp32": "FP32", "onnx-int8": "INT8"}


def measure_run(run_dir: Path, data_root: str | None, work: Path) -> dict[str, Any]:
    from rise_edge.backend_table import runner_for
    from rise_edge.run_dir import open_run, run_splits
    from rise_edge.site.assess import SiteInputs, assess, source_validation, teacher_view
    from rise_edge.site.assess import decoder
    from rise_edge.data.site_images import find_site_images

    export_s = ensure_export(run_dir, data_root)
    run = open_run(run_dir)
    splits = run_splits(run, data_root)
    links = anonymous_site(list(splits.test), work / "site")
    site = find_site_images(work / "site", progress=False)
    inputs = SiteInputs(source_validation(splits), site.paths)
    decode = decoder(run.meta.preprocessing)
    started = time.perf_counter()
    teacher = teacher_view(run.recipe, splits, inputs, decode, run.meta.preprocessing,
                           [run_dir / "text_embeddings"], log=log)
    teacher_s = time.perf_counter() - started
    export = json.loads((run_dir / "export" / "export.json").read_text())["artefacts"]
    labels = np.array([links[p] for p in site.paths])
    found: dict[str, Any] = {"run": str(run_dir), "target": splits.target_domain,
                             "seed": run.recipe.train.seed, "site_images": len(site.paths),
                             "source_validation_images": len(inputs.source),
                             "export_s": round(export_s, 1), "teacher_s": round(teacher_s, 1),
                             "artefacts": {}}
    if teacher is not None:
        found["teacher"] = {"model": teacher["model"],
                            "source_error": round(100 * teacher["source_error"], 2),
                            "site_accuracy": round(100 * float(np.mean(
                                teacher["site_predictions"] == labels)), 2)}
    for name, precision in ARTEFACTS.items():
        runner = runner_for(export[name], run_dir / "export")
        started = time.perf_counter()
        source_logits, site_logits = inputs.logits(runner, decode)
        record = assess(inputs, source_logits, site_logits, run.meta.classes, teacher)
        truth = 100 * float(np.mean(site_logits.argmax(axis=1) == labels))  # apart from the above
        found["artefacts"][name] = {
            "precision": precision, "truth": round(truth, 2), "seconds": round(time.perf_counter()
                                                                               - started, 1),
            "unlike_every_source": record["shift"]["unlike_every_source"],
            "source_validation_accuracy": record["source_validation_accuracy"],
            "estimates": [{"method": e["method"], "estimate": e["estimate"],
                           "interval": e["interval"],
                           "error": round(e["estimate"] - truth, 2),
                           "covered": e["interval"][0] <= truth <= e["interval"][1]}
                          for e in record["estimates"]]}
        log(f"{run_dir}: {precision} truth {truth:.1f}; " + ", ".join(
            f"{e['method']} {e['estimate']:.1f}" for e in record["estimates"]))
    return found


def summarise(groups: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for group, runs in groups.items():
        for precision in ARTEFACTS.values():
            methods: dict[str, list[dict[str, Any]]] = {}
            for r in runs:
                for a in r["artefacts"].values():
                    if a["precision"] == precision:
                        for e in a["estimates"]:
                            methods.setdefault(e["method"], []).append(e)
            for method, entries in methods.items():
                errors = [abs(e["error"]) for e in entries]
                rows.append({"group": group, "precision": precision, "method": method,
                             "cases": len(entries), "mae": round(statistics.fmean(errors), 2),
                             "max_abs_error": round(max(errors), 2),
                             "mean_signed_error": round(statistics.fmean(e["error"] for e in entries), 2),
                             "interval_coverage": round(sum(e["covered"] for e in entries)
                                                        / len(entries), 3)})
    return rows


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("Label-free site estimates against the truth", record,
                     ("python", "torch", "onnxruntime", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min.", "",
             "Each run's held-out domain is the site (its images behind anonymous links: the "
             "estimators get pixels only); estimators calibrated on the run's source validation "
             "images; truth computed apart from the held-out labels. Error = estimate - truth "
             "(points); coverage = share of cases whose 95 % interval holds the truth.", "",
             "## Summary", "",
             "| runs | precision | method | cases | mean abs error | largest | mean signed | "
             "interval coverage |", "|---|---|---|---|---|---|---|---|"]
    for r in record["summary"]:
        lines.append(f"| {r['group']} | {r['precision']} | {r['method']} | {r['cases']} | "
                     f"{r['mae']:.1f} | {r['max_abs_error']:.1f} | {r['mean_signed_error']:+.1f} | "
                     f"{100 * r['interval_coverage']:.0f} % |")
    for group, runs in record["groups"].items():
        lines += ["", f"## {group}", "",
                  "| target | seed | precision | truth | " + " | ".join(
                      e["method"] for e in next(iter(runs[0]["artefacts"].values()))["estimates"])
                  + " | unlike every source |", "|---|---|---|---|" + "---|" * (1 + len(next(iter(
                      runs[0]["artefacts"].values()))["estimates"]))]
        for r in runs:
            for a in r["artefacts"].values():
                cells = " | ".join(f"{e['estimate']:.1f} ({e['error']:+.1f})" for e in a["estimates"])
                lines.append(f"| {r['target']} | {r['seed']} | {a['precision']} | {a['truth']:.1f} "
                             f"| {cells} | {'yes' if a['unlike_every_source'] else 'no'} |")
        teachers = [r["teacher"] for r in runs if r.get("teacher")]
        if teachers:
            lines += ["", "Teacher: " + teachers[0]["model"] + "; its source-validation error "
                      + ", ".join(f"{t['source_error']:.1f}" for t in teachers)
                      + " % and its accuracy on the site " + ", ".join(
                          f"{t['site_accuracy']:.1f}" for t in teachers) + " % (run by run)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--data-root", default=os.environ.get("RISE_EDGE_DATA"))
    parser.add_argument("--name", default="site_estimates")
    args = parser.parse_args()
    started = time.perf_counter()
    groups = measure_groups(args.group, lambda run, work: measure_run(run, args.data_root, work))
    record = {**record_of("site_estimates.py", [a for g in args.group for a in ("--group", g)],
                          started, groups), "summary": summarise(groups)}
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
