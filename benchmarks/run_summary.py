"""Summarise a finished training run as a benchmark record: command, machine, versions, wall time,
training images/s, peak host memory and per-domain accuracy of the selected student.

    python benchmarks/run_summary.py runs/pacs_erm_lite0-sketch --name erm_pacs_lite0 \
        --command "OMP_NUM_THREADS=1 rise-edge train recipes/pacs_erm_lite0.yaml --set ..."

Writes benchmarks/results/<name>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rise_edge.bench.resources import machine_info
from rise_edge.run_dir import read_jsonl

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    parser.add_argument("--note", default="", help="a sentence on the schedule or the machine")
    args = parser.parse_args()

    results = json.loads((args.run_dir / "results.json").read_text())
    student = json.loads((args.run_dir / "student.json").read_text())
    steps = [r for r in read_jsonl(args.run_dir / "metrics.jsonl") if "images_per_s" in r]
    rates = [r["images_per_s"] for r in steps]
    stats = results["stats"]
    recipe = student["recipe"]
    record = {
        "command": args.command, "machine": machine_info(), "versions": student["versions"],
        "student": {"model": student["model"], "pretrained": recipe["student"]["pretrained"],
                    "input_size": student["preprocessing"]["input_size"]},
        "schedule": {"steps": stats["steps"], "batch_size": recipe["train"]["batch_size"],
                     "optim": recipe["optim"], "train_images": {k: v for k, v in
                                                                results["images"].items()
                                                                if k.startswith("train/")}},
        "wall_time_s": stats["wall_time_s"],
        "train_images_per_s_median": statistics.median(rates) if rates else None,
        "peak_host_memory_mb": stats["peak_host_memory_mb"],
        "selected_step": results["selected_step"], "accuracy": results["accuracy"],
        "images": results["images"], "note": args.note,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    acc = results["accuracy"]
    target = results["target_domain"]
    machine = record["machine"]
    lines = [
        f"# {args.name}: {student['model']} ({recipe['student']['pretrained']}), "
        f"{', '.join(results['source_domains'])} -> {target}",
        "",
        f"Command: `{args.command}`",
        f"Machine: {machine.get('cpu', 'unknown')}, {machine.get('physical_cores', '?')} cores; "
        f"versions: " + ", ".join(f"{k} {v}" for k, v in student["versions"].items()) + ".",
        f"Schedule: {stats['steps']} steps of batch {recipe['train']['batch_size']} "
        f"({stats['steps'] * recipe['train']['batch_size']} images, "
        f"{stats['steps'] * recipe['train']['batch_size'] / sum(record['schedule']['train_images'].values()):.2f}"
        f" epochs of the source training split), {recipe['optim']['name']} lr {recipe['optim']['lr']}"
        f" {recipe['optim']['schedule']}, {student['preprocessing']['input_size']} px.",
        *( [args.note] if args.note else []),
        "",
        "| figure | value |",
        "|---|---|",
        f"| wall time (scan, training, evaluations) | {stats['wall_time_s'] / 60:.1f} min |",
        f"| training throughput (median over logged windows) | "
        f"{record['train_images_per_s_median']:.1f} images/s |",
        f"| peak host memory (main process) | {stats['peak_host_memory_mb'] / 1024:.2f} GiB |",
        "",
        "| domain | split | images | accuracy |",
        "|---|---|---|---|",
        *(f"| {d} | source (val) | {results['images'][f'val/{d}']} | {100 * acc[f'val/{d}']:.2f} % |"
          for d in results["source_domains"]),
        f"| mean of sources | selection | | {100 * acc['val_mean']:.2f} % |",
        f"| {target} | UNSEEN target (all images) | {results['images'][f'target/{target}']} | "
        f"{100 * acc[f'target/{target}']:.2f} % |",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
