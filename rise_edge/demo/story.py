"""`rise-edge demo`: the whole toolchain on the built-in demo world, in one command, on a CPU.

1. the demo world (shapes in four styles; generated once per machine into the cache)
2. the demo teacher (a small CLIP trained on more styles than the student sees; built once)
3. an ERM student and a RISE student, trained on three styles, tested on the fourth
4. export of the RISE student: ONNX FP32 and ONNX Runtime INT8 (calibrated on source styles only)
5. bench of every artefact on all four styles

and one table: per style, the teacher's zero-shot accuracy, ERM, RISE, and the INT8 RISE student with
its latency. Re-running reuses what is built: the world and teacher (cache) and any finished run
(output folder) whose recipe has not changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rise_edge.logs import logger
from rise_edge.config import Recipe, load_recipe, recipe_to_dict, shipped_recipes
from rise_edge.errors import UserError
from rise_edge.files import RUN_MARKER, check_destination

STEPS = 5


def _say(step: int, text: str) -> None:
    logger("demo").info(f"[{step}/{STEPS}] {text}")


def default_demo_recipe() -> Path:
    """The shipped demo recipe (inside the package, so any install has it)."""
    path = shipped_recipes().get("demo")
    if path is None:
        raise UserError("the shipped demo recipe is missing from this install; reinstall rise-edge "
                        "or pass one with --recipe")
    return path


def erm_recipe(recipe: Recipe) -> Recipe:
    """The same recipe as plain cross-entropy: no teacher, no distillation."""
    return replace(recipe, loss=replace(recipe.loss, method="erm"))


DEMO_MARK = ".rise-edge-demo"  # in every run folder the demo made: the only folders it ever deletes


def _clear_own_run(run_dir: Path) -> None:
    """Delete a demo run that is unfinished or of an older recipe, before training it again; a
    folder the demo did not make (no DEMO_MARK) is never deleted: a UserError says what to do."""
    if not run_dir.exists():
        return
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return
    if not run_dir.is_dir() or not (run_dir / DEMO_MARK).is_file():
        raise UserError(f"{run_dir} exists and was not made by this version of rise-edge demo (no "
                        f"{DEMO_MARK} in it), and the demo never deletes what it did not make; move it "
                        "aside or choose another --out")
    import shutil
    shutil.rmtree(run_dir)


def train_or_reuse(recipe: Recipe, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Train `recipe` into `run_dir` (a finished run of the same recipe is reused); its results.json."""
    from rise_edge.train.loop import finished_with, train_run

    if finished_with(run_dir, recipe):
        logger("demo").info(f"      reusing {run_dir}")
    else:
        _clear_own_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DEMO_MARK).write_text("made by rise-edge demo; it may delete and retrain this folder\n")
        (run_dir / RUN_MARKER).write_text("a rise-edge run directory (the demo's)\n")  # train's to fill
        train_run(recipe, recipe_name=run_dir.name, run_dir=run_dir, progress=progress)
    return json.loads((run_dir / "results.json").read_text())


@dataclass
class DemoResult:
    out_dir: Path
    table: str
    seconds: float
    data: dict[str, Any]


def run_demo(recipe_path: Path | None = None, out_dir: Path = Path("runs/demo"),
             overrides: tuple[str, ...] = (), *, progress: bool = True) -> DemoResult:
    """Run the five steps; return the summary table (also written to OUT/demo.md and demo.json)."""
    from rise_edge.data.domains import known_dataset
    from rise_edge.files import run_lock
    from rise_edge.train.teacher import BUILT_TEACHERS, built_teacher

    started = time.perf_counter()
    recipe = load_recipe(recipe_path or default_demo_recipe(), overrides)
    known = known_dataset(recipe.data.dataset)
    if known is None or known.build is None:
        raise UserError(f"the demo runs on a data set rise-edge generates (data.dataset=demo), not "
                        f"'{recipe.data.dataset}'")
    if built_teacher(recipe.teacher.model) is None:
        raise UserError(f"the demo's teacher is one rise-edge builds ({', '.join(BUILT_TEACHERS)}), "
                        f"not '{recipe.teacher.model}'")
    for place, what in _built_places(recipe):  # before anything is written, the lock included
        check_destination(out_dir, place, command="the demo", writes="the demo's runs", reads=what,
                          given="--out", allow=("holds",),
                          fix="choose an --out folder apart from it (the default is runs/demo)")
    # One demo per folder: a second one would delete the runs the first is training.
    with run_lock(out_dir, "demo", noun="demo folder", clean=False):
        return _story(recipe, out_dir, started, progress)


def _built_places(recipe: Recipe) -> list[tuple[Path, str]]:
    """Where the demo's world and teacher are kept (built there on first use, then only read): the
    demo's runs never go there."""
    from rise_edge.demo.teacher import teacher_folder
    from rise_edge.demo.world import default_world_spec, world_path
    from rise_edge.files import cache_root

    root = Path(recipe.data.root).expanduser() if recipe.data.root else cache_root()
    return [(world_path(root, default_world_spec()), "the demo world"),
            (teacher_folder(), "the demo teacher")]


