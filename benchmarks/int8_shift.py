"""Does INT8's drop on shifted source images predict its drop on the unseen domain better than its
drop on clean source images?

    RISE_EDGE_DATA=<data root> OMP_NUM_THREADS=2 python benchmarks/int8_shift.py \
        --group pacs_lite0=runs/sweeps/pacs_erm_lite0 --group demo_rise=runs/sweeps/demo_rise

Every run of every group must already be exported (export.json with onnx-fp32 and INT8
artefacts, e.g. `rise-edge export RUN --format onnx --format openvino --int8 --qat`). For every
INT8 artefact of a run that is there (ONNX Runtime post-training INT8, QAT's CPU form and its
explicit Q/DQ form for TensorRT, run here by ONNX Runtime, and OpenVINO's), against the run's FP32
ONNX, on:
  clean   the judge's images: the source validation images export judged the artefact on;
  stress  the same images under each of rise_edge.export.stress's shifts (every image under every
          shift here, four times the clean set, so that each shift is measured on its own);
  unseen  every image of the held-out domain (reported only: export never saw it).
the top-1 drop (FP32 minus INT8, points) and the disagreement (% of images whose class changes),
and what they are made of (flips to wrong and to right, INT8's logit noise-to-signal ratio, FP32's
top-1 margin), so that the record can say why an unseen drop was not seen on the sources.
Across all (run, artefact) cases: how well each clean and stress figure predicts the unseen drop
(Pearson and Spearman correlation, mean absolute error as a direct estimate), and whether the INT8
model export ships keeps the unseen drop within 1 point. Writes benchmarks/results/int8_shift.{md,json}
(--name): --carry an earlier record to add groups to it without re-measuring those it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
INT8 = ("onnx-int8", "onnx-int8-qat-cpu", "onnx-int8-qat", "openvino-int8")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def logits(runner: Any, images: Any, batch: int = 64) -> np.ndarray:
    """(N, classes) float32 logits of N inputs: an (N, 3, H, W) array, or N paths for a runner that
    decodes them."""
    return np.concatenate([np.asarray(runner(images[i:i + batch]), dtype=np.float32)
                           for i in range(0, len(images), batch)])


def _figures(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Drop and disagreement, and what they are made of: fp32/int8 are (N, classes) logits.

    The drop is flips to wrong minus flips to right (over all images). Whether more images flip
    under shift because INT8's error grows there or because FP32 is less sure there is told apart by
    the logit noise-to-signal ratio (|int8 - fp32| / |fp32 - its mean over classes|, median over
    images) and FP32's top-1 margin (top logit minus the second, median)."""
    p32, p8 = fp32.argmax(1), int8.argmax(1)
    right32, right8 = p32 == labels, p8 == labels
    centred = fp32 - fp32.mean(axis=1, keepdims=True)
    nsr = np.linalg.norm(int8 - fp32, axis=1) / np.maximum(np.linalg.norm(centred, axis=1), 1e-12)
    top2 = np.sort(fp32, axis=1)[:, -2:]
    return {"drop_points": round(100 * (float(np.mean(right32)) - float(np.mean(right8))), 3),
            "disagreement_pct": round(100 * float(np.mean(p32 != p8)), 3),
            "flips_to_wrong_pct": round(100 * float(np.mean(right32 & ~right8)), 3),
            "flips_to_right_pct": round(100 * float(np.mean(~right32 & right8)), 3),
            "logit_nsr_median": round(float(np.median(nsr)), 4),
            "fp32_margin_median": round(float(np.median(top2[:, 1] - top2[:, 0])), 3),
            "images": int(labels.size)}


