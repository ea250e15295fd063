"""What adapting to a site's unlabelled images does to the true accuracy there, and whether
INT8 calibrated on the site beats INT8 calibrated on the sources.

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/site_adaptation.py \
        --group pacs=runs/sweeps/pacs_erm_lite0 --group demo=runs/sweeps/demo_rise

For every run of every group, its held-out domain is the site: a seeded sample of up to
--max-site-images (default 800) of its images behind links with anonymous names (adapt gets pixels
only), and every image of the domain is scored. Through rise_edge.site.child.adapt_run, the very code
`rise-edge adapt` runs:
  - adabn and t3a children (FP32, PyTorch): true top-1 on the site before and after, the ATC and
    DoC estimates before and after, and whether adapt warned that the estimates predict harm;
  - a `--method none --int8-calibration site` child exported to INT8 for ONNX Runtime (no QAT,
    the same export settings as the parent's), against the parent's INT8 calibrated on the
    sources: true top-1 on the site of each.
Truth: each model's top-1 on every image of the held-out domain, from labels the script keeps to
itself. The children are made in a temporary folder and removed;
the parents are checked byte-identical afterwards. Writes benchmarks/results/site_adaptation.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import anonymous_site, ensure_export, header, measure_groups, record_of, write

RESULTS = Path(__file__).resolve().parent / "results"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(f"{p.relative_to(folder)}\t{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                          .encode())
    return digest.hexdigest()


def _atc_doc(record: dict[str, Any] | None) -> dict[str, float]:
    return {e["method"]: e["estimate"] for e in (record or {}).get("estimates", [])}


def int8_top1(run_dir: Path, paths: list[str], labels: np.ndarray, preprocessing: Any) -> float:
    from rise_edge.backend_table import runner_for
    from rise_edge.site.assess import logits_on
    from rise_edge.site.assess import decoder

    record = json.loads((run_dir / "export" / "export.json").read_text())["artefacts"]["onnx-int8"]
    runner = runner_for(record, run_dir / "export")
    logits = logits_on(runner, paths, decoder(preprocessing))
    return 100 * float(np.mean(logits.argmax(axis=1) == labels))


def fp32_top1(student: Any, paths: list[str], labels: np.ndarray, preprocessing: Any) -> float:
    """True top-1 of a student on every image of the held-out domain (ONNX Runtime when it exports)."""
    from rise_edge.site.assess import logits_on
    from rise_edge.site.assess import decoder
    from rise_edge.site.inference import fast_model

    with fast_model(student, preprocessing.input_size) as (model, _):
        logits = logits_on(model, paths, decoder(preprocessing))
    return 100 * float(np.mean(logits.argmax(axis=1) == labels))


def measure_run(run_dir: Path, data_root: str | None, work: Path, max_site: int) -> dict[str, Any]:
    import random

    from rise_edge.export.driver import export_run, resolve_export_config
    from rise_edge.run_dir import open_run, run_splits
    from rise_edge.site.child import adapt_run

    ensure_export(run_dir, data_root)
    fingerprint = _tree(run_dir)
    run = open_run(run_dir)
    pre = run.meta.preprocessing
    splits = run_splits(run, data_root)
    everything = list(splits.test)
    site_samples = everything if len(everything) <= max_site else sorted(
        random.Random(f"site:{splits.target_domain}").sample(everything, max_site))
    anonymous_site(site_samples, work / "site")
    all_paths = [p for p, _ in everything]
    all_labels = np.array([y for _, y in everything])
    before = fp32_top1(run.student, all_paths, all_labels, pre)
    found: dict[str, Any] = {"run": str(run_dir), "target": splits.target_domain,
                             "seed": run.recipe.train.seed, "site_images": len(site_samples),
                             "scored_images": len(everything), "fp32_before": round(before, 2),
                             "methods": {}}
    for method in ("adabn", "t3a"):
        started = time.perf_counter()
        try:
            child, record = adapt_run(run_dir, work / "site", method, child_dir=work / method,
                                      data_root=data_root, log=log)
        except Exception as exc:  # e.g. a student without BatchNorm: recorded, not fatal
            found["methods"][method] = {"refused": str(exc)}
            continue
        after = fp32_top1(open_run(child).student, all_paths, all_labels, pre)
        est_b, est_a = (_atc_doc(record["estimates"][k]) for k in ("before", "after"))
        found["methods"][method] = {
            "true_before": round(before, 2), "true_after": round(after, 2),
            "true_change": round(after - before, 2),
            "estimated_before": est_b, "estimated_after": est_a,
            "estimated_change": {m: round(est_a[m] - est_b[m], 2) for m in est_b if m in est_a},
            "warned": record["warning"] is not None, "seconds": round(time.perf_counter() - started, 1)}
        log(f"{run_dir} {method}: true {before:.1f} -> {after:.1f}; estimates {est_b} -> {est_a}")
    # INT8 calibrated on the site against on the sources (the same FP32 student)
    started = time.perf_counter()
    child, _ = adapt_run(run_dir, work / "site", "none", child_dir=work / "int8site",
                         int8_calibration="site", data_root=data_root, log=log)
    parent_cfg = json.loads((run_dir / "export" / "export.json").read_text())["export_config"]
    cfg = resolve_export_config(open_run(child), formats=["onnx"], int8=True, qat="off",
                                calibration_size=parent_cfg["calibration_size"],
                                calibration_method=parent_cfg["calibration_method"])
    export_run(child, cfg, progress=False, data_root=data_root)
    sources = int8_top1(run_dir, all_paths, all_labels, pre)
    at_site = int8_top1(child, all_paths, all_labels, pre)
    found["int8"] = {"calibrated_on_sources": round(sources, 2), "calibrated_on_site": round(at_site, 2),
                     "site_minus_sources": round(at_site - sources, 2),
                     "calibration_images": cfg.calibration_size,
                     "seconds": round(time.perf_counter() - started, 1)}
    log(f"{run_dir} INT8: sources {sources:.1f}, site {at_site:.1f}")
    found["parent_unchanged"] = _tree(run_dir) == fingerprint
    return found


def summarise(groups: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for group, runs in groups.items():
        for method in ("adabn", "t3a"):
            ok = [r["methods"][method] for r in runs if "true_change" in r["methods"].get(method, {})]
            if not ok:
                continue
            changes = [m["true_change"] for m in ok]
            atc = [m["estimated_change"].get("ATC") for m in ok]
            sign_right = sum((a is not None) and ((a > 0) == (c > 0)) for a, c in zip(atc, changes))
            harmed = [m for m in ok if m["true_change"] < -1.0]
            rows.append({"group": group, "what": method, "runs": len(ok),
                         "mean_true_change": round(statistics.fmean(changes), 2),
                         "min_true_change": round(min(changes), 2),
                         "max_true_change": round(max(changes), 2),
                         "atc_predicted_the_sign": f"{sign_right} of {len(ok)}",
                         "harmed_runs": len(harmed),
                         "harmed_and_warned": sum(m["warned"] for m in harmed),
                         "warned_runs": sum(m["warned"] for m in ok)})
        deltas = [r["int8"]["site_minus_sources"] for r in runs if "int8" in r]
        if deltas:
            rows.append({"group": group, "what": "INT8 calibrated on site - on sources",
                         "runs": len(deltas), "mean_true_change": round(statistics.fmean(deltas), 2),
                         "min_true_change": round(min(deltas), 2),
                         "max_true_change": round(max(deltas), 2)})
    return rows


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("Site adaptation: the true change on the held-out domain", record,
                     ("python", "torch", "onnxruntime", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min. Parents byte-identical afterwards: "
             f"{all(r['parent_unchanged'] for g in record['groups'].values() for r in g)}.", "",
             f"The site is each run's held-out domain: adapt sees a seeded sample of up to "
             f"{record['max_site_images']} of its images, without labels; every image of the domain "
             "is scored. Top-1 %; changes in points. ATC est.: the change adapt's ATC estimate "
             "predicted.", "", "## Summary", "",
             "| runs | adaptation | runs | mean change | worst | best | ATC predicted the sign | "
             "runs it hurt (> 1 pt) | of those, warned | warned in all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["summary"]:
        lines.append(f"| {r['group']} | {r['what']} | {r['runs']} | {r['mean_true_change']:+.1f} | "
                     f"{r['min_true_change']:+.1f} | {r['max_true_change']:+.1f} | "
                     f"{r.get('atc_predicted_the_sign', '-')} | {r.get('harmed_runs', '-')} | "
                     f"{r.get('harmed_and_warned', '-')} | {r.get('warned_runs', '-')} |")
    for group, runs in record["groups"].items():
        lines += ["", f"## {group}", "",
                  "| target | seed | FP32 | AdaBN (ATC est.) | T3A (ATC est.) | INT8 sources | "
                  "INT8 site |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            cells = []
            for method in ("adabn", "t3a"):
                x = r["methods"].get(method, {})
                cells.append("refused" if "refused" in x else
                             f"{x['true_after']:.1f} ({x['true_change']:+.1f}; est. "
                             f"{x['estimated_change'].get('ATC', float('nan')):+.1f})"
                             + (" warned" if x["warned"] else ""))
            before = next((x["true_before"] for x in r["methods"].values() if "true_before" in x),
                          float("nan"))
            lines.append(f"| {r['target']} | {r['seed']} | {before:.1f} | {cells[0]} | {cells[1]} | "
                         f"{r['int8']['calibrated_on_sources']:.1f} | "
                         f"{r['int8']['calibrated_on_site']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--data-root", default=os.environ.get("RISE_EDGE_DATA"))
    parser.add_argument("--name", default="site_adaptation")
    parser.add_argument("--max-site-images", type=int, default=800,
                        help="unlabelled images adapt sees (a seeded sample of the held-out domain); "
                             "accuracy is scored on all of its images")
    args = parser.parse_args()
    started = time.perf_counter()
    groups = measure_groups(args.group, lambda run, work: measure_run(run, args.data_root, work,
                                                                       args.max_site_images))
    command = [a for g in args.group for a in ("--group", g)] + ["--max-site-images",
                                                                   str(args.max_site_images)]
    record = {**record_of("site_adaptation.py", command, started, groups),
              "max_site_images": args.max_site_images, "summary": summarise(groups)}
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
