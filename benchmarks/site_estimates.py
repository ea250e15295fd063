"""How far the label-free site estimates of `rise-edge bench --site` are from the truth.

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/site_estimates.py \
        --group pacs=runs/sweeps/pacs_erm_lite0 --group demo=runs/sweeps/demo_rise

Every run of every group (a sweep folder: each domain held out in turn, any seeds) is exported
(`rise-edge export RUN --format onnx --int8 --no-qat` where its export.json lacks them), and its held-out
domain becomes a site: a temporary folder of links with anonymous names, so the estimators receive
pixels and nothing else. For the FP32 and the INT8 ONNX artefact, the estimators of
rise_edge.site (the very functions bench --site calls: ATC, ATC-TS (ATC after temperature
scaling), difference of confidences, and teacher agreement where the run distils from a teacher)
are calibrated on the run's source validation images and applied to the site's logits. The truth is
then computed apart: the same logits against the held-out labels, which the script keeps to itself
and no estimator is given. Per method: mean absolute error (points), the largest error, how often
its interval (of the kind the estimate names) holds the truth, Spearman's rho between estimated and
true accuracy over all artefacts, and the half-width an interval around the estimate would need to
hold the truth in 95 % of the cases. Writes benchmarks/results/<--name>.{md,json}; its Markdown ends
with the MEASURED block for rise_edge/site/estimates.py.

`--carry pacs` keeps the group `pacs` as the committed record (benchmarks/results/<--name>.json, or
`--carry pacs=OTHER.json`) has it, unmeasured, for groups whose runs are not on this machine: only
the estimators that record measured are in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (RESULTS, anonymous_site, ensure_export, header, log, measure_groups, record_of,
                    write)

ARTEFACTS = {"onnx-fp32": "FP32", "onnx-int8": "INT8"}
NOMINAL = 0.95  # the coverage an interval would have to reach to be printed as a 95 % interval


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
                           "interval": e["interval"], "interval_kind": e.get("interval_kind"),
                           "error": round(e["estimate"] - truth, 2),
                           "covered": e["interval"][0] <= truth <= e["interval"][1],
                           **{k: e[k] for k in ("temperature", "temperature_fitted",
                                                "temperature_fallback") if k in e}}
                          for e in record["estimates"]]}
        log(f"{run_dir}: {precision} truth {truth:.1f}; " + ", ".join(
            f"{e['method']} {e['estimate']:.1f}" for e in record["estimates"]))
    return found


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho of two equal-length samples (ties get their average rank); None where either
    is constant or there are fewer than 3 pairs."""
    def ranks(x: list[float]) -> np.ndarray:
        values, inverse, counts = np.unique(np.asarray(x, np.float64), return_inverse=True,
                                            return_counts=True)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based rank of each value's first
        return (first + (counts + 1) / 2.0)[inverse]

    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def half_width(errors: list[float], level: float = NOMINAL) -> float:
    """The smallest w for which estimate +- w holds the truth in at least `level` of the cases."""
    ordered = sorted(abs(e) for e in errors)
    return ordered[max(0, math.ceil(level * len(ordered)) - 1)]


