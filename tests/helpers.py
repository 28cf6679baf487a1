"""Test helpers: small nets and an independent dense Hessian (autograd.functional.hessian, float64)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def reference_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int,
                      train_mode: bool) -> torch.Tensor:
    """The dense Hessian of the chunked mean cross-entropy, written independently of the package."""
    twin = copy.deepcopy(model).double()
    twin.train(train_mode)
    names = [n for n, _ in twin.named_parameters()]
    shapes = [p.shape for _, p in twin.named_parameters()]
    buffers = {n: b.clone() for n, b in twin.named_buffers()}
    flat = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])

    def loss(w):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[offset:offset + s.numel()].view(s)
            offset += s.numel()
        total = 0.0
        for s in range(0, len(y), chunk):
            b = {n: t.clone() for n, t in buffers.items()}
            x = X[s:s + chunk]
            out = functional_call(twin, {**params, **b}, (x.double() if x.is_floating_point() else x,))
            total = total + F.cross_entropy(out, y[s:s + chunk], reduction="sum")
        return total / len(y)

    H = torch.autograd.functional.hessian(loss, flat)
    return (H + H.T) / 2


def mlp(p: float = 0.0, d: int = 12, h: int = 10, k: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, k))


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))


class ClassZeroQuadratic(nn.Module):
    """Adds K * |theta|^2 to the class-0 logit; with theta = 0 and labels 0 this is a saddle whose
    Hessian block is -2K(1 - p0) I: a large negative eigenvalue."""

    def __init__(self, k: int, K: float = 5.0):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3))
        self.k, self.K = k, K

    def forward(self, z):
        shift = self.K * (self.theta ** 2).sum()
        bump = torch.zeros_like(z)
        bump[:, 0] = 1.0
        return z + shift * bump


def saddle_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 3), ClassZeroQuadratic(3))


def data(n: int, shape: tuple, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, k, (n,), generator=g)


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
