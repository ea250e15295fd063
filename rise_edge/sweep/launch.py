"""`rise-edge sweep`: the DomainBed protocol in one command. A sweep file expands into runs (every
target domain x seed x grid point) with stable names; launchers run them on a local pool or through
submitit (SLURM, or its local executor); finished runs are skipped and interrupted ones resume.

    # sweep.yaml
    base: pacs_erm_lite0          # a shipped recipe's name, or a recipe file (relative paths: from
                                  # the sweep file's folder, then the current one)
    targets: all                  # or [art_painting, sketch]
    seeds: [0, 1, 2]
    grid:                         # any recipe fields; every combination is a grid point
      loss.method: [erm, rise]
      optim.lr: [0.001, 0.005]
      weights:                    # a name (no dot) holds tied fields: each entry is one choice
        - {loss.w_kd: 0.9, loss.w_ce: 0.1}
        - {loss.w_kd: 0.8, loss.w_ce: 0.2}
    set:                          # fixed overrides for every run
      train.steps: 300
    compare: [optim.lr]           # grid fields collect reports side by side (rows) instead of
                                  # selecting over them; the method always is one
    export: {int8: true}          # optional stages per finished run: true or export fields
    bench: {max_images: 500}      # true or bench fields
    output_dir: runs/sweeps/pacs  # default: runs/sweeps/<file name>

Runs live in `<output_dir>/<target>/seed<seed>[/<grid point>]`; each holds `sweep.json` with the
sweep's hash, so a collected table (rise_edge.sweep.collect) traces back to the runs that made it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rise_edge.logs import configure_once, logger
from rise_edge.config import load_recipe, read_yaml_file, recipe_to_dict, resolve_recipe
from rise_edge.errors import UserError
from rise_edge.files import cache_key, write_json_atomic, write_text_atomic

SWEEP_RECORD = "sweep.json"          # in every run directory
SWEEP_COPY = "sweep.yaml"            # the sweep as it ran, in the output folder
BASE_COPY = "base-recipe.yaml"       # its base recipe, beside it
_KEYS = {"base", "targets", "seeds", "grid", "set", "compare", "export", "bench", "output_dir"}


@dataclass(frozen=True)
class Sweep:
    base: Path                          # the recipe file
    base_name: str                      # as written in the sweep file
    targets: tuple[str, ...]
    seeds: tuple[int, ...]
    grid: dict[str, tuple[Any, ...]]
    fixed: dict[str, Any]
    export: dict[str, Any] | None       # None: no export stage
    bench: dict[str, Any] | None
    output_dir: Path
    hash: str
    compare: tuple[str, ...] = ()       # grid fields that name table rows instead of being selected over


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: everything a worker needs, as plain data (it crosses process bounds)."""

    name: str
    run_dir: str
    recipe: str
    overrides: tuple[str, ...]
    target: str
    seed: int
    point: dict[str, Any]
    export: dict[str, Any] | None
    bench: dict[str, Any] | None
    sweep_hash: str
    threads: int = 0                    # CPU threads for this run (0: PyTorch's default)


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file; every run's recipe is built once here, so a bad grid value
    stops the sweep before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    raw = read_yaml_file(path, "a sweep file")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file is a mapping with keys {', '.join(sorted(_KEYS))}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], _KEYS, n=1)
        raise UserError(f"{path}: unknown key '{unknown[0]}'"
                        + (f"; did you mean '{close[0]}'?" if close else "")
                        + f"; keys: {', '.join(sorted(_KEYS))}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise UserError(f"{path}: 'base' must name the recipe every run starts from (a shipped "
                        "recipe's name or a file)")
    base_text = raw["base"]
    base = resolve_recipe(base_text if Path(base_text).is_absolute() or not (path.parent / base_text).is_file()
                          else path.parent / base_text)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds):
        raise UserError(f"{path}: 'seeds' must be a list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    grid = raw.get("grid") or {}
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict) or not all(isinstance(k, str) and "." in k for k in fixed):
        raise UserError(f"{path}: 'set' maps recipe fields (section.key) to values; got {fixed!r}")
    grid_fields = _grid_fields(grid, path)
    overlap = sorted(set(grid_fields) & set(fixed))
    if overlap:
        raise UserError(f"{path}: '{overlap[0]}' is both in grid and set; keep it in one")
    if any(k.startswith("data.target_domain") or k == "train.seed" for k in (*grid_fields, *fixed)):
        raise UserError(f"{path}: targets and seeds are the sweep's own keys ('targets', 'seeds'), "
                        "not grid or set fields")
    stages = {}
    for stage in ("export", "bench"):
        value = raw.get(stage, False)
        if value is False or value is None:
            stages[stage] = None
        elif value is True:
            stages[stage] = {}
        elif isinstance(value, dict):
            stages[stage] = value
        else:
            raise UserError(f"{path}: '{stage}' is true, false or a mapping of {stage} fields")
    if stages["bench"]:
        from rise_edge.config import recipe_from_dict
        recipe_from_dict({"bench": stages["bench"]}, f"{path}: bench")
    compare = raw.get("compare") or []
    if not isinstance(compare, list) or not all(isinstance(k, str) and k in grid_fields
                                                for k in compare):
        raise UserError(f"{path}: 'compare' lists grid fields whose values collect reports as "
                        f"separate rows ({', '.join(grid_fields) or 'the grid has none'}); got "
                        f"{compare!r}")
    if not isinstance(raw.get("output_dir", ""), str):
        raise UserError(f"{path}: 'output_dir' is a folder path; got {raw['output_dir']!r}")
    recipe = load_recipe(base, [_override(k, v) for k, v in fixed.items()])
    targets = _targets(raw.get("targets", "all"), recipe, path)
    output = Path(raw.get("output_dir") or Path(recipe.train.output_dir) / "sweeps" / path.stem)
    _check_output_dir(output, recipe, f"{path}: output_dir" if raw.get("output_dir") else None)
    # The hash covers what the runs are (the base recipe's content, not its file name), so a
    # copied sweep file names the same sweep.
    normalised = {"base": recipe_to_dict(load_recipe(base)), "targets": list(targets), "seeds": seeds,
                  "grid": grid, "set": fixed, "export": stages["export"], "bench": stages["bench"]}
    sweep = Sweep(base, base_text, targets, tuple(seeds), {k: tuple(v) for k, v in grid.items()},
                  dict(fixed), stages["export"], stages["bench"], output,
                  cache_key(**normalised)[:16], tuple(compare))
    from rise_edge.train.methods import resolved

    for spec in expand(sweep):  # every recipe of the sweep is valid before anything runs
        resolved(load_recipe(base, spec.overrides))
        if spec.export is not None:
            load_recipe(base, [*spec.overrides, *(_override(f"export.{k}", v) for k, v in spec.export.items())])
    return sweep


