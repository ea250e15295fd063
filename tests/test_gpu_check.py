"""benchmarks/gpu_check.py is the one script a lent GPU runs first: its code path is exercised here on
the CPU at tiny sizes, so a lease is never spent on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_its_sections_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--skip-tests", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    for name, section in report["sections"].items():
        assert "error" not in section, (name, section.get("traceback"))
        assert section["result"], name
    assert "| resnet18 | rise |" in (tmp_path / "gpu_check_quick.md").read_text()


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jpeg_decoding_section_on_the_cpu() -> None:
    """The decoders' section on a few files: PIL and torchvision's CPU decoder, no nvjpeg row."""
    import torch

    rows = _gpu_check_module().jpeg_decoding(torch.device("cpu"), 4, 32)
    assert [r["decoder"] for r in rows] == ["PIL, one thread", "torchvision decode_jpeg, CPU"]
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.gpu
def test_nvjpeg_decodes_what_the_cpu_decodes() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; PyTorch sees none on this machine")
    rows = _gpu_check_module().jpeg_decoding(torch.device("cuda"), 16, 224, batch=8)
    nvjpeg = rows[-1]
    assert nvjpeg["decoder"].startswith("torchvision decode_jpeg, nvjpeg") and nvjpeg["images_per_s"] > 0
    # the same pixels up to the IDCT's rounding (torchvision's own test: mean difference under 2)
    assert nvjpeg["mean_abs_diff_vs_cpu"] < 2
