"""Run a sweep and commit its tables with the command, machine, versions and wall time.

    OMP_NUM_THREADS=1 python benchmarks/sweep_record.py benchmarks/sweeps/demo.yaml --name sweep_demo --workers 2
    OMP_NUM_THREADS=1 python benchmarks/sweep_record.py benchmarks/sweeps/rise_ablation.yaml \\
        --name rise_ablation --workers 2 --choose student.head
    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=1 python benchmarks/sweep_record.py \\
        benchmarks/sweeps/pacs_erm_lite0.yaml --name sweep_pacs_erm_lite0 --workers 2 --published domainbed-erm

The same as `rise-edge sweep FILE --workers N` then `rise-edge sweep collect DIR`, timed. With
--published, DomainBed's ERM figures for PACS (ResNet-50, training-domain validation, Gulrajani and
Lopez-Paz 2021, the results table in their repository) are printed beside, labelled as such: another student, schedule and
machine, a reference point, not a like-for-like comparison.
With --choose FIELD (a grid field, e.g. student.head), the record also chooses FIELD's value for each
method and each setting of the other grid fields: the value whose runs have the best mean
source-validation accuracy (the selected students', over every target and seed). The unseen
accuracies are printed beside it, and take no part in the choice.
Writes benchmarks/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from rise_edge.bench.resources import machine_info
from rise_edge.run_dir import software_versions
from rise_edge.sweep.collect import collect, to_markdown
from rise_edge.sweep.launch import launch, load_sweep

RESULTS = Path(__file__).parent / "results"
# DomainBed (Gulrajani & Lopez-Paz, ICLR 2021), ERM with ResNet-50, training-domain validation,
# PACS per held-out domain and average (their results/2020_10_06_7df6f06/results.tex: 84.7 ± 0.4,
# 80.8 ± 0.6, 97.2 ± 0.3, 79.3 ± 1.0; Avg 85.5).
PUBLISHED = {"domainbed-erm": {"what": "DomainBed ERM, ResNet-50, training-domain validation",
                               "PACS": {"art_painting": 84.7, "cartoon": 80.8, "photo": 97.2,
                                        "sketch": 79.3, "avg": 85.5}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--published", choices=sorted(PUBLISHED), default=None)
    parser.add_argument("--choose", default=None, metavar="FIELD",
                        help="choose this grid field's value per method on source validation only")
    args = parser.parse_args()

    sweep = load_sweep(args.sweep)
    started = time.perf_counter()
    result = launch(sweep, args.sweep, workers=args.workers, threads=args.threads,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    wall = time.perf_counter() - started
    if result.failed:
        sys.exit(f"failed runs: {result.failed}")
    data = collect(sweep.output_dir)
    train_s = [json.loads((sweep.output_dir / r["name"] / "results.json").read_text())["stats"]
               ["wall_time_s"] for r in data["runs"]]
    record = {"name": args.name,
              "command": shlex.join(["python", "benchmarks/sweep_record.py", *sys.argv[1:]]),
              "sweep_file": args.sweep.read_text(), "wall_time_s": round(wall, 1),
              "runs_trained_now": len(result.finished), "runs_reused": len(result.skipped),
              "run_train_wall_s": {"sum": round(sum(train_s), 1), "max": round(max(train_s), 1)},
              "workers": args.workers, "threads_per_run": args.threads,
              "published": PUBLISHED.get(args.published), "collected": data,
              "choice": choose(data["runs"], args.choose) if args.choose else None,
              "machine": machine_info(), "versions": software_versions()}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(to_record_markdown(record))
    print(to_record_markdown(record))


def choose(runs: list[dict], field: str) -> dict:
    """For each (data set, method, other grid fields): FIELD's value with the best mean source
    validation over every target and seed; the unseen means ride along, reported only."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        if field not in run["point"]:
            continue
        rest = tuple(sorted((k, v) for k, v in run["point"].items() if k != field))
        key = (run["dataset"], run["method"], rest)
        groups.setdefault(key, {}).setdefault(str(run["point"][field]), []).append(run)
    rows = []
    for (dataset, method, rest), by_value in groups.items():
        scores = {value: {"source_val": 100 * statistics.fmean(r["val_mean"] for r in group),
                          "unseen": 100 * statistics.fmean(r["target_acc"] for r in group),
                          "runs": len(group)} for value, group in by_value.items()}
        best = max(scores, key=lambda v: (scores[v]["source_val"], -list(by_value).index(v)))
        rows.append({"dataset": dataset, "method": method,
                     "setting": ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest),
                     "scores": scores, "chosen": best})
    return {"field": field, "rule": "best mean source-validation accuracy of the selected "
            "students over every target and seed; ties: the first value in the sweep file",
            "rows": rows}