def _check_output_dir(output: Path, recipe: Any, given: str | None) -> None:
    """The sweep's runs never go into the data set every run reads: a folder among its domains
    would read as one more domain or class (and the sweep's files would change the data). A folder
    holding the data set (the data root) is fine: the runs go beside it."""
    from rise_edge.data.domains import data_root
    from rise_edge.files import check_destination
    from rise_edge.registry import known_dataset

    root, known = data_root(recipe.data), known_dataset(recipe.data.dataset)
    if root is None or (known is not None and known.build is not None):
        return  # no data set named yet (each run says so), or one rise-edge generates elsewhere
    folder = root / (known.folder if known is not None else recipe.data.dataset)
    check_destination(output, folder, command="a sweep", writes="the sweep's runs",
                      reads="the data set", given=given, allow=("holds",),
                      fix=f"set the sweep file's output_dir to a folder outside {folder}")


def _grid_fields(grid: Any, path: Path) -> list[str]:
    """Check a sweep's grid and return the recipe fields it varies. A key with a dot is a field
    with a list of values; a key without one names tied fields: a list of mappings of fields, each
    mapping one choice (RISE's (w_kd, w_ce) pairs, or methods with their own weights)."""
    if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
        raise UserError(f"{path}: 'grid' maps recipe fields (section.key) to lists of values, or a "
                        f"name to a list of tied fields; got {grid!r}")
    fields: list[str] = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid '{key}' must be a non-empty list of values; got {values!r}")
        if "." in key:
            fields.append(key)
            continue
        for choice in values:
            if not isinstance(choice, dict) or not choice or not all(
                    isinstance(k, str) and "." in k for k in choice):
                raise UserError(f"{path}: grid '{key}' (a name without a dot) holds tied fields: "
                                "each entry is a mapping of recipe fields, e.g. "
                                f"{{loss.w_kd: 0.9, loss.w_ce: 0.1}}; got {choice!r}")
        tied = sorted({k for choice in values for k in choice})
        fields.extend(tied)
    repeated = sorted({k for k in fields if fields.count(k) > 1})
    if repeated:
        raise UserError(f"{path}: grid sets '{repeated[0]}' in two places; keep it in one")
    return fields


