"""What a bench row costs besides time: artefact size, peak host and GPU memory, board power; and the
machine and software a report was measured on.

Peak host memory per engine: Linux keeps a per-process high-water mark of resident memory (VmHWM in
/proc/self/status) that writing "5" to /proc/self/clear_refs resets, so each engine gets its own peak
at no cost during the timed loop. Where that is not possible, the process-lifetime peak from
getrusage is reported instead, and says so.

Power on a Jetson: `tegrastats` prints the board's rail readings (current/average, in mW) every
interval, e.g. `VDD_IN 4941mW/4941mW VDD_CPU_GPU_CV 554mW/554mW VDD_SOC 1426mW/1426mW` (Orin),
`VIN_SYS_5V0 3692mW/3692mW` (AGX Orin) or `POM_5V_IN 2345/2345` (JetPack 4, no unit). The whole-board
input rail is used; energy per image = mean power x timed seconds / images, so it includes the board's
idle draw.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

# tegrastats input rails, most inclusive first (whole board / module input).
BOARD_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN", "VIN")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


# ---------------------------------------------------------------------------------------------------
# Memory


class HostMemory:
    """Peak resident memory of this process since the last `reset()` (bytes)."""

    def __init__(self) -> None:
        self.scope = "since reset (VmHWM)" if self._can_reset() else "process lifetime (getrusage)"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.scope.startswith("since"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_bytes(self) -> int:
        if self.scope.startswith("since"):
            return int(_status_kib("VmHWM") or 0) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if platform.system() == "Darwin" else 1024)

    @staticmethod
    def current_bytes() -> int:
        try:
            import psutil
            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return int(_status_kib("VmRSS") or 0) * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class GpuMemory:
    """Peak bytes allocated through PyTorch's CUDA allocator (TensorRT and ONNX Runtime allocate
    outside it, so for them this is a lower bound); None without CUDA."""

    def __init__(self) -> None:
        import torch

        self.available = torch.cuda.is_available()

    def reset(self) -> None:
        if self.available:
            import torch
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        if not self.available:
            return None
        import torch
        return int(torch.cuda.max_memory_allocated())


# ---------------------------------------------------------------------------------------------------
# Jetson power


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """Rail name -> instantaneous milliwatts from one tegrastats line (RAM/SWAP figures excluded)."""
    return {name: float(now) for name, now, _ in _RAIL.findall(line)
            if name not in ("RAM", "SWAP", "IRAM", "GART")}


def board_power_mw(rails: dict[str, float]) -> tuple[str, float] | None:
    """(rail, mW) of the whole-board input rail, or the sum of all rails when none is known."""
    for name in BOARD_RAILS:
        if name in rails:
            return name, rails[name]
    if rails:
        return "sum of rails " + "+".join(sorted(rails)), sum(rails.values())
    return None


class TegraStats:
    """Samples board power with `tegrastats --interval MS` while the block runs (Jetson only).

        with TegraStats() as power: ...timed work...
        power.summary(seconds, images)  -> mean W, energy J, J per image; None when unavailable
    """

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.executable = shutil.which("tegrastats")
        self.samples: list[tuple[str, float]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.executable is not None

    def __enter__(self) -> TegraStats:
        if self.executable:
            try:
                self._process = subprocess.Popen([self.executable, "--interval", str(self.interval_ms)],
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                 text=True)
            except OSError:
                self._process = None
            if self._process is not None:
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            found = board_power_mw(parse_tegrastats_line(line))
            if found:
                self.samples.append(found)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._reader is not None:
            self._reader.join(timeout=2)

    def summary(self, seconds: float, images: int) -> dict[str, Any] | None:
        if not self.samples:
            return None
        mean_w = sum(mw for _, mw in self.samples) / len(self.samples) / 1e3
        energy = mean_w * seconds
        return {"rail": self.samples[0][0], "samples": len(self.samples), "mean_power_w": mean_w,
                "energy_j": energy, "energy_per_image_j": energy / images if images else None,
                "note": "whole-board input power from tegrastats, idle draw included"}


# ---------------------------------------------------------------------------------------------------
# Machine and versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jetson_model() -> str | None:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            text = Path(path).read_text().strip("\x00\n ")
        except OSError:
            continue
        if "jetson" in text.lower() or "orin" in text.lower():
            return text
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (name, capability, CUDA) and Jetson model when present."""
    import torch

    try:
        import psutil
        physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count()
        memory = int(psutil.virtual_memory().total)
    except ImportError:
        physical, logical, memory = None, os.cpu_count(), None
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda,
               "count": torch.cuda.device_count()}
    return {"cpu": _cpu_model(), "physical_cores": physical, "logical_cores": logical,
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_bytes": memory, "platform": platform.platform(),
            "gpu": gpu, "jetson": _jetson_model(), "tegrastats": shutil.which("tegrastats") is not None,
            "torch_threads": torch.get_num_threads()}
