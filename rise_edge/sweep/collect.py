"""`rise-edge sweep collect DIR`: DomainBed-style tables from a sweep's runs.

For every data set and compared variant (the method, plus the sweep file's `compare` fields), one
row per model-selection rule and one column per target domain plus their average, each cell the
mean ± standard error over seeds:

  training-domain validation   for each (target, seed), the grid point whose selected student has
                               the best mean source-validation accuracy; its target accuracy
                               (the run's own results.json: checkpoints were chosen the same way);
                               the row below it gives that source-validation accuracy, the only
                               score fit to choose between the rows (heads, variants) themselves
  oracle (test-domain val.)    DomainBed's: the target is split once, seeded (rise_edge.data.domains,
                               ORACLE_FRACTION out); for each (target, seed), the grid point whose
                               last step scores best on the out part; its last step's accuracy on
                               the in part (no early stopping). It peeks at the target: reported
                               beside, never used to choose anything

Ties go to the grid point that comes first in the sweep file's order. INT8 columns come from bench
reports where the sweep ran export and bench (the recommended INT8 artefact of the run that
training-domain validation selected). Only runs whose sweep.json carries the sweep's hash count.
Writes results.{md,csv,json,png} into DIR.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rise_edge.errors import DamagedFile, UserError
from rise_edge.files import (Record, atomic_path, read_json_record, read_jsonl_records,
                             write_json_atomic, write_text_atomic)
from rise_edge.sweep.launch import SWEEP_COPY, SWEEP_RECORD, expand, grid_points, load_sweep

SELECTIONS = {"training": "training-domain validation",
              "source_val": "source validation of that choice (what chose it)",
              "oracle": "test-domain validation (oracle, DomainBed's)",
              "int8": "training-domain validation, INT8 artefact"}


@dataclass
class RunResult:
    name: str
    dataset: str
    method: str
    variant: str                   # the compared fields' values ('' when the sweep compares none)
    target: str
    seed: int
    order: int                     # the grid point's place in the sweep file's order (ties)
    point: dict[str, Any]          # the grid point, method left out
    val_mean: float                # selected checkpoint: mean source validation (0-1)
    target_acc: float              # selected checkpoint: target accuracy (0-1)
    oracle_out: float | None       # last step: target accuracy on the oracle's out part (0-1)
    oracle_in: float | None        # last step: on its in part (0-1); None: a run from before
    int8_acc: float | None         # bench's INT8 row on the target, when it ran (0-1)

    @property
    def label(self) -> str:
        """The row's key in the tables: the method's name, with the compared fields' values."""
        return self.method + (f" ({self.variant})" if self.variant else "")


def display(label: str) -> str:
    """A row's key as the tables print it: 'rise (head=split)' -> 'RISE (head=split)'."""
    method, _, rest = label.partition(" ")
    return method.upper() + (f" {rest}" if rest else "")


