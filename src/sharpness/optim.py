"""One optimisation step: plain SGD or SAM, on a minibatch split into physical chunks."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def accumulate_gradients(model: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int,
                         autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Add to .grad the gradient of the mean cross-entropy over (X, y), in chunks; return the loss."""
    n = len(y)
    total = None
    for s in range(0, n, chunk):
        with autocast or contextlib.nullcontext():
            out = model(X[s:s + chunk])
        if n <= chunk:  # one chunk: the plain mean (bit-identical to sum / n, two autograd nodes fewer)
            loss = F.cross_entropy(out.float(), y)
        else:
            loss = F.cross_entropy(out.float(), y[s:s + chunk], reduction="sum") / n
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's ascent step e = rho * g / (||g|| + 1e-12), with the global L2 norm over all tensors."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    return [g * scale for g in grads]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Restore every BatchNorm buffer (running mean/var, batch count) on exit."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
             chunk: int, autocast=None) -> torch.Tensor:
    """One SGD step on the minibatch; returns its loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, X, y, chunk, autocast)
    optimizer.step()
    return loss


def sam_step(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
             chunk: int, rho: float, autocast=None) -> torch.Tensor:
    """One SAM step: gradient at w + e(w) on the same minibatch, applied at w; returns the loss at w.

    BatchNorm running statistics are updated by the first forward pass only.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, X, y, chunk, autocast)
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        for p, e in zip(params, sam_perturbation([p.grad for p in params], rho)):
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    with frozen_batchnorm_stats(model):
        accumulate_gradients(model, X, y, chunk, autocast)
    with torch.no_grad():
        for p, w in zip(params, originals):
            p.copy_(w)
    optimizer.step()
    return loss