def _stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Error statistics of one method over `entries` (each an estimate with its case's truth)."""
    errors = [e["error"] for e in entries]
    rho = spearman([e["estimate"] for e in entries], [e["truth"] for e in entries])
    # A record from before estimates named their interval: the same computations, unnamed.
    kinds = sorted({e.get("interval_kind") or ("bound" if e["method"] == "teacher agreement"
                                               else "spread") for e in entries})
    runs = len({e["run"] for e in entries})  # FP32 and INT8 of one run are one case, nearly
    return {"cases": len(entries), "runs": runs, "mae": round(statistics.fmean(abs(x) for x in errors), 2),
            "max_abs_error": round(max(abs(x) for x in errors), 2),
            "mean_signed_error": round(statistics.fmean(errors), 2),
            "interval_kind": ", ".join(kinds),
            "interval_coverage": round(sum(e["covered"] for e in entries) / len(entries), 3),
            "interval_held": sum(e["covered"] for e in entries),
            "spearman_rho": None if rho is None else round(rho, 3),
            "half_width_95": round(half_width(errors), 2),
            # split-conformal: a 95 % interval from n exchangeable cases needs ceil((n+1)0.95) <= n;
            # counted in runs, as a run's FP32 and INT8 errors are all but the same
            "enough_runs_for_95_interval": math.ceil((runs + 1) * NOMINAL) <= runs}


def _cases(runs: list[dict[str, Any]], precision: str | None = None
           ) -> dict[str, list[dict[str, Any]]]:
    """method -> its estimates, each with its case's truth, over `runs` (one precision or all)."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        for a in r["artefacts"].values():
            if precision is None or a["precision"] == precision:
                for e in a["estimates"]:
                    methods.setdefault(e["method"], []).append({**e, "truth": a["truth"],
                                                                "run": r["run"]})
    return methods


def summarise(groups: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per group and precision, per group (both precisions), and over every artefact of every
    group ("all"): each method's error statistics."""
    rows = []
    for group, runs in groups.items():
        for precision in ARTEFACTS.values():
            for method, entries in _cases(runs, precision).items():
                rows.append({"group": group, "precision": precision, "method": method,
                             **_stats(entries)})
        for method, entries in _cases(runs).items():
            rows.append({"group": group, "precision": "both", "method": method, **_stats(entries)})
    everything = [r for runs in groups.values() for r in runs]
    for method, entries in _cases(everything).items():
        rows.append({"group": "all", "precision": "both", "method": method, **_stats(entries)})
    return rows


def measured_block(summary: list[dict[str, Any]]) -> list[str]:
    """The MEASURED constant of rise_edge/site/estimates.py, from this record's per-group rows."""
    by: dict[str, list[str]] = {}
    for r in summary:
        if r["group"] != "all" and r["precision"] == "both":
            by.setdefault(r["method"], []).append(
                f'"{r["group"]}": Measured({r["cases"]}, {r["mae"]:.2f}, {r["max_abs_error"]:.2f}, '
                f'{r["interval_held"]})')
    return ["```python", "MEASURED: dict[str, dict[str, Measured]] = {",
            *(f'    "{m}": {{{", ".join(groups)}}},' for m, groups in by.items()), "}", "```"]


def _summary_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| runs | precision | method | cases | mean abs error | largest | mean signed | "
             "interval | coverage | Spearman rho | +- for 95 % |", "|---|---|---|---|---|---|---|---|"
             "---|---|---|"]
    for r in rows:
        rho = "-" if r.get("spearman_rho") is None else f"{r['spearman_rho']:+.2f}"
        lines.append(f"| {r['group']} | {r['precision']} | {r['method']} | {r['cases']} | "
                     f"{r['mae']:.1f} | {r['max_abs_error']:.1f} | {r['mean_signed_error']:+.1f} | "
                     f"{r.get('interval_kind', '')} | {100 * r['interval_coverage']:.0f} % | {rho} | "
                     f"{r.get('half_width_95', float('nan')):.1f} |")
    return lines


def _group_table(group: str, runs: list[dict[str, Any]], carried: str | None) -> list[str]:
    methods = list(dict.fromkeys(e["method"] for r in runs for a in r["artefacts"].values()
                                 for e in a["estimates"]))
    lines = ["", f"## {group}", ""]
    if carried:
        lines += [f"Carried unmeasured from {carried}.", ""]
    lines += ["| target | seed | precision | truth | " + " | ".join(methods)
              + " | ATC-TS T | unlike every source |", "|---|---|---|---|" + "---|" * (len(methods) + 2)]
    for r in runs:
        for a in r["artefacts"].values():
            by = {e["method"]: e for e in a["estimates"]}
            cells = " | ".join(f"{by[m]['estimate']:.1f} ({by[m]['error']:+.1f})" if m in by else "-"
                               for m in methods)
            ts = by.get("ATC-TS", {})
            t = "-" if "temperature" not in ts else f"{ts['temperature']:.2f}" + (
                "" if ts.get("temperature_fitted") else " (not fit)")
            lines.append(f"| {r['target']} | {r['seed']} | {a['precision']} | {a['truth']:.1f} "
                         f"| {cells} | {t} | {'yes' if a['unlike_every_source'] else 'no'} |")
    teachers = [r["teacher"] for r in runs if r.get("teacher")]
    if teachers:
        lines += ["", "Teacher: " + teachers[0]["model"] + "; its source-validation error "
                  + ", ".join(f"{t['source_error']:.1f}" for t in teachers)
                  + " % and its accuracy on the site " + ", ".join(
                      f"{t['site_accuracy']:.1f}" for t in teachers) + " % (run by run)."]
    return lines


