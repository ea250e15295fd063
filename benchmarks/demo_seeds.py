"""Does RISE beat ERM, and plain KD, in the demo world? The students over several seeds, paired by seed.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--methods erm kd rise] [--recipe recipes/demo.yaml]
                                    [--runs runs/demo-seeds] [--out benchmarks/results/demo_seeds.md]

For each seed, the demo recipe is trained once per method with `train.seed=<seed>` (initialisation,
data order and augmentation) and `loss.method=<method>`: ERM (cross-entropy only, as `rise-edge demo`
trains it), KD (Hinton's distillation from the same teacher's zero-shot logits, plain head) and RISE
(the recipe as written). The demo world and teacher come from the cache (built on first use)
and are the same for every seed. Finished runs in --runs are reused. Source styles score their
validation split; the unseen style scores all its images. Selection uses source validation only.
Writes --out (.md) and the same name with .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["erm", "kd", "rise"],
                        choices=["erm", "kd", "rise"])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_seeds.md")
    args = parser.parse_args()

    from dataclasses import replace

    from rise_edge.bench.resources import machine_info
    from rise_edge.config import load_recipe, recipe_to_dict
    from rise_edge.data.domains import build_splits
    from rise_edge.demo.story import train_or_reuse
    from rise_edge.run_dir import software_versions
    from rise_edge.train.teacher import built_teacher

    base = load_recipe(args.recipe)
    splits = build_splits(base.data, progress=True)
    teacher_dir = built_teacher(base.teacher.model)()
    zero_shot = json.loads((teacher_dir / "zero_shot.json").read_text())["accuracy"]["rise"]
    target = splits.target_domain
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        recipe = load_recipe(args.recipe, (f"train.seed={seed}",))
        row: dict[str, Any] = {"seed": seed}
        for method in args.methods:
            method_recipe = replace(recipe, loss=replace(recipe.loss, method=method))
            print(f"seed {seed}: {method.upper()}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = train_or_reuse(method_recipe, args.runs / f"seed{seed}" / method, progress=True)
            row[method] = {"accuracy": result["accuracy"], "selected_step": result["selected_step"],
                           "train_wall_s": result["stats"]["wall_time_s"],
                           "reused": time.perf_counter() - started < 0.5 * result["stats"]["wall_time_s"]}
        rows.append(row)

    def summary(method: str, key: str) -> dict[str, float]:
        values = [100 * r[method]["accuracy"][key] for r in rows]
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    target_key = f"target/{target}"
    baseline = args.methods[0]
    gains = {m: [100 * (r[m]["accuracy"][target_key] - r[baseline]["accuracy"][target_key])
                 for r in rows] for m in args.methods[1:]}
    result = {
        "command": shlex.join(["python", "benchmarks/demo_seeds.py", *sys.argv[1:]]),
        "recipe": recipe_to_dict(base), "recipe_file": args.recipe.name,
        "source_domains": list(splits.source_domains), "target_domain": target,
        "teacher": {"folder": teacher_dir.name, "zero_shot_rise_templates": zero_shot},
        "methods": args.methods, "seeds": rows,
        "summary": {m: {"target": summary(m, target_key), "val_mean": summary(m, "val_mean")}
                    for m in args.methods},
        "baseline": baseline,
        "minus_baseline_target_points": gains,
        "better_than_baseline_on_target": {m: sum(g > 0 for g in v) for m, v in gains.items()},
        "machine": machine_info(), "versions": software_versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict[str, Any]) -> str:
    sources, target = result["source_domains"], result["target_domain"]
    machine, versions = result["machine"], result["versions"]
    methods = result["methods"]
    lines = [f"# Demo world: {' vs '.join(m.upper() for m in methods)} over {len(result['seeds'])} "
             "seeds", "",
             f"Command: `{result['command']}`  ",
             f"Recipe: recipes/{result['recipe_file']} (student {result['recipe']['student']['model']} "
             f"from random weights at {result['recipe']['student']['image_size']} px, "
             f"{result['recipe']['train']['epochs']} epochs), each method with `loss.method=<method>`: "
             "ERM cross-entropy only; KD cross-entropy + distillation from the teacher's zero-shot "
             "logits (plain head); RISE KD + language-guided distances, text-initialised head. "
             "Trained on " + ", ".join(sources) + f"; unseen: {target}.  ",
             f"Teacher: {result['teacher']['folder']} (the same for every seed), zero-shot "
             + ", ".join(f"{k} {100 * v:.1f} %" for k, v in result["teacher"]["zero_shot_rise_templates"].items())
             + ".  ",
             f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
             + (f"GPU {machine['gpu']['name']}" if machine.get("gpu") else "no GPU") + ".  ",
             "Versions: " + ", ".join(f"{k} {versions[k]}" for k in (
                 "python", "torch", "timm", "open_clip", "rise_edge") if k in versions) + ".", "",
             "Accuracy (%) of the selected checkpoint (best mean source validation). Source styles: "
             "validation split (84 images each); unseen style: all its images. Train wall time is "
             "that of the run's own training (a reused run keeps its original time).", "",
             "| seed | method | " + " | ".join(f"{d} (val)" for d in sources)
             + f" | source mean | **{target} (unseen)** | train wall s |",
             "|---|---|" + "---|" * (len(sources) + 3)]
    for row in result["seeds"]:
        for method in methods:
            acc = row[method]["accuracy"]
            lines.append(f"| {row['seed']} | {method.upper()} | "
                         + " | ".join(f"{100 * acc[f'val/{d}']:.1f}" for d in sources)
                         + f" | {100 * acc['val_mean']:.1f} | **{100 * acc[f'target/{target}']:.1f}** | "
                         f"{row[method]['train_wall_s']:.0f} |")
    summary = result["summary"]
    lines += ["", "| method | source mean (mean ± sd) | unseen target (mean ± sd) |", "|---|---|---|"]
    for method in methods:
        s = summary[method]
        lines.append(f"| {method.upper()} | {s['val_mean']['mean']:.1f} ± {s['val_mean']['std']:.1f} | "
                     f"{s['target']['mean']:.1f} ± {s['target']['std']:.1f} |")
    base = result["baseline"].upper()
    lines.append("")
    for method, gains in result["minus_baseline_target_points"].items():
        lines.append(f"{method.upper()} minus {base} on the unseen style, per seed: "
                     + ", ".join(f"{g:+.1f}" for g in gains) + f" points; {method.upper()} better on "
                     f"{result['better_than_baseline_on_target'][method]} of {len(gains)} seeds.  ")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
