"""Which of export's artefacts a bundle serves, and the intact, judged file each one comes from.

A served artefact is an export.json name:
    onnx-fp32, onnx-int8, onnx-int8-qat-cpu   ONNX Runtime models, shipped as export made them
    tensorrt-fp32, tensorrt-fp16              engines built on the device from the FP32 ONNX
    tensorrt-int8                             built from the explicit Q/DQ ONNX (QAT's, else
                                              nvidia-modelopt's), as export builds it
Engines themselves are never shipped: they are bound to the GPU and TensorRT version that built
them. Each source must be ok in export.json, made from the run's current student, and its file's
sha256 must still match the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rise_edge.errors import UserError, did_you_mean
from rise_edge.files import file_sha256

ONNX_SERVED = ("onnx-fp32", "onnx-int8", "onnx-int8-qat-cpu")
ENGINE_SERVED = ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8")
SERVABLE = ONNX_SERVED + ENGINE_SERVED
QDQ_SOURCES = ("onnx-int8-qat", "onnx-int8-tensorrt")  # TensorRT INT8 from these, QAT's first
ENGINE_PRECISION_ORDER = ("int8", "fp16", "fp32")   # DeepStream takes the fastest one served


@dataclass(frozen=True)
class Served:
    """One served artefact: how it runs and the export artefact whose file it is made from."""

    name: str          # export.json name (SERVABLE)
    runtime: str       # "onnx" or "tensorrt"
    precision: str
    source: str        # export.json name of the file it comes from
    source_path: Path
    source_sha256: str


class Unavailable(Exception):
    """An artefact this machine could not make (export said 'unavailable'): exit 3, not an error."""


def _runtime_precision(name: str) -> tuple[str, str]:
    if name.startswith("tensorrt-"):
        return "tensorrt", name.split("-", 1)[1]
    return "onnx", ("fp32" if name == "onnx-fp32" else "int8")


def _source_record(export_dir: Path, records: dict[str, dict[str, Any]], name: str, wanted: str,
                   student_sha256: str, run: Path) -> tuple[Path, str]:
    """The path and sha256 of artefact `name`'s file, or why it cannot be served (`wanted` is what
    the user asked for, named in the message)."""
    record = records.get(name)
    need = f"{wanted} needs {name}, which" if wanted != name else name
    if record is None:
        raise UserError(f"{need} was never made for {run}: make it first with rise-edge export "
                        f"{run} ({_how_to_make(name)})")
    status = record.get("status")
    if status == "unavailable":
        raise Unavailable(f"{need} could not be made on the machine that exported: "
                          f"{record.get('reason', 'no reason recorded')}")
    if status != "ok":
        raise UserError(f"{need} is '{status}' in export.json ({record.get('reason', 'no reason')});"
                        f" make it again with rise-edge export {run} ({_how_to_make(name)})")
    if record.get("student_sha256") != student_sha256:
        raise UserError(f"{need} was made from an earlier student.safetensors; export {run} again")
    from rise_edge.run_dir import artefact_file

    path = artefact_file(export_dir, record, name)  # never a file outside export/
    if not path.is_file() or file_sha256(path) != record.get("sha256"):
        raise UserError(f"{path} is missing or differs from the sha256 export recorded for {name}; "
                        f"export {run} again")
    return path, record["sha256"]


def _how_to_make(name: str) -> str:
    return {"onnx-fp32": "--format onnx", "onnx-int8": "--format onnx --int8",
            "onnx-int8-qat-cpu": "--int8 --qat", "onnx-int8-qat": "--int8 --qat",
            "onnx-int8-tensorrt": "--format tensorrt --int8, with nvidia-modelopt installed"
            }.get(name, "see rise-edge backends")


def resolve(name: str, export_dir: Path, records: dict[str, dict[str, Any]], student_sha256: str,
            run: Path) -> Served:
    """The Served form of one SERVABLE name; UserError or Unavailable when it cannot be served."""
    runtime, precision = _runtime_precision(name)
    if runtime == "onnx":
        source = name
    elif precision == "int8":
        ok = [n for n in QDQ_SOURCES if records.get(n, {}).get("status") == "ok"]
        source = ok[0] if ok else next((n for n in reversed(QDQ_SOURCES) if n in records),
                                       QDQ_SOURCES[-1])
    else:
        source = "onnx-fp32"
    path, sha = _source_record(export_dir, records, source, name, student_sha256, run)
    return Served(name, runtime, precision, source, path, sha)


def check_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in SERVABLE:
            raise UserError(f"--serve {name}: not an artefact a bundle serves"
                            f"{did_you_mean(name, SERVABLE)}; choose from {', '.join(SERVABLE)}")


def default_names(records: dict[str, dict[str, Any]], formats: Sequence[str],
                  recommended_int8: str | None) -> list[str]:
    """What a bundle serves when --serve is not given: Triton gets the FP32 ONNX, the CPU INT8 that
    export recommends when it met the accuracy budget, and the FP16 engine plus the INT8 engine when
    a Q/DQ graph was made; DeepStream gets the INT8 engine when it can, else FP16."""
    qdq = any(records.get(n, {}).get("status") == "ok" for n in QDQ_SOURCES)
    names: list[str] = []
    if "triton" in formats:
        names.append("onnx-fp32")
        if recommended_int8 and int8_met(records, recommended_int8):
            names.append(recommended_int8)
        names.append("tensorrt-fp16")
    if qdq:
        names.append("tensorrt-int8")
    elif "deepstream" in formats and "tensorrt-fp16" not in names:
        names.append("tensorrt-fp16")
    return names


def int8_met(records: dict[str, dict[str, Any]], name: str) -> bool:
    """Whether a CPU INT8 artefact kept within export's accuracy budget on the source domains."""
    record = records.get(name, {})
    if name == "onnx-int8":
        return bool(record.get("accuracy_budget", {}).get("met"))
    return bool(record.get("judge", {}).get("met"))  # rise_edge.export.judge's verdict