def measure_run(run_dir: Path, data_root: str | None) -> dict[str, Any]:
    from rise_edge.backend_table import runner_for
    from rise_edge.data.domains import load_rgb
    from rise_edge.data.transforms import eval_transform
    from rise_edge.export.calibration import load_images, select_fidelity_samples
    from rise_edge.export.stress import SHIFTS
    from rise_edge.run_dir import open_run, run_splits
    from rise_edge.site.assess import decoder

    run = open_run(run_dir)
    splits = run_splits(run, data_root)
    export = json.loads((run_dir / "export" / "export.json").read_text())
    cfg, arts = export["export_config"], export["artefacts"]
    pre = run.meta.preprocessing
    judge = select_fidelity_samples(splits, cfg["fidelity_images"], cfg["calibration_seed"])
    clean_samples = [s for d in splits.source_domains for s in judge[d]]
    labels = {"clean": np.array([y for _, y in clean_samples]),
              "unseen": np.array([y for _, y in splits.test])}
    images = {"clean": load_images([p for p, _ in clean_samples], pre)}
    decode = decoder(pre)
    transform = eval_transform(pre)
    for name, shift in SHIFTS:
        images[f"stress/{name}"] = np.stack([transform(shift(load_rgb(p))).numpy()
                                             for p, _ in clean_samples])
        labels[f"stress/{name}"] = labels["clean"]
    target_paths = [p for p, _ in splits.test]

    def run_all(runner: Any) -> dict[str, np.ndarray]:
        found = {k: logits(runner, v) for k, v in images.items()}
        found["unseen"] = logits(lambda paths: runner(decode(paths)), target_paths)
        return found

    fp32 = run_all(runner_for(arts["onnx-fp32"], run_dir / "export"))
    found: dict[str, Any] = {"run": str(run_dir), "target": splits.target_domain,
                             "seed": run.recipe.train.seed, "model": run.meta.model,
                             "fp32_unseen_top1": round(100 * float(np.mean(fp32["unseen"].argmax(1)
                                                                           == labels["unseen"])), 2),
                             "judge_images": len(clean_samples), "artefacts": {}}
    recommended = export_recommendation(export)
    for name in INT8:
        if arts.get(name, {}).get("status") != "ok":
            continue
        started = time.perf_counter()
        int8 = run_all(runner_for(arts[name], run_dir / "export"))
        sets = {k: _figures(fp32[k], int8[k], labels[k]) for k in fp32}
        stress = [sets[k] for k in sets if k.startswith("stress/")]
        sets["stress"] = {**{k: round(statistics.fmean(s[k] for s in stress), 4)
                             for k in stress[0] if k != "images"},
                          "images": sum(s["images"] for s in stress)}
        found["artefacts"][name] = {"sets": sets, "shipped": name == recommended,
                                    "seconds": round(time.perf_counter() - started, 1)}
        log(f"{run_dir} {name}: clean {sets['clean']['drop_points']:+.2f}, stress "
            f"{sets['stress']['drop_points']:+.2f}, unseen {sets['unseen']['drop_points']:+.2f}")
    return found


def export_recommendation(export: dict[str, Any]) -> str | None:
    """The INT8 artefact export.json recommends overall (rise_edge.export.recommend)."""
    from rise_edge.export.recommend import recommended_int8

    return recommended_int8(export, "int8")


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # ties share their mean rank
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 3)