def to_markdown(record: dict[str, Any]) -> str:
    lines = [*header("Label-free site estimates against the truth", record,
                     ("python", "torch", "onnxruntime", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min.", "",
             "Each run's held-out domain is the site (its images behind anonymous links: the "
             "estimators get pixels only); estimators calibrated on the run's source validation "
             "images; truth computed apart from the held-out labels. Error = estimate - truth "
             "(points); coverage = share of cases whose interval (of the kind named: spread = 95 % "
             "bootstrap spread over the images; bound = teacher agreement +- the teacher's source "
             "error) holds the truth; Spearman rho = rank correlation of estimated and true "
             "accuracy; +- for 95 % = the half-width an interval around the estimate would need to "
             "hold the truth in 95 % of these cases (in-sample).", "",
             "## Over every artefact", "",
             *_summary_table([r for r in record["summary"] if r["group"] == "all"]), "",
             *(["Not every method was measured on every group (cases): compare those per group, "
                "below, as rise_edge.site.estimates.measured_order does.", ""]
               if len({r["cases"] for r in record["summary"] if r["group"] == "all"}) > 1 else []),
             "## Per group", "", *_summary_table([r for r in record["summary"]
                                                  if r["group"] != "all"])]
    carried = record.get("carried", {})
    for group, runs in record["groups"].items():
        lines += _group_table(group, runs, carried.get(group))
    lines += ["", "## For rise_edge/site/estimates.py", "",
              "Per estimator and group, both precisions: cases, mean and largest absolute error "
              "(points), cases whose interval held the truth.", "",
              *measured_block(record["summary"])]
    return "\n".join(lines) + "\n"


def carry(items: list[str], name: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """The groups named by --carry NAME[=RECORD.json], as their record has them, and where from."""
    groups, sources = {}, {}
    for item in items:
        group, _, path = item.partition("=")
        source = Path(path) if path else RESULTS / f"{name}.json"
        if not source.is_file():
            raise SystemExit(f"--carry {item}: no record at {source} (name one: --carry NAME=PATH)")
        record = json.loads(source.read_text())
        if group not in record.get("groups", {}):
            raise SystemExit(f"--carry {item}: {source} has no group {group!r} "
                             f"(it has {', '.join(record.get('groups', {})) or 'none'})")
        groups[group] = record["groups"][group]
        sources[group] = f"{source.name} ({record.get('command', 'command not recorded')})"
    return groups, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--carry", action="append", default=[], metavar="NAME[=RECORD.json]",
                        help="keep group NAME from a record (default: the committed --name record)")
    parser.add_argument("--data-root", default=os.environ.get("RISE_EDGE_DATA"))
    parser.add_argument("--name", default="site_estimates")
    args = parser.parse_args()
    started = time.perf_counter()
    carried, sources = carry(args.carry, args.name)  # read before this run overwrites the record
    clash = set(carried) & {g.partition("=")[0] for g in args.group}
    if clash:
        raise SystemExit(f"--carry and --group both name {', '.join(sorted(clash))}")
    groups = {**carried, **measure_groups(args.group, lambda run, work: measure_run(
        run, args.data_root, work))}
    record = {**record_of("site_estimates.py", [a for g in args.group for a in ("--group", g)]
                          + [a for c in args.carry for a in ("--carry", c)], started, groups),
              "carried": sources, "summary": summarise(groups)}
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