def grid_points(grid: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every combination of a checked grid, as {recipe field: value}, in a stable order."""
    axes = [[{key: v} for v in values] if "." in key else [dict(choice) for choice in values]
            for key, values in grid.items()]
    return [{k: v for part in parts for k, v in part.items()} for parts in itertools.product(*axes)]


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _targets(value: Any, recipe: Any, path: Path) -> tuple[str, ...]:
    from rise_edge.data.domains import dataset_dir, known_dataset

    known = known_dataset(recipe.data.dataset)
    if known is not None and known.build is None:
        domains = known.domains
    else:  # a generated or unregistered data set: its folders are its domains
        folder = dataset_dir(recipe.data)
        domains = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if value == "all":
        return tuple(domains)
    if not isinstance(value, list) or not value:
        raise UserError(f"{path}: 'targets' is 'all' or a list of domains of {recipe.data.dataset} "
                        f"({', '.join(domains)})")
    unknown = [t for t in value if t not in domains]
    if unknown:
        raise UserError(f"{path}: target '{unknown[0]}' is not a domain of {recipe.data.dataset}; "
                        f"domains: {', '.join(domains)}")
    return tuple(value)


def _slug(point: dict[str, Any]) -> str:
    """A grid point as a folder name: lr=0.001_method=rise (the key's last part, safe characters)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts))


def expand(sweep: Sweep, threads: int = 0) -> list[RunSpec]:
    """Every run of the sweep, in a stable order (target, seed, grid point)."""
    points = grid_points(sweep.grid) or [{}]
    runs = []
    for target, seed, point in itertools.product(sweep.targets, sweep.seeds, points):
        name = f"{target}/seed{seed}" + (f"/{_slug(point)}" if point else "")
        overrides = (*(_override(k, v) for k, v in sweep.fixed.items()),
                     *(_override(k, v) for k, v in point.items()),
                     f"data.target_domain={target}", f"train.seed={seed}")
        runs.append(RunSpec(name, str(sweep.output_dir / name), str(sweep.base), overrides, target,
                            seed, point, sweep.export, sweep.bench, sweep.hash, threads))
    return runs


def run_state(spec: RunSpec) -> str:
    """done (trained, and every asked stage done, by this sweep), resume, or new."""
    run_dir = Path(spec.run_dir)
    record = read_run_record(run_dir)
    if (run_dir / "results.json").is_file() and record.get("sweep_hash") == spec.sweep_hash \
            and record.get("complete"):
        return "done"
    if (run_dir / "resume.safetensors").is_file() or (run_dir / "results.json").is_file():
        return "resume"
    return "new"


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """A run's sweep.json ({} when it is missing or damaged: the run is then trained or resumed
    again, which writes it anew; collect reads it checked and names a damaged one)."""
    from rise_edge.errors import DamagedFile
    from rise_edge.files import read_json_record

    try:
        record = read_json_record(run_dir / SWEEP_RECORD, "", missing_ok=True)
    except DamagedFile:
        return {}
    return record.data if record is not None else {}


# ---------------------------------------------------------------------------------------------------
# One run (in whatever process the launcher gives it)


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train (or resume, or skip when finished), then the asked export and bench stages; write the
    run's sweep record. Returns the run's results.json."""
    configure_once()  # a worker or a SLURM job: its messages go to its stderr, its log
    import torch

    from rise_edge.run_dir import open_run
    from rise_edge.train.loop import finished_with, train_run

    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    recipe = load_recipe(spec.recipe, spec.overrides)
    record = {"sweep_hash": spec.sweep_hash, "name": spec.name, "target": spec.target,
              "seed": spec.seed, "point": spec.point, "recipe": spec.recipe,
              "overrides": list(spec.overrides), "complete": False}
    if (run_dir / "results.json").is_file():
        if not finished_with(run_dir, recipe):
            raise UserError(f"{run_dir} holds a finished run that this sweep's recipe would not make "
                            "(another recipe, or changed since); move it aside and run the sweep again")
    else:
        resume = (run_dir / "resume.safetensors").is_file()
        train_run(recipe, recipe_name=Path(spec.recipe).stem, run_dir=run_dir, resume=resume,
                  progress=False)
    write_json_atomic(run_dir / SWEEP_RECORD, record)
    if spec.export is not None:
        from rise_edge.export.driver import export_run, resolve_export_config

        cfg = resolve_export_config(open_run(run_dir), [_override(f"export.{k}", v)
                                                        for k, v in spec.export.items()])
        export_run(run_dir, cfg, progress=False)
    if spec.bench is not None:
        from rise_edge.bench.driver import bench_run, resolve_bench_config

        fields = {"domains": ("all",), **spec.bench}
        bench_run(run_dir, resolve_bench_config(open_run(run_dir), **fields), progress=False)
    write_json_atomic(run_dir / SWEEP_RECORD, {**record, "complete": True})
    from rise_edge.files import read_json_record

    results = read_json_record(run_dir / "results.json", "move that run aside and run the sweep "
                               "again to retrain it")
    return results.data if results is not None else {}


def run_worker(spec_file: str) -> int:
    """`python -m rise_edge.sweep SPEC.json`: one run in its own process (the local pool)."""
    # A sweep started from a script or a backgrounded shell may hand its runs SIGINT ignored:
    # restore Python's handler, so Ctrl-C stops a run like any command.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = RunSpec(**json.loads(Path(spec_file).read_text()))
    try:
        run_one(spec)
    except UserError as exc:
        logger("sweep").error(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        logger("sweep").error("interrupted: run the sweep again to resume this run from its last "
                              "checkpoint")
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# Launchers


@dataclass
class LaunchResult:
    total: int
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # name -> where to read why
    seconds: float = 0.0
    cache_seconds: float = 0.0                            # filling teacher-view caches first


LAUNCHERS = ("local", "submitit-local", "slurm")


def launch(sweep: Sweep, sweep_file: Path, *, launcher: str = "local", workers: int = 1,
           threads: int = 0, gpus: Sequence[str] = (), slurm: dict[str, Any] | None = None,
           log: Callable[[str], None] = print) -> LaunchResult:
    """Run every unfinished run of the sweep; finished ones are skipped, interrupted ones resume."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{launcher}'; launchers: {', '.join(LAUNCHERS)}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if launcher == "slurm":  # before anything is written: a contradicting --gpus-per-job stops here
        slurm = {**(slurm or {}),
                 "gpus_per_node": _gpus_per_run(expand(sweep), (slurm or {}).get("gpus_per_node"))}
    started = time.perf_counter()
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    copy = sweep.output_dir / SWEEP_COPY
    if copy.is_file() and load_sweep(copy).hash != sweep.hash:
        raise UserError(f"{sweep.output_dir} holds another sweep (its {SWEEP_COPY} makes other runs "
                        f"than {sweep_file}); choose another output_dir, or move that folder aside")
    _write_copy(sweep)
    if threads == 0 and launcher == "local":  # divide the cores between the runs at once
        threads = max(1, (os.cpu_count() or 1) // workers)
    specs = expand(sweep, threads)
    result = LaunchResult(len(specs))
    pending = []
    for spec in specs:
        if run_state(spec) == "done":
            result.skipped.append(spec.name)
        else:
            pending.append(spec)
    log(f"sweep {sweep.hash}: {len(specs)} runs, {len(result.skipped)} finished already, "
        f"{len(pending)} to run ({launcher}, {workers} at once"
        + (f", {threads} CPU thread(s) each" if threads else "") + ")")
    # The executor before the caches: no SLURM here, or settings submitit refuses, stop the sweep
    # before minutes of filling them.
    executor = (_executor(sweep.output_dir, launcher, workers, threads, slurm or {})
                if launcher != "local" and pending else None)
    result.cache_seconds = fill_teacher_caches(pending, log)
    if launcher == "local":
        _local_pool(pending, sweep.output_dir, workers, gpus, result, log)
    elif executor is not None:
        _submitit(executor, pending, sweep.output_dir, launcher, workers, result, log)
    result.seconds = time.perf_counter() - started
    return result


def fill_teacher_caches(pending: Sequence[RunSpec], log: Callable[[str], None]) -> float:
    """Fill the teacher-view caches the pending runs read (teacher.cache on or auto), once, here,
    before any run starts: every run then reads the teacher's embeddings instead of running it.
    Returns the seconds it took (0 when no run reads a cache)."""
    recipes = [load_recipe(spec.recipe, spec.overrides) for spec in pending]
    if not any(r.teacher.cache != "off" and r.teacher.cache_views > 0 for r in recipes):
        return 0.0
    from rise_edge.train.cache_build import caches_for, describe

    started = time.perf_counter()
    for record in caches_for(recipes, fill=True, log=log):
        log(describe(record))
    return time.perf_counter() - started


def _write_copy(sweep: Sweep) -> None:
    """The sweep as it ran, beside its runs: its base recipe copied in, so the folder alone says
    what made it (collect reads it, wherever the folder moved)."""
    import yaml

    write_text_atomic(sweep.output_dir / BASE_COPY, sweep.base.read_text(encoding="utf-8"))
    write_text_atomic(sweep.output_dir / SWEEP_COPY, yaml.safe_dump({
        "base": BASE_COPY, "targets": list(sweep.targets), "seeds": list(sweep.seeds),
        "grid": {k: list(v) for k, v in sweep.grid.items()}, "set": sweep.fixed,
        "compare": list(sweep.compare),
        "export": sweep.export if sweep.export is not None else False,
        "bench": sweep.bench if sweep.bench is not None else False,
        "output_dir": str(sweep.output_dir)}, sort_keys=False))


def _progress(result: LaunchResult, log: Callable[[str], None], name: str, outcome: str) -> None:
    done = len(result.skipped) + len(result.finished) + len(result.failed)
    log(f"[{done}/{result.total}] {name}: {outcome}")


def _local_pool(pending: list[RunSpec], output: Path, workers: int, gpus: Sequence[str],
                result: LaunchResult, log: Callable[[str], None]) -> None:
    """N runs at once, each its own process (`python -m rise_edge.sweep`), with its CPU threads and,
    given --gpus, one GPU each (round robin).

    On Ctrl-C no run starts any more and every run still going is stopped before this returns:
    a worker thread whose run has just ended would otherwise pick up the next run between the
    interrupt and the shutdown, and the interrupted sweep would wait for that whole run."""
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    starting = threading.Lock()  # a run starts entirely before, or not at all after, an interrupt

    def one(index: int, spec: RunSpec) -> tuple[str, int | None, Path]:
        slug = spec.name.replace("/", "__")
        spec_file = logs / f"{slug}.spec.json"
        log_file = logs / f"{slug}.log"
        env = dict(os.environ)
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        with starting:
            if stopping.is_set():
                return spec.name, None, log_file
            write_json_atomic(spec_file, asdict(spec))
            with open(log_file, "w") as out:
                process = subprocess.Popen([sys.executable, "-m", "rise_edge.sweep", str(spec_file)],
                                           stdout=out, stderr=subprocess.STDOUT, env=env)
            processes[spec.name] = process
        return spec.name, process.wait(), log_file

    pool = concurrent.futures.ThreadPoolExecutor(workers)
    futures = [pool.submit(one, i, spec) for i, spec in enumerate(pending)]
    try:
        for future in concurrent.futures.as_completed(futures):
            name, code, log_file = future.result()
            if code == 0:
                result.finished.append(name)
                _progress(result, log, name, "done")
            elif code is not None:
                result.failed[name] = str(log_file)
                how = (f"killed by signal {-code}" + (": out of memory? lower --workers or "
                       "data.num_workers" if code == -9 else "") if code < 0 else f"exit {code}")
                _progress(result, log, name, f"FAILED ({how}; see {log_file}; "
                          "run the sweep again to resume it)")
    except BaseException:  # Ctrl-C (or a failing log): stop everything this pool started
        with starting:
            stopping.set()
        _stop_processes(list(processes.values()))
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_processes(processes: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """Ask every live run to stop (SIGTERM: its last checkpoint is what a resume starts from) and
    kill the ones still alive after `grace_s`; a second Ctrl-C kills at once."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    try:
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def slurm_settings(launcher: str, *, timeout_min: int = 24 * 60, partition: str | None = None,
                   mem: str | None = None, gpus_per_job: int | None = None) -> dict[str, Any]:
    """`rise-edge sweep`'s job options as the `slurm` argument of launch (submitit's parameter
    names), checked: a bad value, or a SLURM-only option given to another launcher, is a UserError
    saying what would be right."""
    given = [option for option, value in (("--gpus-per-job", gpus_per_job), ("--mem", mem),
                                          ("--partition", partition)) if value is not None]
    if given and launcher != "slurm":
        raise UserError(f"{given[0]} applies to --launcher slurm only (this sweep runs with "
                        f"--launcher {launcher}); add --launcher slurm, or leave {given[0]} out")
    settings: dict[str, Any] = {"timeout_min": timeout_min}
    if partition is not None:
        if not partition or any(c.isspace() for c in partition) or partition.startswith("-"):
            raise UserError("--partition takes a SLURM partition's name (several: comma-separated, "
                            f"no spaces), e.g. gpu; got {partition!r}")
        settings["slurm_partition"] = partition
    if mem is not None:
        settings["slurm_mem"] = slurm_memory(mem)
    if gpus_per_job is not None:
        if gpus_per_job < 0:
            raise UserError(f"--gpus-per-job takes 0 or more GPUs per run; got {gpus_per_job}")
        settings["gpus_per_node"] = gpus_per_job
    return settings


_MEMORY = re.compile(r"([1-9][0-9]*)\s*(?:([KMGT])B?)?", re.IGNORECASE)


def slurm_memory(text: str) -> str:
    """A memory size in sbatch's --mem form (32G, 500M; a bare number is megabytes, as in SLURM),
    normalised: 32gb -> 32G, 4000 -> 4000M."""
    match = _MEMORY.fullmatch(text.strip())
    if match is None:
        raise UserError("--mem takes the memory of each run's job as a whole number and a unit K, M, "
                        f"G or T, e.g. 32G or 500M; got {text!r}")
    number, unit = match.groups()
    return f"{number}{(unit or 'M').upper()}"


def _gpus_per_run(runs: Sequence[RunSpec], asked: int | None) -> int:
    """GPUs each run's SLURM job asks for (`asked`: --gpus-per-job, None when not given). A run
    trains on its recipe's train.device: `cpu` runs get none (a GPU held idle is a GPU another job
    waits for), `auto` and `cuda` runs one (a run trains on one device). The array's jobs share one
    request, so a sweep mixing devices asks for what its GPU runs need."""
    devices = {load_recipe(spec.recipe, spec.overrides).train.device for spec in runs}
    if devices == {"cpu"}:
        if asked:
            raise UserError(f"--gpus-per-job {asked}: this sweep's runs train on the CPU "
                            "(train.device: cpu), so a GPU would sit idle; leave --gpus-per-job out, "
                            "or set train.device: auto (or cuda) in the sweep's 'set'")
        return 0
    if asked == 0 and "cuda" in devices:
        raise UserError("--gpus-per-job 0: this sweep's runs train with train.device: cuda, which "
                        "fails without a GPU; ask for 1 or more, or set train.device: auto (the "
                        "CPU when the job has no GPU) or cpu in the sweep's 'set'")
    return 1 if asked is None else asked


def _submitit(executor: Any, pending: list[RunSpec], output: Path, launcher: str, workers: int,
              result: LaunchResult, log: Callable[[str], None]) -> None:
    """The same runs as jobs of `executor` (_executor): SLURM through submitit, or submitit's local
    executor (one code path)."""
    if launcher == "slurm":
        _slurm_array(executor, pending, output, workers, result, log)
        return
    # The local executor has no array parallelism (it starts every submitted job at once): submit
    # in waves of `workers`.
    for start in range(0, len(pending), workers):
        jobs = [(spec, executor.submit(run_one, spec)) for spec in pending[start:start + workers]]
        try:
            _wait_for_jobs(jobs, result, log)
        except KeyboardInterrupt:  # the jobs are this machine's processes: stop them
            for _, job in jobs:
                job.cancel(check=False)
            raise


def _executor(output: Path, launcher: str, workers: int, threads: int, slurm: dict[str, Any]) -> Any:
    """A submitit executor with the sweep's job parameters. On SLURM: at most `workers` array tasks
    at once, `threads` CPUs (default 4), `gpus_per_node` GPUs (none when 0; launch sets it from the
    runs' train.device) and the `slurm_*` settings (partition, memory) as given."""
    try:
        import submitit
    except ImportError:
        from rise_edge.errors import missing_extra
        raise missing_extra("submitit", "sweep", "rise-edge sweep --launcher " + launcher) from None
    try:
        executor = submitit.AutoExecutor(folder=output / "submitit",
                                         cluster="local" if launcher == "submitit-local" else "slurm")
    except RuntimeError:  # submitit's SLURM executor wants srun on PATH
        raise UserError("--launcher slurm submits with SLURM's commands (sbatch, srun), and srun is "
                        "not on PATH here: run the sweep on the cluster's login node, or use "
                        "--launcher local") from None
    parameters: dict[str, Any] = {"timeout_min": int(slurm.get("timeout_min", 24 * 60)),
                                  "name": f"rise-edge-{output.name}"}
    if launcher == "slurm":
        gpus = int(slurm.get("gpus_per_node", 0))  # launch sets it: _gpus_per_run
        parameters.update(slurm_array_parallelism=workers, cpus_per_task=threads or 4,
                          **({"gpus_per_node": gpus} if gpus else {}),
                          **{k: v for k, v in slurm.items() if k.startswith("slurm_")})
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError, AssertionError) as exc:  # submitit's ways to refuse
        raise UserError(f"submitit refused the launcher settings: {' '.join(str(exc).split())}") from None
    return executor


def _slurm_array(executor: Any, pending: list[RunSpec], output: Path, workers: int,
                 result: LaunchResult, log: Callable[[str], None]) -> None:
    """Submit the runs as one SLURM job array and wait for them. SLURM's `%workers` limit holds for
    an array's tasks only: runs submitted as separate jobs would all start at once."""
    jobs = submit_array(executor, pending)
    array_id = jobs[0][1].job_id.split("_")[0]
    log(f"submitted SLURM job {array_id}: {len(jobs)} run(s), at most {workers} at once; their logs: "
        f"{output / 'submitit'}")
    try:
        _wait_for_jobs(jobs, result, log)
    except KeyboardInterrupt:
        log(f"interrupted: the runs of SLURM job {array_id} keep running on the cluster; `scancel "
            f"{array_id}` stops them all (the sweep run again resumes them), or run the sweep again "
            "once they end: finished runs are skipped")
        raise


def submit_array(executor: Any, pending: list[RunSpec]) -> list[tuple[RunSpec, Any]]:
    """Submit the runs as one job array (submitit's map_array: one sbatch script, `--array=0-N%W`);
    returns each run with its job. sbatch refusing it is a UserError with sbatch's reason."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's complaint: say it once
            jobs = executor.map_array(run_one, pending)
    except (FailedJobError, FailedSubmissionError) as exc:
        lines = [line.strip() for line in (str(exc) or said.getvalue()).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[0] if lines else
                      "no reason given")
        raise UserError(f"sbatch refused the sweep's job array: {reason}") from None
    return list(zip(pending, jobs))


def _wait_for_jobs(jobs: list[tuple[RunSpec, Any]], result: LaunchResult,
                   log: Callable[[str], None]) -> None:
    """Wait for each submitted job in turn and record how it ended."""
    for spec, job in jobs:
        try:
            job.result()
            result.finished.append(spec.name)
            _progress(result, log, spec.name, "done")
        except Exception as exc:  # submitit re-raises the job's failure with its traceback
            where = str(job.paths.stderr)
            result.failed[spec.name] = where
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            _progress(result, log, spec.name, f"FAILED ({first}; see {where})")
