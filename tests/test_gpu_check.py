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
