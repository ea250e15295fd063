"""The CPU an INT8 artefact is built for: chosen at export (`export.int8_target`), recorded in
export.json and in the artefact's metadata, and compared with the machine that runs it at bench.

An INT8 graph is not portable arithmetic. x86 CPUs without VNNI multiply uint8 activations by int8
weights with AVX2's vpmaddubsw, which adds each pair of products into a saturating int16: with 8-bit
weights, 2 x 255 x 127 overflows it and the layer's output is clipped. ONNX Runtime's advice there
is 7-bit weights (reduce_range); oneDNN halves the weights itself on such CPUs. With VNNI (vpdpbusd
accumulates in int32) or on ARM (sdot), 8-bit weights are exact. So the same model quantized for
one kind either saturates or gives up a bit of weight precision on the other: the kind is a
property of the artefact, not of whichever machine happened to export it.

    auto       the kind of the machine running the export
    x86-vnni   x86-64 with AVX512-VNNI, AVX-VNNI or AMX: uint8 x int8, 8-bit weights
    x86-avx2   x86-64 with AVX2 and no VNNI: uint8 x int8, 7-bit weights
    arm64      64-bit ARM (a Jetson's Cortex-A78AE, Graviton): int8 x int8, 8-bit weights
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from rise_edge.config import INT8_TARGETS

KINDS: tuple[str, ...] = INT8_TARGETS[1:]

DESCRIPTION = {
    "x86-vnni": "x86-64 with VNNI: uint8 activations x int8 weights, 8-bit weights",
    "x86-avx2": "x86-64 with AVX2, no VNNI: uint8 activations x int8 weights, 7-bit weights "
                "(AVX2's u8 x s8 multiply-add saturates int16 with 8-bit weights)",
    "arm64": "64-bit ARM: int8 activations x int8 weights, 8-bit weights",
}

# What running an artefact on another kind than the one it was built for does, in one sentence
# (the measured figures are in benchmarks/results/int8_target.md).
MISMATCH_COST = {
    ("x86-vnni", "x86-avx2"): "its 8-bit weights saturate this CPU's int16 multiply-add (AVX2, no "
                              "VNNI), which changed the class of far more images than rounding "
                              "does (benchmarks/results/int8_target.md)",
    ("arm64", "x86-avx2"): "int8 x int8 is not x86's fast path, and its 8-bit weights meet AVX2's "
                           "saturating multiply-add",
    ("x86-avx2", "x86-vnni"): "its 7-bit weights give up one bit of precision this CPU would have "
                              "kept exactly",
    ("x86-avx2", "arm64"): "its 7-bit weights give up one bit of precision this CPU would have "
                           "kept exactly, and uint8 activations are not ARM's fast path",
    ("x86-vnni", "arm64"): "uint8 activations are not ARM's fast path (symmetric int8 is)",
    ("arm64", "x86-vnni"): "int8 x int8 is not x86's fast path (uint8 x int8 is)",
}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """This CPU's flags, read once per process (bench asks for every row)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def this_machine() -> str:
    """The INT8 kind of the CPU this process runs on (x86 without /proc/cpuinfo counts as AVX2:
    7-bit weights are exact on every x86 kind, 8-bit ones only where VNNI is)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    return "x86-vnni" if _cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"} else "x86-avx2"


def resolve(requested: str) -> str:
    """`auto` -> this machine's kind; a kind stays itself."""
    if requested == "auto":
        return this_machine()
    if requested not in KINDS:
        raise ValueError(f"unknown INT8 target {requested!r}; one of {', '.join(INT8_TARGETS)}")
    return requested


def record(requested: str) -> dict[str, str]:
    """What export.json and the artefact's metadata say about the target."""
    resolved = resolve(requested)
    return {"requested": requested, "kind": resolved, "description": DESCRIPTION[resolved],
            "exported_on": this_machine()}


def mismatch(built_for: str, running_on: str | None = None) -> str | None:
    """None when an artefact built for `built_for` runs on its own kind here, else one sentence."""
    here = running_on or this_machine()
    if built_for == here or built_for not in KINDS:
        return None
    cost = MISMATCH_COST.get((built_for, here), "its arithmetic was chosen for another CPU")
    return (f"built for {built_for}, running on {here}: {cost}; re-export for this machine with "
            f"`rise-edge export RUN --int8 --int8-target {here}`")
