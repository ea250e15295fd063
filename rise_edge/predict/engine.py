"""Which artefact predict runs, verified exactly as bench verifies it, and loaded into a runner.

    spec = choose_artefact(run, None)      # export's recommended INT8, else ONNX FP32, else PyTorch
    runner = load_artefact(run, spec)      # (N, 3, S, S) float32 -> (N, C) logits

The artefact goes through bench's own checks (rise_edge.bench.plan.plan_engines): a stale,
tampered, unverified, missing or not-exported artefact is refused with the reason bench's row would
give (exit status 2), and one this machine cannot run with exit status 3.
"""

from __future__ import annotations

from typing import Any

from rise_edge.backend_table import artefacts, runner_for
from rise_edge.backends.base import Runner
from rise_edge.bench.driver import load_failure
from rise_edge.bench.plan import REFERENCE, EngineSpec, plan_engines
from rise_edge.bench.timing import max_batch
from rise_edge.errors import UserError, did_you_mean
from rise_edge.export.recommend import recommended_int8
from rise_edge.files import file_sha256
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, TrainedRun, read_export_record

DEFAULT_FP32 = "onnx-fp32"


class ArtefactUnavailable(UserError):
    """The artefact is fine but this machine cannot run it (no GPU, no TensorRT, ...): exit 3,
    as export's 'cannot be made here'."""

    exit_code = 3


def default_artefact(export: dict[str, Any]) -> str:
    """export.json's recommended INT8 artefact, else the FP32 ONNX when it exported ok, else the
    PyTorch student (the reference, always there)."""
    recommended = recommended_int8(export, "int8")
    if recommended:
        return recommended
    fp32 = export.get("artefacts", {}).get(DEFAULT_FP32)
    if isinstance(fp32, dict) and fp32.get("status") == "ok":
        return DEFAULT_FP32
    return REFERENCE


def _check_name(name: str, records: dict[str, Any]) -> None:
    """Refuse a name that is neither the reference, this run's artefact nor one export can make."""
    known = [REFERENCE, *records, *(n for n in artefacts() if n not in records)]
    if name not in known:
        raise UserError(f"unknown artefact '{name}'{did_you_mean(name, known)}; this run's: "
                        f"{', '.join([REFERENCE, *records])} (`rise-edge export` makes the others: "
                        f"{', '.join(n for n in known[1:] if n not in records) or 'none'})")


def choose_artefact(run: TrainedRun, name: str | None) -> EngineSpec:
    """The artefact `name` (None: default_artefact) with bench's verdict on it; refused unless
    bench would run it."""
    export = read_export_record(run.path, advice=f"re-run `rise-edge export {run.path}`")
    records = dict(export.get("artefacts", {}))
    chosen = (name or "").strip().lower() or default_artefact(export)
    _check_name(chosen, records)
    specs = plan_engines(run, export, [chosen], file_sha256(run.path / STUDENT_FILE))
    spec = next(s for s in specs if s.name == chosen)
    if spec.status == "pending":  # bench would run it
        return spec
    what = f"artefact '{chosen}'" if name else (
        f"the default artefact '{chosen}' (export's recommended INT8)" if chosen != DEFAULT_FP32
        else f"the default artefact '{chosen}'")
    other = f"; or choose another with --artefact ({', '.join([REFERENCE, *records])})"
    if spec.status == "unavailable":
        raise ArtefactUnavailable(f"{what} cannot run on this machine: {spec.reason.rstrip('.')}"
                                  f"{other}")
    if spec.status == "not-exported":
        raise UserError(f"{what} was not exported ({spec.reason.rstrip('.')}); make it with "
                        f"`rise-edge export {run.path}`{other}")
    raise UserError(f"{what} is {spec.status} in {EXPORT_DIR}/{EXPORT_JSON}: {spec.reason}{other}")


def load_artefact(run: TrainedRun, spec: EngineSpec) -> Runner:
    """The runner of a chosen artefact, as bench loads it; one line naming the file if it fails."""
    from rise_edge.backends.pytorch import TorchRunner

    try:
        if spec.record is None:
            return TorchRunner(module=run.student, device="auto")
        return runner_for(spec.record, run.path / EXPORT_DIR, device=spec.device)
    except Exception as exc:  # damaged files fail inside each backend's runtime in many ways
        raise UserError(f"{load_failure(spec, exc)}; re-export it with `rise-edge export "
                        f"{run.path}`") from None



def batch_limit(spec: EngineSpec) -> int | None:
    """The largest batch the artefact takes (a TensorRT engine's profile, as bench reads it)."""
    return max_batch(spec)