def _mean_se(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return 100 * mean, 100 * se, len(values)


RETRAIN = "move that run aside and run the sweep again to retrain it"


def read_runs(folder: Path) -> tuple[Any, list[RunResult], list[str], dict[str, str]]:
    """The sweep (from its copy in `folder`), its finished runs, the names of those missing, and
    the runs left out because a record of theirs is damaged (name -> the one line saying how)."""
    folder = Path(folder)
    if not (folder / SWEEP_COPY).is_file():
        raise UserError(f"{folder} holds no {SWEEP_COPY}: not a sweep's output folder (rise-edge sweep "
                        "writes it there)")
    sweep = load_sweep(folder / SWEEP_COPY)
    sweep = dataclasses.replace(sweep, output_dir=folder)  # wherever the folder moved
    runs, missing, damaged = [], [], {}
    points = grid_points(sweep.grid) or [{}]  # their order breaks ties
    for spec in expand(sweep):
        try:
            run = _read_run(sweep, spec, points)
        except DamagedFile as exc:  # one damaged run is named and left out, never tabulated
            damaged[spec.name] = str(exc)
            continue
        if run is None:
            missing.append(spec.name)
        else:
            runs.append(run)
    return sweep, runs, missing, damaged


def _read_run(sweep: Any, spec: Any, points: list[dict[str, Any]]) -> RunResult | None:
    """One run's numbers, every one checked (DamagedFile names the file and field); None for a run
    this sweep has not finished."""
    from rise_edge.config import load_recipe

    run_dir = Path(spec.run_dir)
    results = read_json_record(run_dir / "results.json", RETRAIN, missing_ok=True)
    if results is None:
        return None
    record = read_json_record(run_dir / SWEEP_RECORD, RETRAIN, missing_ok=True)
    if record is None or record.raw("sweep_hash") != sweep.hash:
        return None
    recipe = load_recipe(spec.recipe, spec.overrides)
    last = _last_evaluation(run_dir)
    val_mean = _score(results.data, "val_mean", results.path)
    target_acc = _score(results.data, f"target/{spec.target}", results.path)
    variant = ", ".join(f"{k.rsplit('.', 1)[-1]}={spec.point[k]}" for k in sweep.compare
                        if k in spec.point)
    return RunResult(spec.name, recipe.data.dataset, recipe.method, variant, spec.target,
                     spec.seed, points.index(spec.point),
                     {k: v for k, v in spec.point.items() if k != "loss.method"},
                     val_mean, target_acc,
                     last.get(f"target_out/{spec.target}"), last.get(f"target_in/{spec.target}"),
                     _int8_accuracy(run_dir, spec.target))


def _score(results: Any, key: str, path: Path) -> float:
    """results.json's accuracy[key] (0-1), or one line naming the file and the field."""
    record = Record(path, results if isinstance(results, dict) else {}, RETRAIN)
    return float(record.number(("accuracy", key), low=0, high=1))


def _last_evaluation(run_dir: Path) -> dict[str, float]:
    """The scores of the run's last evaluation in metrics.jsonl ({} when there is none); every
    evaluation's scores are accuracies, checked to be numbers from 0 to 1."""
    last: dict[str, float] = {}
    for entry in read_jsonl_records(run_dir / "metrics.jsonl", RETRAIN):
        scores = entry.mapping("eval", optional=True)
        if scores is None:
            continue
        last = {key: float(scores.number(key, low=0, high=1)) for key in scores.data}
    return last


def _int8_accuracy(run_dir: Path, target: str) -> float | None:
    """The target accuracy (0-1) of the INT8 artefact export recommended, from the run's bench
    report; None where the sweep did not export and bench it."""
    from rise_edge.export.recommend import recommended_int8
    from rise_edge.run_dir import read_export_record

    fix = (f"delete {run_dir / 'export'} and {run_dir / 'bench'} and run the sweep again to "
           "export and bench that run again")
    report = read_json_record(run_dir / "bench" / "report.json", fix, missing_ok=True)
    if report is None:
        return None
    export = read_export_record(run_dir, advice=fix)
    chosen = recommended_int8(export)
    for row in report.rows("rows", optional=True):
        if row.raw("engine") == chosen and row.raw("status") == "ok":
            top1 = row.number(("accuracy", target, "top1"), low=0, high=100, optional=True)
            return None if top1 is None else top1 / 100
    return None


def tables(runs: list[RunResult]) -> dict[str, Any]:
    """{dataset: {"targets": [...], "methods": {method: {selection: {target|avg: [mean, se, n]}}}}}."""
    out: dict[str, Any] = {}
    by_dataset: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_dataset[run.dataset].append(run)
    for dataset, group in by_dataset.items():
        targets = sorted({r.target for r in group})
        methods: dict[str, Any] = {}
        labels = sorted({r.label for r in group}, key=lambda lab: min(
            (r.method, r.order) for r in group if r.label == lab))
        for label in labels:
            cells: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in SELECTIONS}
            for target in targets:
                for seed in sorted({r.seed for r in group}):
                    trial = [r for r in group if r.label == label and r.target == target
                             and r.seed == seed]
                    if not trial:
                        continue
                    # Ties go to the grid point first in the sweep file's order.
                    chosen = max(trial, key=lambda r: (r.val_mean, -r.order))
                    cells["training"][target].append(chosen.target_acc)
                    cells["source_val"][target].append(chosen.val_mean)
                    if all(r.oracle_out is not None for r in trial):
                        oracle = max(trial, key=lambda r: (r.oracle_out, -r.order))
                        cells["oracle"][target].append(oracle.oracle_in)
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
            methods[label] = table
        out[dataset] = {"targets": targets, "methods": methods}
    return out


def collect(folder: Path) -> dict[str, Any]:
    """Read every run of the sweep in `folder`, write results.{json,md,csv,png}; return the JSON."""
    folder = Path(folder)
    sweep, runs, missing, damaged = read_runs(folder)
    if not runs and damaged:
        name, why = next(iter(damaged.items()))
        raise DamagedFile(f"no usable run of sweep {sweep.hash} in {folder}: {len(damaged)} left "
                          f"out as damaged, the first {name}: {why}")
    if not runs:
        raise UserError(f"no finished run of sweep {sweep.hash} in {folder} ({len(missing)} "
                        "expected); run `rise-edge sweep` first")
    data = {"sweep_hash": sweep.hash, "folder": str(folder), "runs": [r.__dict__ for r in runs],
            "missing": missing, "damaged": damaged, "selections": SELECTIONS,
            "tables": tables(runs)}
    write_json_atomic(folder / "results.json", data)
    write_text_atomic(folder / "results.md", to_markdown(data))
    write_text_atomic(folder / "results.csv", to_csv(data))
    _plot(data, folder / "results.png")
    _track(folder, sweep)
    return data


def _track(folder: Path, sweep: Any) -> None:
    """The collected table to the trackers the sweep's runs' recipes name (docs/tracking.md)."""
    from rise_edge.config import load_recipe
    from rise_edge.track import log_sweep_files

    runs = [(Path(spec.run_dir), load_recipe(spec.recipe, spec.overrides).log)
            for spec in expand(sweep)]
    log_sweep_files(folder, runs, [folder / "results.md", folder / "results.json"])


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
    damaged = data.get("damaged") or {}
    if damaged:  # said before the tables, so that no one reads them without knowing
        lines += [f"**{len(damaged)} run(s) left out: a record of theirs is damaged** (their "
                  "seeds are missing from the cells below):", ""]
        lines += [f"- {name}: {why}" for name, why in damaged.items()] + [""]
    for dataset, table in data["tables"].items():
        targets = table["targets"]
        lines += [f"## {dataset}", "", "| method | model selection | " + " | ".join(targets)
                  + " | Avg |", "|---|---|" + "---|" * (len(targets) + 1)]
        for method, rows in table["methods"].items():
            for selection, row in rows.items():
                lines.append(f"| {display(method)} | {SELECTIONS[selection]} | "
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
                   label=display(method), capsize=3)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(targets))], targets)
        ax.set_ylabel("top-1 % on the held-out domain")
        ax.set_title(f"{dataset}: training-domain validation")
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a failed save (a full disk) leaves no temporary behind
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
