"""What the benchmark scripts share: the run folders they walk, the export they make where it is
missing, the anonymous site folder, and each record's header and writers (JSON + Markdown in
benchmarks/results/). The scripts run as `python benchmarks/NAME.py`, so this folder is on their
import path and they import it as `common`."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ONNX_FP32_INT8 = ("onnx-fp32", "onnx-int8")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_dirs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("student.safetensors")
                  if not (p.parent / "adapt.json").exists())


def ensure_export(run_dir: Path, data_root: str | None,
                  artefacts: tuple[str, ...] = ONNX_FP32_INT8) -> float:
    """Export FP32 and INT8 ONNX where export.json lacks `artefacts`; seconds spent."""
    from rise_edge.export.driver import export_run, resolve_export_config
    from rise_edge.run_dir import open_run

    path = run_dir / "export" / "export.json"
    if path.is_file():
        arts = json.loads(path.read_text()).get("artefacts", {})
        if all(arts.get(a, {}).get("status") == "ok" for a in artefacts):
            return 0.0
    started = time.perf_counter()
    cfg = resolve_export_config(open_run(run_dir), formats=["onnx"], int8=True, qat="off")
    export_run(run_dir, cfg, progress=False, data_root=data_root)
    return time.perf_counter() - started


def anonymous_site(samples: list[tuple[str, int]], folder: Path) -> dict[str, int]:
    """Links with hashed names to the held-out images; returns link path -> label (kept here)."""
    folder.mkdir(parents=True)
    labels = {}
    for path, label in samples:
        name = hashlib.sha256(path.encode()).hexdigest()[:16] + Path(path).suffix.lower()
        os.symlink(os.path.abspath(path), folder / name)
        labels[str(folder.resolve() / name)] = label  # the link's own path, as the listing gives it
    return labels


def measure_groups(items: list[str], measure: Any, temporary: bool = True
                   ) -> dict[str, list[dict[str, Any]]]:
    """`measure(run_dir, work)` for every run of every NAME=SWEEP_DIR group (a fresh temporary work
    folder per run when `temporary`, else None)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        name, _, folder = item.partition("=")
        runs = run_dirs(Path(folder))
        if not runs:
            raise SystemExit(f"--group {item}: no run directories under {folder}")
        for run in runs:
            if not temporary:
                groups.setdefault(name, []).append(measure(run, None))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                groups.setdefault(name, []).append(measure(run, Path(tmp)))
    return groups


def record_of(script: str, args: list[str], started: float, groups: dict[str, Any]) -> dict[str, Any]:
    """The record's common part: command, machine, versions, wall time and the groups."""
    from rise_edge.bench.resources import machine_info
    from rise_edge.run_dir import software_versions

    return {"command": f"python benchmarks/{script} " + shlex.join(args),
            "machine": machine_info(), "versions": software_versions(),
            "seconds": round(time.perf_counter() - started, 1), "groups": groups}


def header(title: str, record: dict[str, Any], packages: tuple[str, ...]) -> list[str]:
    """The Markdown record's title, command, machine and versions lines (the wall time follows)."""
    m, v = record["machine"], record["versions"]
    return [f"# {title}", "", f"Command: `{record['command']}`  ",
            f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, no GPU; "
            + ", ".join(f"{k} {v[k]}" for k in packages if k in v) + ".  "]


def write(name: str, record: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
