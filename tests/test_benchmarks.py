"""The Hessian benchmark's quick mode runs and prints its tables (no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hessian.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_hessian", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_mode_prints_tables(capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "== mlp: mlp_p=0" in out and "== clustered:" in out
    for method in ("ours: lambda_max, Lanczos tol=1e-3", "original: recomputed HVPs + eigsh(k=6)",
                   "power iteration, PyHessian rule 1e-3", "ours: Lanczos tol=1e-3"):
        assert method in out
    assert "one full-data gradient:" in out and "reference: float64 Lanczos" in out
    assert "memory (" in out and "one training step on a chunk of the same size" in out
    targets = out.split("== targets")[1]
    assert "relative error of ours" in targets and "gradient-equivalents" in targets


def test_power_iteration_rule_stops_low_on_a_cluster():
    """The PyHessian rule stops after few products, well short of λmax on a clustered spectrum."""
    import numpy as np
    import torch

    bench = load_bench()
    s = bench.clustered_spectrum(300, 6, 0.01)
    assert s.max() == 1.0 and ((s >= 0.99).sum() == 6)
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((300, 300)))
    A = torch.as_tensor((Q * s) @ Q.T)
    value, products, _ = bench.power_iteration(lambda v: A @ v, 300, "cpu", torch.float64, seed=0)
    assert products < 100 and 1e-3 < 1.0 - value < 0.1