def int8_verdict(records: dict[str, dict[str, Any]], recommended: str | None) -> dict[str, Any]:
    """The judge's INT8 verdicts as export recorded them (source domains only; the target domain
    plays no part), for the manifest."""
    verdict: dict[str, Any] = {"recommended_cpu_int8": recommended}
    ptq = records.get("onnx-int8", {})
    if ptq.get("status") == "ok":
        budget = ptq["accuracy_budget"]
        verdict["onnx-int8"] = {
            "met": budget["met"], "budget_points": budget["budget_points"],
            "worst_drop_points": budget["fidelity"]["worst_drop_points"],
            "kept_fp32_layers": budget["kept_fp32_layers"], "judged_on": budget["judged_on"],
            "judge": budget.get("judge")}
    qat_cpu = records.get("onnx-int8-qat-cpu", {})
    if qat_cpu.get("status") == "ok":
        verdict["onnx-int8-qat-cpu"] = {
            "worst_drop_points": qat_cpu["fidelity_vs_fp32"]["worst_drop_points"],
            "met": int8_met(records, "onnx-int8-qat-cpu"), "judge": qat_cpu.get("judge")}
    for name in QDQ_SOURCES:
        if records.get(name, {}).get("status") == "ok":
            verdict[name] = {"judged": "not by export's budget: measure the TensorRT INT8 engine on "
                                       "the device with rise-edge bench (per domain)"}
    return verdict


def choose(names: Sequence[str], export_dir: Path, records: dict[str, dict[str, Any]],
           student_sha256: str, run: Path) -> tuple[list[Served], dict[str, str]]:
    """The Served form of each name, and name -> reason for those the exporting machine could not
    make (export said 'unavailable': the bundle goes on without them, exit status 3). A failed,
    stale, damaged or never-made source is a UserError."""
    served, missing = [], {}
    for name in names:
        try:
            served.append(resolve(name, export_dir, records, student_sha256, run))
        except Unavailable as exc:
            missing[name] = str(exc)
    return served, missing
