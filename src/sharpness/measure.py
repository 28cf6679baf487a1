"""The paper's λmax protocol on a trained network: abridged data, train-mode chunks, between iterates."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from . import hessian
from .data import Dataset, strided_indices
from .models import has_dropout
from .optim import sam_step, sgd_step

LAMBDA_TOL = 1e-3  # relative residual at which λmax is accepted (its error is far smaller)
BETWEEN_POINTS = 8  # interpolation weights 0, 1/7, ..., 1


def abridged(data: Dataset, size: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The strided subset of the training set used for λmax (the whole set when size >= N)."""
    idx = strided_indices(len(data.y_train), size, offset)
    return data.X_train[idx], data.y_train[idx]


def measurement_modes(cfg: Any, model: nn.Module) -> tuple[str, str]:
    """(mode, dropout) of the Hessian: eval with --disable_dropout, else train with fixed dropout masks."""
    if cfg.disable_dropout:
        return "eval", "off"
    return "train", ("fixed" if has_dropout(model) else "off")


def chunk_size(cfg: Any) -> int:
    """Examples per chunk of the Hessian (the BatchNorm batch in train mode)."""
    return min(int(cfg.batch_size), int(cfg.physical_batch_size))


def lambda_max_record(model: nn.Module, X: torch.Tensor, y: torch.Tensor, cfg: Any,
                      progress: bool = False, tol: float = LAMBDA_TOL) -> dict:
    """λmax of the model on (X, y) under the run's protocol, as a JSON-ready record."""
    mode, dropout = measurement_modes(cfg, model)
    spec = hessian.top_eigenvalues(model, X, y, k=1, batch_size=chunk_size(cfg), mode=mode,
                                   dropout=dropout, tol=tol, seed=0, progress=progress)
    return {"value": spec.eigenvalues[0], "residual": spec.residuals[0], "matvecs": spec.matvecs,
            "converged": spec.converged, "tol": tol, "mode": mode, "dropout": dropout,
            "chunk_size": chunk_size(cfg), "abridged_size": len(y)}


def extra_iterate(model: nn.Module, data: Dataset, cfg: Any, device: torch.device) -> dict:
    """The state after one more training step from `model` (first minibatch of a fresh shuffle)."""
    twin = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(int(cfg.train_seed))
    idx = torch.randperm(len(data.y_train), generator=gen)[:int(cfg.batch_size)]
    X, y = data.X_train[idx].to(device), data.y_train[idx].to(device)
    optimizer = torch.optim.SGD(twin.parameters(), lr=float(cfg.lr))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(cfg.train_seed))
        if cfg.opt == "sam":
            sam_step(twin, optimizer, X, y, int(cfg.physical_batch_size), float(cfg.rho))
        else:
            sgd_step(twin, optimizer, X, y, int(cfg.physical_batch_size))
    return {k: v.detach().clone() for k, v in twin.state_dict().items()}


def interpolate(final: dict, extra: dict, alpha: float) -> dict:
    """(1 - alpha) * final + alpha * extra for floating-point entries; others from `final`."""
    return {k: ((1 - alpha) * v + alpha * extra[k]) if v.is_floating_point() else v.clone()
            for k, v in final.items()}


def between_iterates_record(model: nn.Module, extra_state: dict, X: torch.Tensor, y: torch.Tensor,
                            cfg: Any, progress: bool = False) -> dict:
    """λmax at 8 points from the final to the extra iterate; the record of the largest, all values kept."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    records = []
    for i in range(BETWEEN_POINTS):
        twin.load_state_dict(interpolate(final, extra_state, i / (BETWEEN_POINTS - 1)))
        records.append(lambda_max_record(twin, X, y, cfg, progress=progress))
    best = max(records, key=lambda r: r["value"])
    return {**best, "between_iterates": True,
            "between_values": [r["value"] for r in records],
            "between_residuals": [r["residual"] for r in records],
            "matvecs": sum(r["matvecs"] for r in records)}