def _story(recipe: Recipe, out_dir: Path, started: float, progress: bool) -> DemoResult:
    """The five steps and the summary, with the demo folder held."""
    from rise_edge.bench.driver import bench_run
    from rise_edge.data.domains import build_splits
    from rise_edge.export.driver import export_run
    from rise_edge.train.teacher import built_teacher

    _say(1, "demo world: shapes drawn in four styles")
    # Builds the world on first use; its images are decoded and checked by each training run.
    splits = build_splits(recipe.data, check_images=False, progress=progress)
    logger("demo").info(f"      {len(splits.classes)} classes x {len(splits.source_domains) + 1} "
                        f"styles in {splits.dataset_dir}; trained on "
                        f"{', '.join(splits.source_domains)}, unseen: {splits.target_domain}")
    _say(2, "demo teacher: a small CLIP that has seen more styles than the student")
    teacher_dir = built_teacher(recipe.teacher.model)()
    zero_shot = json.loads((teacher_dir / "zero_shot.json").read_text())["accuracy"]["rise"]

    _say(3, "ERM student (cross-entropy only)")
    erm = train_or_reuse(erm_recipe(recipe), out_dir / "erm", progress)
    _say(3, "RISE student (distilled from the teacher, guided by its text embeddings)")
    rise_dir = out_dir / "rise"
    rise = train_or_reuse(recipe, rise_dir, progress)

    _say(4, "export the RISE student: ONNX FP32 + ONNX Runtime INT8 (QAT if post-training INT8 "
            "misses the budget)")
    export_cfg = replace(recipe.export, formats=("onnx",), int8=True)
    exported = export_run(rise_dir, export_cfg, progress=progress)
    _say(5, "bench every artefact on every style")
    bench_cfg = replace(recipe.bench, domains=("all",), batch_sizes=(1,))
    report = bench_run(rise_dir, bench_cfg, progress=progress)

    chosen, int8_verdict = _int8_shown(exported)
    int8 = next((r for r in report.rows if r["engine"] == chosen and r["status"] == "ok"), None)
    domains = [*splits.source_domains, splits.target_domain]
    table = _table(domains, splits.target_domain, zero_shot, erm, rise, int8, report.rows)
    if chosen:
        table += f"\n\nINT8 shown ({chosen}): {int8_verdict or 'no verdict recorded'}"
    seconds = time.perf_counter() - started
    data = {"recipe": recipe_to_dict(recipe), "zero_shot": zero_shot, "erm": erm["accuracy"],
            "rise": rise["accuracy"], "int8": int8 and int8["accuracy"], "int8_artefact": chosen,
            "int8_verdict": int8_verdict,
            "export": {k: v["status"] for k, v in exported.artefacts.items()},
            "bench_report": str(report.path), "seconds": seconds}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.md").write_text(table + "\n")
    (out_dir / "demo.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return DemoResult(out_dir, table, seconds, data)


def _int8_shown(exported: Any) -> tuple[str | None, str]:
    """The INT8 artefact the demo's table shows and export's verdict on it: the one export
    recommends for ONNX Runtime, else its post-training INT8 (kept and benchable, not recommended)."""
    recommended = exported.recommended
    chosen = recommended.get("onnxruntime")
    if chosen is None and exported.artefacts.get("onnx-int8", {}).get("status") == "ok":
        chosen = "onnx-int8"
    verdict = recommended.get("candidates", {}).get(chosen, {}).get("verdict", "") if chosen else ""
    return chosen, verdict


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def _table(domains: list[str], target: str, zero_shot: dict[str, float], erm: dict[str, Any],
           rise: dict[str, Any], int8: dict[str, Any] | None, bench_rows: list[dict[str, Any]]) -> str:
    """Markdown table, one line per style (source styles score their validation split), then the
    batch-1 latency of every artefact bench timed."""

    def student(result: dict[str, Any], domain: str) -> float:
        key = f"target/{domain}" if domain == target else f"val/{domain}"
        return result["accuracy"][key]

    def int8_acc(domain: str) -> float | None:
        return None if int8 is None else int8["accuracy"][domain]["top1"] / 100

    lines = ["| style | role | teacher zero-shot | ERM student | RISE student | RISE INT8 (ORT) |",
             "|---|---|---|---|---|---|"]
    for domain in domains:
        role = "UNSEEN target" if domain == target else "source (val)"
        lines.append(f"| {domain} | {role} | {_pct(zero_shot.get(domain))} | "
                     f"{_pct(student(erm, domain))} | {_pct(student(rise, domain))} | "
                     f"{_pct(int8_acc(domain))} |")
    lines.append("\nRISE student, batch 1 on this machine:")
    for row in bench_rows:
        b1 = next((e for e in row.get("latency") or [] if e.get("batch_size") == 1 and "p50_ms" in e),
                  None)
        if row["status"] == "ok" and b1:
            lines.append(f"- {row['engine']} ({row['precision'].upper()}): p50 {b1['p50_ms']:.2f} ms, "
                         f"p90 {b1['p90_ms']:.2f} ms ({b1['images_per_s']:.0f} images/s)")
    return "\n".join(lines)
