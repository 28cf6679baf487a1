"""The Hessian engine on a small BatchNorm net, checked against the dense Hessian.

    python examples/hessian_api.py

Trains a small conv net with BatchNorm on 200 `digits` images for a few steps, then computes λmax,
the top 3 eigenvalues, λmin, the trace and the spectral density with `sharpness.hessian`; asserts
the eigenvalues and the trace against the dense float64 Hessian (about 700 parameters, so the dense
matrix is cheap), that the density integrates to 1, and `check_hvp` against finite differences. BatchNorm is in train mode (batch statistics of each chunk of 50), as in the
paper's protocol; the model is not changed by any of it.
"""

import numpy as np
import torch
from torch import nn

from sharpness import hessian
from sharpness.data import load_dataset


def main() -> None:
    torch.manual_seed(0)
    data = load_dataset("digits")
    X = nn.functional.avg_pool2d(data.X_train[:200], 4)  # 1x8x8: about 700 parameters
    y = data.y_train[:200]
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(100):  # a little training, so the spectrum is that of a trained net
        idx = torch.randint(0, len(y), (50,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(batch_size=50, mode="train")

    op = hessian.HessianOperator(model, X, y, dtype=torch.float64, **kw)
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.numel, dtype=torch.float64)], 1)
    eig = torch.linalg.eigvalsh((dense + dense.T) / 2).numpy()
    print(f"{op.numel} parameters; dense spectrum in [{eig[0]:.4f}, {eig[-1]:.4f}], trace {eig.sum():.4f}")

    spec = hessian.top_eigenvalues(model, X, y, k=3, tol=1e-6, **kw)
    print(f"top 3: {np.round(spec.eigenvalues, 4)} in {spec.matvecs} products (dense: {np.round(eig[::-1][:3], 4)})")
    assert np.allclose(spec.eigenvalues, eig[::-1][:3], rtol=1e-3)

    lam_max = hessian.lambda_max(model, X, y, **kw)  # default tol 1e-3 on the residual
    assert abs(lam_max - eig[-1]) / eig[-1] < 1e-3
    lam_min = hessian.lambda_min(model, X, y, tol=1e-6, dtype=torch.float64, **kw)
    assert abs(lam_min - eig[0]) <= 1e-4 * np.abs(eig).max()
    print(f"λmax {lam_max:.4f}, λmin {lam_min:.4f}")

    trace, se = hessian.hessian_trace(model, X, y, samples=200, **kw)
    print(f"trace {trace:.3f} ± {se:.3f} (dense {eig.sum():.3f})")
    assert abs(trace - eig.sum()) < 4 * se

    d = hessian.spectral_density(model, X, y, lanczos_steps=60, runs=4, **kw)
    mass = float(np.trapezoid(d.density, d.grid))
    print(f"density integrates to {mass:.4f}")
    assert abs(mass - 1) < 1e-3

    assert hessian.check_hvp(model, X, y, **kw) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    print("all checks passed")


if __name__ == "__main__":
    main()
