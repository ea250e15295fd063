"""ONNX Runtime vs OpenVINO on this CPU, on one trained PACS run: the FP32 and INT8 artefact of each,
top-1 on every domain, and latency at batch 1 and 32 measured in one process with the four engines
taking turns (so a busy neighbour on a shared machine slows all of them alike).

    RISE_EDGE_DATA=/path/to/data python benchmarks/ort_vs_openvino.py --run runs/pacs_erm_lite0-sketch

Both INT8 artefacts come from one `rise-edge export --format onnx --format openvino --int8`: the same
source-only, domain-balanced calibration images, the same accuracy budget, judged on the same source
images. Source domains score their validation split; the unseen target scores all its images.
Writes benchmarks/results/ort_vs_openvino.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from export_pacs import accuracy, latency

from rise_edge.backend_table import runner_for
from rise_edge.bench.scoring import int8_judge
from rise_edge.bench.resources import machine_info
from rise_edge.export.calibration import load_images
from rise_edge.export.driver import export_run, resolve_export_config
from rise_edge.run_dir import EXPORT_DIR, open_run, run_splits, software_versions

RESULTS = Path(__file__).parent / "results"
ENGINES = {"onnx-fp32": "ONNX Runtime FP32", "onnx-int8": "ONNX Runtime INT8",
           "openvino-fp32": "OpenVINO FP32", "openvino-int8": "OpenVINO INT8 (NNCF)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "ort_vs_openvino.md")
    args = parser.parse_args()

    run = open_run(args.run)
    cfg = resolve_export_config(run, formats=["onnx", "openvino"], int8=True, qat="off")
    started = time.perf_counter()
    exported = export_run(args.run, cfg, progress=True)
    export_s = time.perf_counter() - started
    records = exported.artefacts
    bad = [n for n in ENGINES if records[n]["status"] != "ok"]
    if bad:
        sys.exit(f"not exported: {bad}: {[records[n].get('reason') for n in bad]}")
    folder = args.run / EXPORT_DIR
    runners = {name: runner_for(records[name], folder, device="cpu") for name in ENGINES}

    splits, pre = run_splits(run), run.meta.preprocessing
    domains = {d: splits.val[d] for d in splits.source_domains}
    domains[splits.target_domain] = splits.test
    top1 = {}
    for domain, samples in domains.items():
        print(f"accuracy on {domain} ({len(samples)} images)", file=sys.stderr, flush=True)
        top1[domain] = accuracy(runners, samples, pre)
    probe = load_images([p for p, _ in splits.test[:32]], pre)
    timing = {"1": latency(runners, probe[:1], args.rounds, args.iterations),
              "32": latency(runners, probe, args.rounds, max(2, args.iterations // 4))}
    result = {
        "command": shlex.join(["python", "benchmarks/ort_vs_openvino.py", *sys.argv[1:]]),
        "run": args.run.as_posix(), "model": run.meta.model, "target_domain": splits.target_domain,
        "source_domains": list(splits.source_domains),
        "images": {d: len(s) for d, s in domains.items()},
        "export_seconds": round(export_s, 1),
        "artefacts": {n: {"bytes": records[n]["bytes"], "tool": records[n].get("tool"),
                          **({"judge": int8_judge(records[n])} if n.endswith("int8") else {}),
                          "kept_fp32_layers": (records[n].get("accuracy_budget") or {})
                          .get("kept_fp32_layers")} for n in ENGINES},
        "budget_points": cfg.accuracy_budget,
        "judge_images_per_domain": json.loads(exported.path.read_text()).get("int8_images", {})
        .get("judge", {}).get("per_domain"),
        "top1": top1, "latency": timing, "machine": machine_info(), "versions": software_versions()}
    import onnxruntime
    import openvino
    result["versions"].update(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(r: dict) -> str:
    machine, versions = r["machine"], r["versions"]
    domains = [*r["source_domains"], r["target_domain"]]
    lines = [f"# ONNX Runtime vs OpenVINO on {r['model']} ({r['run']})", "",
             f"Command: `{r['command']}`  ",
             f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, no GPU.  ",
             "Versions: " + ", ".join(f"{k} {versions[k]}" for k in (
                 "python", "torch", "onnxruntime", "openvino", "rise_edge") if k in versions) + ".  ",
             f"Both INT8 artefacts: the same calibration images, and one judge (rise_edge.export.judge) "
             f"with a {r['budget_points']:g}-point budget on the same source validation images "
             f"against FP32; export took {r['export_seconds']:.0f} s. Latency: median per call, the four "
             "engines interleaved round by round in one process. Top-1: source domains' validation "
             f"splits, all images of the unseen {r['target_domain']}.", "",
             "| engine | " + " | ".join(f"{d}{' (unseen)' if d == r['target_domain'] else ''}"
                                       for d in domains)
             + " | judge: drop (95 % upper bound), verdict | b1 ms | b32 ms | b32 img/s | size MB |",
             "|---|" + "---|" * (len(domains) + 5)]
    for name, label in ENGINES.items():
        a = r["artefacts"][name]
        judge = a.get("judge")
        if judge is None:  # an FP32 engine
            verdict = "-"
        elif not judge["judged"]:
            verdict = "not judged"
        else:
            verdict = (f"{judge['drop_points']:.2f} ({judge['drop_upper95']:.2f}), "
                       + ("met" if judge["met"] else "missed"))
        b1, b32 = r["latency"]["1"][name], r["latency"]["32"][name]
        lines.append(f"| {label} | " + " | ".join(f"{r['top1'][d][name]:.2f}" for d in domains)
                     + f" | {verdict}"
                     + f" | {b1['median_ms']:.2f} | {b32['median_ms']:.1f} | "
                     f"{32e3 / b32['median_ms']:.0f} | {a['bytes'] / 1e6:.1f} |")
    lines += ["", "Images per domain: " + ", ".join(f"{d} {n}" for d, n in r["images"].items()) + "."]
    rule = next((a["judge"].get("rule") for a in r["artefacts"].values() if a.get("judge", {}).get("rule")),
                None)
    if r.get("judge_images_per_domain"):
        lines += ["", "Judge images per source domain (validation images; neither calibration nor "
                  "any choice but the judge's saw them): " + ", ".join(
                      f"{d} {n}" for d, n in r["judge_images_per_domain"].items()) + "."]
    if rule:
        lines += ["", f"Judge's rule: {rule}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