def predictiveness(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each clean/stress figure against the unseen drop, over the cases."""
    unseen = np.array([c["sets"]["unseen"]["drop_points"] for c in cases])
    keys = ["clean", "stress", *sorted({k for c in cases for k in c["sets"] if k.startswith("stress/")})]
    rows = []
    for key in keys:
        for figure in ("drop_points", "disagreement_pct"):
            x = np.array([c["sets"][key][figure] for c in cases])
            row = {"predictor": f"{key} {figure.replace('_pct', ' %').replace('_points', '')}",
                   "pearson": _corr(x, unseen), "spearman": _corr(_rank(x), _rank(unseen))}
            if figure == "drop_points":
                row["mae_as_estimate"] = round(float(np.mean(np.abs(x - unseen))), 2)
                flagged, bad = x > 1.0, unseen > 1.0
                row["unseen_over_1_caught"] = f"{int((flagged & bad).sum())} of {int(bad.sum())}"
                row["false_alarms"] = int((flagged & ~bad).sum())
            rows.append(row)
    return rows


ANATOMY = (("disagreement_pct", "disagreement %"), ("flips_to_wrong_pct", "flips to wrong %"),
           ("flips_to_right_pct", "flips to right %"), ("logit_nsr_median", "logit noise/signal"),
           ("fp32_margin_median", "FP32 top-1 margin"))


def anatomy(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Why the unseen figures differ from the clean ones: each set's figures, median over cases."""
    return [{"set": key, **{figure: round(statistics.median(c["sets"][key][figure] for c in cases), 4)
                            for figure, _ in ANATOMY}}
            for key in ("clean", "stress", "unseen")]


def preamble(record: dict[str, Any]) -> list[str]:
    """The record's title, command, machine, where carried groups came from, notes, definitions."""
    from common import header

    lines = [*header("INT8 and shift: do shifted source images predict the unseen domain's drop?",
                     record, ("python", "torch", "onnxruntime", "openvino", "rise_edge")),
             f"Wall time: {record['seconds'] / 60:.1f} min.", ""]
    for c in record.get("carried", []):
        lines += [f"Carried unchanged from an earlier record: {', '.join(c['groups'])}, measured by "
                  f"`{c['command']}` on {c['machine'].get('cpu')}, {c['machine'].get('logical_cores')} "
                  f"logical cores ({c['seconds'] / 60:.1f} min; "
                  + ", ".join(f"{k} {c['versions'][k]}" for k in ("onnxruntime", "openvino")
                              if k in c["versions"]) + ").", ""]
    lines += [f"Note: {n}" for n in record.get("notes", [])] + ([""] if record.get("notes") else [])
    return lines + ["Drop = FP32 top-1 minus INT8 top-1 (points, positive: INT8 worse); disagreement "
                    "= % of images whose class INT8 changes. Clean: the judge's source validation "
                    "images; stress: the same images under each shift (every image under every "
                    "shift); unseen: every image of the held-out domain, reported only.", ""]


def to_markdown(record: dict[str, Any]) -> str:
    lines = preamble(record)
    for group, rows in record["predictiveness"].items():
        lines += [f"## How well each figure predicts the unseen drop: {group}", "",
                  f"{record['cases'][group]} cases (run x INT8 artefact).", "",
                  "| predictor | Pearson r | Spearman rho | MAE as an estimate (points) | unseen "
                  "drops > 1 caught (figure > 1) | false alarms |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['predictor']} | {r['pearson'] if r['pearson'] is not None else '-'} | "
                         f"{r['spearman'] if r['spearman'] is not None else '-'} | "
                         f"{r.get('mae_as_estimate', '-')} | {r.get('unseen_over_1_caught', '-')} | "
                         f"{r.get('false_alarms', '-')} |")
        lines.append("")
    for group, rows in record["anatomy"].items():
        lines += [f"## What the drops are made of: {group}", "",
                  "Median over the cases. The drop is flips to wrong minus flips to right; the logit "
                  "noise/signal ratio is |INT8 - FP32| over |FP32 - its class mean| per image "
                  "(median), i.e. how large INT8's error is; FP32's top-1 margin (top logit minus the "
                  "second, median) is how little of it flips a class.", "",
                  "| set | " + " | ".join(label for _, label in ANATOMY) + " |",
                  "|---|" + "---|" * len(ANATOMY)]
        for r in rows:
            lines.append(f"| {r['set']} | " + " | ".join(f"{r[f]:.3g}" for f, _ in ANATOMY) + " |")
        lines.append("")
    for group, runs in record["groups"].items():
        lines += [f"## {group}", "", "| target | seed | artefact | shipped | clean drop | stress drop | "
                  "unseen drop | clean disagr. % | stress disagr. % | unseen disagr. % | unseen flips "
                  "to wrong / right % | logit noise/signal clean / unseen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            for name, a in r["artefacts"].items():
                s = a["sets"]
                lines.append(f"| {r['target']} | {r['seed']} | {name} | {'yes' if a['shipped'] else ''} | "
                             f"{s['clean']['drop_points']:+.2f} | {s['stress']['drop_points']:+.2f} | "
                             f"{s['unseen']['drop_points']:+.2f} | {s['clean']['disagreement_pct']:.1f} | "
                             f"{s['stress']['disagreement_pct']:.1f} | {s['unseen']['disagreement_pct']:.1f} | "
                             f"{s['unseen']['flips_to_wrong_pct']:.1f} / {s['unseen']['flips_to_right_pct']:.1f} | "
                             f"{s['clean']['logit_nsr_median']:.3f} / {s['unseen']['logit_nsr_median']:.3f} |")
        shipped = [(r["target"], a["sets"]["unseen"]["drop_points"]) for r in runs
                   for a in r["artefacts"].values() if a["shipped"]]
        over = [f"{t} ({d:+.2f})" for t, d in shipped if d > 1.0]
        lines += ["", f"The INT8 model export ships (its recommendation): unseen drop within 1.0 point "
                  f"in {len(shipped) - len(over)} of {len(shipped)} runs"
                  + (f"; over it: {', '.join(over)}." if over else "."), ""]
    return "\n".join(lines) + "\n"


def carried(path: Path | None, measured: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The groups of an earlier record of this script, carried unchanged into this one (their runs
    need not be on disk any more), and where each came from: the command, machine, versions and wall
    time that measured it (the earlier record's own carried groups keep theirs)."""
    if path is None:
        return {}, []
    try:
        earlier = json.loads(path.read_text())
        groups = earlier["groups"]
        origin = {k: earlier[k] for k in ("command", "machine", "versions", "seconds")}
        sources = list(earlier.get("carried", []))
        own = [g for g in groups if not any(g in c["groups"] for c in sources)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"--carry {path}: not an int8_shift record ({e}); give the .json this script wrote")
    if own:
        sources.append({**origin, "groups": own})
    clash = sorted(set(groups) & set(measured))
    if clash:
        sys.exit(f"--carry {path}: group(s) {', '.join(clash)} are also measured here; name the new "
                 "ones differently or measure them without --carry")
    return groups, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=SWEEP_DIR")
    parser.add_argument("--data-root", default=os.environ.get("RISE_EDGE_DATA"))
    parser.add_argument("--name", default="int8_shift")
    parser.add_argument("--carry", type=Path, metavar="RECORD.json",
                        help="an earlier record of this script whose groups join this one unchanged "
                             "(the tables across all groups are recomputed)")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence the record must carry about what it measured (repeatable)")
    args = parser.parse_args()
    from common import measure_groups, record_of, write

    started = time.perf_counter()
    earlier, sources = carried(args.carry, [g.partition("=")[0] for g in args.group])
    groups = {**earlier, **measure_groups(args.group, lambda run, _: measure_run(run, args.data_root),
                                          temporary=False)}
    cases = {g: [a for r in runs for a in r["artefacts"].values()] for g, runs in groups.items()}
    everything = [a for c in cases.values() for a in c]
    argv = [a for g in args.group for a in ("--group", g)]
    argv += ["--carry", str(args.carry)] if args.carry else []
    record = {**record_of("int8_shift.py", argv + [a for n in args.note for a in ("--note", n)],
                          started, groups),
              "carried": sources, "notes": args.note,
              "cases": {**{g: len(c) for g, c in cases.items()}, "all": len(everything)},
              "predictiveness": {**{g: predictiveness(c) for g, c in cases.items()},
                                 "all": predictiveness(everything)},
              "anatomy": {**{g: anatomy(c) for g, c in cases.items()}, "all": anatomy(everything)}}
    write(args.name, record, to_markdown(record))


if __name__ == "__main__":
    main()
