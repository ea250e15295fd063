"""`rise-edge sweep collect DIR`: DomainBed-style tables from a sweep's runs.

For every data set and method in the sweep, one row per model-selection rule and one column per
target domain plus their average, each cell the mean ± standard error over seeds:

  training-domain validation   for each (target, seed), the grid point whose selected student has
                               the best mean source-validation accuracy; its target accuracy
                               (the run's own results.json: checkpoints were chosen the same way)
  oracle (test-domain val.)    the best target accuracy over grid points and evaluated steps: an upper
                               bound that peeks at the target, reported beside, never used to choose

INT8 columns come from bench reports where the sweep ran export and bench (the recommended INT8
artefact of the run that training-domain validation selected). Only runs whose sweep.json carries
the sweep's hash count. Writes results.{md,csv,json,png} into DIR.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rise_edge.errors import UserError
from rise_edge.files import write_json_atomic, write_text_atomic
from rise_edge.sweep.launch import SWEEP_COPY, expand, load_sweep, read_run_record

SELECTIONS = {"training": "training-domain validation", "oracle": "oracle (test-domain validation)",
              "int8": "training-domain validation, INT8 artefact"}


@dataclass
class RunResult:
    name: str
    dataset: str
    method: str
    target: str
    seed: int
    point: dict[str, Any]          # the grid point, method left out
    val_mean: float                # selected checkpoint: mean source validation (0-1)
    target_acc: float              # selected checkpoint: target accuracy (0-1)
    oracle_acc: float              # best target accuracy over evaluated steps (0-1)
    int8_acc: float | None         # bench's INT8 row on the target, when it ran (0-1)


def _mean_se(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return 100 * mean, 100 * se, len(values)


def read_runs(folder: Path) -> tuple[Any, list[RunResult], list[str]]:
    """The sweep (from its copy in `folder`), its finished runs, and the names of those missing."""
    folder = Path(folder)
    if not (folder / SWEEP_COPY).is_file():
        raise UserError(f"{folder} holds no {SWEEP_COPY}: not a sweep's output folder (rise-edge sweep "
                        "writes it there)")
    sweep = load_sweep(folder / SWEEP_COPY)
    sweep = dataclasses.replace(sweep, output_dir=folder)  # wherever the folder moved
    runs, missing = [], []
    for spec in expand(sweep):
        run_dir = Path(spec.run_dir)
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            results = None
        if results is None or read_run_record(run_dir).get("sweep_hash") != sweep.hash:
            missing.append(spec.name)
            continue
        from rise_edge.config import load_recipe
        recipe = load_recipe(spec.recipe, spec.overrides)
        target_key = f"target/{spec.target}"
        oracle = results["accuracy"][target_key]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if "eval" in entry:
                oracle = max(oracle, entry["eval"][target_key])
        runs.append(RunResult(spec.name, recipe.data.dataset, recipe.method, spec.target, spec.seed,
                              {k: v for k, v in spec.point.items() if k != "loss.method"},
                              results["accuracy"]["val_mean"], results["accuracy"][target_key], oracle,
                              _int8_accuracy(run_dir, spec.target)))
    return sweep, runs, missing


def _int8_accuracy(run_dir: Path, target: str) -> float | None:
    try:
        report = json.loads((run_dir / "bench" / "report.json").read_text())
        export = json.loads((run_dir / "export" / "export.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    from rise_edge.export.driver import recommended_int8

    chosen = recommended_int8(export.get("artefacts", {}))
    row = next((r for r in report.get("rows", []) if r["engine"] == chosen and r["status"] == "ok"), None)
    top1 = (row or {}).get("accuracy", {}).get(target, {}).get("top1")
    return None if top1 is None else top1 / 100


def tables(runs: list[RunResult]) -> dict[str, Any]:
    """{dataset: {"targets": [...], "methods": {method: {selection: {target|avg: [mean, se, n]}}}}}."""
    out: dict[str, Any] = {}
    by_dataset: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_dataset[run.dataset].append(run)
    for dataset, group in by_dataset.items():
        targets = sorted({r.target for r in group})
        methods: dict[str, Any] = {}
        for method in sorted({r.method for r in group}):
            cells: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in SELECTIONS}
            for target in targets:
                for seed in sorted({r.seed for r in group}):
                    trial = [r for r in group if r.method == method and r.target == target
                             and r.seed == seed]
                    if not trial:
                        continue
                    chosen = max(trial, key=lambda r: (r.val_mean, r.name))  # ties: a stable choice
                    cells["training"][target].append(chosen.target_acc)
                    cells["oracle"][target].append(max(r.oracle_acc for r in trial))
                    if chosen.int8_acc is not None:
                        cells["int8"][target].append(chosen.int8_acc)
            table: dict[str, Any] = {}
            for selection, per_target in cells.items():
                if not per_target:
                    continue
                row = {t: list(_mean_se(v)) for t, v in per_target.items()}
                if all(t in per_target for t in targets):
                    # DomainBed's Avg: the mean over targets of the per-target means
                    row["avg"] = [statistics.fmean(row[t][0] for t in targets), None, None]
                table[selection] = row
            methods[method] = table
        out[dataset] = {"targets": targets, "methods": methods}
    return out


def collect(folder: Path) -> dict[str, Any]:
    """Read every run of the sweep in `folder`, write results.{json,md,csv,png}; return the JSON."""
    folder = Path(folder)
    sweep, runs, missing = read_runs(folder)
    if not runs:
        raise UserError(f"no finished run of sweep {sweep.hash} in {folder} ({len(missing)} "
                        "expected); run `rise-edge sweep` first")
    data = {"sweep_hash": sweep.hash, "folder": str(folder), "runs": [r.__dict__ for r in runs],
            "missing": missing, "selections": SELECTIONS, "tables": tables(runs)}
    write_json_atomic(folder / "results.json", data)
    write_text_atomic(folder / "results.md", to_markdown(data))
    write_text_atomic(folder / "results.csv", to_csv(data))
    _plot(data, folder / "results.png")
    return data


def _cell(value: list[Any] | None) -> str:
    if value is None:
        return "-"
    mean, se, n = value
    return f"{mean:.1f}" if se is None else f"{mean:.1f} ± {se:.1f}" if n > 1 else f"{mean:.1f}"


def to_markdown(data: dict[str, Any]) -> str:
    lines = [f"# Sweep {data['sweep_hash']}", "",
             f"{len(data['runs'])} runs collected"
             + (f"; {len(data['missing'])} not finished: {', '.join(data['missing'][:8])}"
                if data["missing"] else "") + ". Top-1 % on the held-out domain, mean ± standard "
             "error over seeds (no ± with one seed); Avg is the mean over targets.", ""]
    for dataset, table in data["tables"].items():
        targets = table["targets"]
        lines += [f"## {dataset}", "", "| method | model selection | " + " | ".join(targets)
                  + " | Avg |", "|---|---|" + "---|" * (len(targets) + 1)]
        for method, rows in table["methods"].items():
            for selection, row in rows.items():
                lines.append(f"| {method.upper()} | {SELECTIONS[selection]} | "
                             + " | ".join(_cell(row.get(t)) for t in targets)
                             + f" | {_cell(row.get('avg'))} |")
        lines.append("")
    return "\n".join(lines)


def to_csv(data: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "method", "selection", "target", "mean", "standard_error", "seeds"])
    for dataset, table in data["tables"].items():
        for method, rows in table["methods"].items():
            for selection, row in rows.items():
                for target, (mean, se, n) in row.items():
                    writer.writerow([dataset, method, selection, target, round(mean, 3),
                                     "" if se is None else round(se, 3), "" if n is None else n])
    return buffer.getvalue()


def _plot(data: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the tables carry everything; the plot needs the cpu extra's matplotlib
    datasets = list(data["tables"].items())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, (dataset, table) in zip(axes[0], datasets):
        targets = [*table["targets"], "avg"]
        methods = list(table["methods"])
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            row = table["methods"][method].get("training", {})
            means = [row.get(t, [math.nan])[0] for t in targets]
            errors = [(row.get(t, [0, 0])[1] or 0) for t in targets]
            ax.bar([x + i * width for x in range(len(targets))], means, width, yerr=errors,
                   label=method.upper(), capsize=3)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(targets))], targets)
        ax.set_ylabel("top-1 % on the held-out domain")
        ax.set_title(f"{dataset}: training-domain validation")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
