"""The examples: the Hessian API script asserts its own results; every sweep file is valid."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharpness import sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "examples").rglob("*.toml"))


def test_hessian_api_example_checks_itself():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hessian_api.py")], capture_output=True,
                          text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "all checks passed" in proc.stdout


def test_there_is_a_full_and_a_quick_sweep_per_finding():
    names = {p.relative_to(ROOT / "examples").as_posix() for p in SWEEPS}
    for i in range(1, 6):
        assert any(n.startswith(f"finding{i}_") for n in names if "/" not in n)
        assert any(n.startswith(f"quick/finding{i}_") for n in names)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.relative_to(ROOT).as_posix() for p in SWEEPS])
def test_example_sweeps_are_valid(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS", str(tmp_path))
    s = sweep.read_sweep(path)
    assert s.runs
    if "quick" in path.parts:
        assert {r.cfg.dataset for r in s.runs} <= {"digits"}  # offline, runs on a laptop