def _choice_markdown(choice: dict) -> list[str]:
    field = choice["field"]
    values = sorted({v for row in choice["rows"] for v in row["scores"]})
    lines = [f"## {field}, chosen on source validation", "",
             f"Rule: {choice['rule']}. The unseen columns are reported, never used to choose.", "",
             "| method | setting | " + " | ".join(f"source val, {v}" for v in values) + " | chosen | "
             + " | ".join(f"unseen, {v}" for v in values) + " |",
             "|---|---|" + "---|" * (2 * len(values) + 1)]
    for row in choice["rows"]:
        cell = lambda v, k: f"{row['scores'][v][k]:.1f}" if v in row["scores"] else "-"
        lines.append(f"| {row['method'].upper()} | {row['setting'] or '-'} | "
                     + " | ".join(cell(v, "source_val") for v in values) + f" | {row['chosen']} | "
                     + " | ".join(cell(v, "unseen") for v in values) + " |")
    return lines + [""]


def to_record_markdown(record: dict) -> str:
    machine, versions = record["machine"], record["versions"]
    collected = record["collected"]
    datasets = ", ".join(collected["tables"])
    lines = [f"# {record['name']}: {datasets}, every domain held out in turn "
             f"({len(collected['runs'])} runs)", "",
             f"Command: `{record['command']}`  ",
             *([f"Tables collected again with `{record['recollected_with']}` (how the runs are read "
                "changed, not the runs).  "] if record.get("recollected_with") else []),
             f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, no GPU; "
             f"{record['workers']} runs at once, {record['threads_per_run']} thread each.  ",
             "Versions: " + ", ".join(f"{k} {versions[k]}" for k in (
                 "python", "torch", "timm", "open_clip", "rise_edge") if k in versions) + ".  ",
             f"Wall time: {record['wall_time_s'] / 60:.1f} min for {record['runs_trained_now']} runs "
             f"trained now ({record['runs_reused']} reused); the runs' own training took "
             f"{record['run_train_wall_s']['sum'] / 60:.1f} min in all, the longest "
             f"{record['run_train_wall_s']['max'] / 60:.1f} min.", "", "Sweep file:", "", "```yaml",
             record["sweep_file"].rstrip(), "```", "",
             to_markdown(collected).replace("# Sweep ", "## Sweep ").replace("\n## ", "\n### ")]
    if record.get("choice"):
        lines += _choice_markdown(record["choice"])
    published = record.get("published")
    if published:
        for dataset, table in record["collected"]["tables"].items():
            if dataset not in published:
                continue
            targets = table["targets"]
            lines += [f"Published reference ({published['what']}), not like for like (another "
                      "student, the full schedule, a GPU):", "",
                      "| | " + " | ".join(targets) + " | Avg |", "|---|" + "---|" * (len(targets) + 1),
                      "| published | " + " | ".join(f"{published[dataset][t]:.1f}" for t in targets)
                      + f" | {published[dataset]['avg']:.1f} |", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:  # rewrite a record's Markdown from its JSON
        # --render RECORD.json [...] [--choose FIELD] [--recollect SWEEP_FILE]: --choose (re)computes
        # the choice from the record's runs; --recollect writes the sweep's copy beside its runs again
        # and collects them again (the runs as they are; the record's timings are kept), after a
        # change to how the copy or collect is written.
        args = sys.argv[2:]
        options = {}
        for flag in ("--choose", "--recollect"):
            if flag in args:
                at = args.index(flag)
                options[flag], args = args[at + 1], args[:at] + args[at + 2:]
        field = options.get("--choose")
        for path in map(Path, args):
            record = json.loads(path.read_text())
            if "--recollect" in options:
                import dataclasses

                from rise_edge.sweep.launch import _write_copy

                folder = Path(record["collected"]["folder"])
                sweep = dataclasses.replace(load_sweep(Path(options["--recollect"])), output_dir=folder)
                _write_copy(sweep)
                record["collected"] = collect(folder)
                record["sweep_file"] = Path(options["--recollect"]).read_text()
                record["recollected_with"] = shlex.join(["python", "benchmarks/sweep_record.py",
                                                         *sys.argv[1:]])
            if field:
                record["choice"] = choose(record["collected"]["runs"], field)
                path.write_text(json.dumps(record, indent=2) + "\n")
            path.with_suffix(".md").write_text(to_record_markdown(record))
    else:
        main()
