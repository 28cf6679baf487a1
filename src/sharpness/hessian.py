"""Hessians of the training loss: exact Hessian-vector products and the spectrum computed from them.

The operator is the Hessian of the mean cross-entropy over (X, y), split into consecutive chunks of
`batch_size` examples. It works on a private copy of the model, so measuring never changes the model
(parameters, BatchNorm buffers, `training` flags) nor the global random state.

Hessian-vector products use double backward (`torch.autograd.grad` with `create_graph=True`, then a
second `grad`). `torch.func`'s `jvp(jacrev(f))` and `torch.func.hessian` are silently wrong through
train-mode BatchNorm in torch 2.14 (pytorch/pytorch#196699) and are not used. While the memory budget
allows, the first-order graph of each chunk is built once and every product reuses it; beyond it, the
graphs of the remaining chunks are rebuilt for every product. In the copy, every BatchNorm that
normalizes by batch statistics is replaced by the same computation written with `var_mean`, whose
double backward is cheaper than the native kernel's.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("train", "eval")
DROPOUT_MODES = ("off", "fixed")


class _FixedDropout(nn.Module):
    """Dropout whose mask depends only on (seed, chunk, layer): the same mask in every product.

    `keep_dims` leading dimensions of the input get their own draw and the rest share it:
    all of them for element-wise dropout, (N, C) or (C,) for the channel-wise Dropout1d/2d/3d.
    """

    def __init__(self, p: float, layer: int, state: dict, keep_dims=None):
        super().__init__()
        self.p, self.layer, self.state, self.keep_dims = p, layer, state, keep_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return x
        if self.p >= 1:  # every unit dropped (native dropout returns zeros, not 0/0)
            return x * 0.0
        gen = torch.Generator(device=x.device)
        gen.manual_seed(hash((self.state["seed"], self.state["chunk"], self.layer)) % (2 ** 63))
        kept = x.dim() if self.keep_dims is None else self.keep_dims(x.dim())
        shape = tuple(x.shape[:kept]) + (1,) * (x.dim() - kept)
        keep = torch.rand(shape, generator=gen, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


# Which leading dimensions of an input of rank d draw their own mask (the rest share it), as torch's
# dropout modules do: Dropout1d (N, C, L) or (C, L); Dropout2d (N, C, H, W) and, by torch's rule for
# 3-D inputs, (N, C, L); Dropout3d (N, C, D, H, W) or (C, D, H, W).
_MASK_DIMS = {
    nn.Dropout: None,
    nn.Dropout1d: lambda d: d - 1,
    nn.Dropout2d: lambda d: 2,
    nn.Dropout3d: lambda d: 2 if d == 5 else 1,
}


class _BatchStatNorm(nn.Module):
    """BatchNorm on the batch's own statistics (what a train-mode BatchNorm computes), buffer-free.

    The same function as the native kernel (equal to rounding), written as var_mean and a centred
    scaling because the double backward of this graph is cheaper than the native batch-norm double
    backward (a Hessian-vector product of VGG11-BN about 12% faster on CPU).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.numel() // x.shape[1] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)}")
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        out = (x - mean) * scale
        return out + self.bias.view(shape) if self.bias is not None else out


@contextlib.contextmanager
def no_tf32():
    """Full float32 precision in matmuls and convolutions (TF32 off) for the duration."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def default_memory_budget(device: torch.device) -> int:
    """Bytes the operator may keep for reused graphs: half the free GPU memory, a quarter of free RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", 8 << 30) * 0.25)
    except OSError:
        return 2 << 30


class HessianOperator:
    """The Hessian of the mean cross-entropy over (X, y) as a symmetric linear operator."""

    def __init__(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                 mode: str = "train", dropout: str = "off", dtype: torch.dtype | None = None,
                 seed: int = 0, memory_budget: int | None = None):
        _check_inputs(model, X, y, batch_size, mode, dropout)
        self.mode, self.dropout, self.seed, self.batch_size = mode, dropout, seed, int(batch_size)
        self.model, self._dropout_state = _measurement_copy(model, mode, dropout, dtype, seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
        self.y = y.to(self.device)
        self.n_examples = len(y)
        self.numel = sum(p.numel() for p in self.params)
        self.chunks = [(s, min(s + self.batch_size, self.n_examples))
                       for s in range(0, self.n_examples, self.batch_size)]
        self.matvecs = 0
        self.memory_budget = (default_memory_budget(self.device) if memory_budget is None
                              else int(memory_budget))
        self._graphs: list[tuple[torch.Tensor, ...]] | None = None  # cached first-order graphs
        self.graph_bytes_per_chunk = 0

    # -- the operator ---------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length `numel` (same device and dtype as the operator)."""
        if v.shape != (self.numel,):
            raise ValueError(f"vector of shape {tuple(v.shape)} given, operator has size {self.numel}")
        v = v.to(self.device, self.dtype)
        views = _split(v, self.params)
        out = torch.empty(self.numel, device=self.device, dtype=self.dtype)
        outs = _split(out, self.params)  # each chunk's product lands in place: no concatenation
        with no_tf32():
            if self._graphs is None:
                self._build_graphs()
            for i in range(len(self.chunks)):
                cached = i < len(self._graphs)
                grads = self._graphs[i] if cached else self._chunk_gradient(i, create_graph=True)
                _accumulate_hvp(grads, self.params, views, outs, first=i == 0, retain=cached)
        self.matvecs += 1
        return out

    __matmul__ = matvec

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss over all chunks (the values of the cached graphs where kept)."""
        total = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        with no_tf32():
            if self._graphs is None:
                self._build_graphs()
            for i in range(len(self.chunks)):
                grads = (self._graphs[i] if i < len(self._graphs)
                         else self._chunk_gradient(i, create_graph=False))
                total += torch.cat([g.detach().reshape(-1) for g in grads])
        return total

    def loss(self) -> float:
        """The mean cross-entropy over all examples."""
        total = 0.0
        with torch.no_grad(), no_tf32():
            for i, (s, e) in enumerate(self.chunks):
                total += float(self._chunk_loss(i, s, e))
        return total

    def release(self) -> None:
        """Free the cached graphs (they are rebuilt on the next product)."""
        self._graphs = None

    def as_linear_operator(self):
        """A scipy LinearOperator (float64 numpy vectors) over this operator."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().to(torch.float64).numpy()

        return LinearOperator((self.numel, self.numel), matvec=mv, dtype=np.float64)

    # -- internals ------------------------------------------------------------------------------
    def _chunk_loss(self, i: int, s: int, e: int) -> torch.Tensor:
        self._dropout_state["chunk"] = i
        out = self.model(self.X[s:e])
        return F.cross_entropy(out, self.y[s:e], reduction="sum") / self.n_examples

    def _chunk_gradient(self, i: int, create_graph: bool) -> tuple[torch.Tensor, ...]:
        s, e = self.chunks[i]
        with torch.enable_grad():
            loss = self._chunk_loss(i, s, e)
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        # a parameter the loss does not use has a zero gradient and a zero row of the Hessian
        return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params))

    def _build_graphs(self) -> None:
        """Keep the first-order graphs of as many chunks as the memory budget allows."""
        self._graphs = []
        if self.memory_budget <= 0:
            return
        grads, nbytes = _measured(lambda: self._chunk_gradient(0, create_graph=True))
        self.graph_bytes_per_chunk = nbytes
        keep = len(self.chunks) if nbytes == 0 else min(len(self.chunks), self.memory_budget // nbytes)
        if keep >= 1:
            self._graphs.append(grads)
        for i in range(1, keep):
            self._graphs.append(self._chunk_gradient(i, create_graph=True))


def _measured(fn):
    """Run fn and count the bytes of the tensors its autograd graph saves (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    grad_bytes = sum(g.numel() * g.element_size() for g in out)
    return out, sum(seen.values()) + grad_bytes


def _accumulate_hvp(grads, params, views, outs, first: bool, retain: bool) -> None:
    """Add (or, when first, write) one chunk's Hessian-vector product into the per-parameter views outs."""
    pairs = [(g, v) for g, v in zip(grads, views) if g.requires_grad]
    hv = (torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                              retain_graph=retain, allow_unused=True) if pairs else [None] * len(params))
    for h, o in zip(hv, outs):
        if h is None:
            if first:
                o.zero_()
        elif first:
            o.copy_(h)
        else:
            o.add_(h)


def _split(v: torch.Tensor, params) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(v[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _measurement_copy(model: nn.Module, mode: str, dropout: str, dtype, seed: int):
    """A copy of the model that computes the loss deterministically and updates nothing."""
    state = {"seed": seed, "chunk": 0}
    twin = copy.deepcopy(model)
    if dtype is not None:
        twin = twin.to(dtype)
    twin.eval()  # dropout off, BatchNorm on running statistics ...
    layer = 0
    for module in list(twin.modules()):
        if mode == "train" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            # ... unless train mode: batch statistics, with no buffers to update
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
        for name, child in list(module.named_children()):
            if _plain_batchnorm(child) and (
                    mode == "train" or (child.running_mean is None and child.running_var is None)):
                setattr(module, name, _BatchStatNorm(child))  # same function, cheaper second derivative
        if dropout == "fixed":
            for name, child in list(module.named_children()):
                if not isinstance(child, nn.modules.dropout._DropoutNd):
                    continue
                if type(child) not in _MASK_DIMS or child._forward_hooks or child._forward_pre_hooks:
                    raise ValueError(f"dropout='fixed' supports torch's Dropout, Dropout1d, Dropout2d and "
                                     f"Dropout3d; {type(child).__name__} is not supported (use "
                                     "dropout='off')")
                setattr(module, name, _FixedDropout(child.p, layer, state, _MASK_DIMS[type(child)]))
                layer += 1
    for p in twin.parameters():  # the Hessian is over the trainable parameters (requires_grad)
        p.grad = None
    return twin, state


def _plain_batchnorm(module: nn.Module) -> bool:
    """A torch BatchNorm1d/2d/3d itself (not a subclass that may compute more) without hooks."""
    return (type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks))


def _check_inputs(model, X, y, batch_size, mode, dropout) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
    if len(X) == 0:
        raise ValueError("no data: X is empty")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} examples but y has {len(y)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    if not any(p.requires_grad for p in params):
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise ValueError("the model has non-finite parameters (NaN or inf)")


# -- Lanczos ------------------------------------------------------------------------------------

@dataclass
class Spectrum:
    """Extreme eigenvalues with their relative residuals ||Hv - λv|| / |λ| and the cost."""

    eigenvalues: list[float]
    residuals: list[float]
    matvecs: int
    converged: bool
    eigenvectors: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class _Basis:
    """Orthonormal vectors kept as the rows of fixed-size blocks: growing never copies the basis."""

    BLOCK = 4

    def __init__(self, n: int, device, dtype):
        self.n, self.device, self.dtype = n, device, dtype
        self.blocks: list[torch.Tensor] = []
        self.m = 0

    def row(self, j: int) -> torch.Tensor:
        """The j-th basis vector (a view)."""
        return self.blocks[j // self.BLOCK][j % self.BLOCK]

    def _filled(self):
        for b, block in enumerate(self.blocks):
            rows = min(self.BLOCK, self.m - b * self.BLOCK)
            if rows > 0:
                yield b * self.BLOCK, block[:rows]

    def append(self, v: torch.Tensor) -> None:
        if self.m == len(self.blocks) * self.BLOCK:
            self.blocks.append(torch.empty((self.BLOCK, self.n), device=self.device, dtype=self.dtype))
        self.row(self.m).copy_(v)
        self.m += 1

    def _project_out(self, w: torch.Tensor) -> torch.Tensor:
        """Subtract from w (in place) its components along the basis; return them."""
        coeffs = [rows @ w for _, rows in self._filled()]
        for (_, rows), c in zip(self._filled(), coeffs):
            w.addmv_(rows.t(), c, alpha=-1)
        return torch.cat(coeffs)

    def orthogonalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w minus its projection on the basis (classical Gram-Schmidt twice), the coefficients, and
        the norm the first pass left (for Kahan's test in `_orthogonal_step`).

        The numbers stay on w's device; w itself is left unchanged.
        """
        w = w.clone()
        c = self._project_out(w)
        first = w.norm()
        return w, c + self._project_out(w), first

    def combinations(self, Y: np.ndarray) -> torch.Tensor:
        """The rows Y @ V (Y: p x m coefficients) as a new p x n tensor."""
        Yt = torch.as_tensor(np.ascontiguousarray(Y), device=self.device, dtype=self.dtype)
        out = torch.zeros((Yt.shape[0], self.n), device=self.device, dtype=self.dtype)
        for start, rows in self._filled():
            out.addmm_(Yt[:, start:start + len(rows)], rows)
        return out

    def restart(self, Y: np.ndarray) -> None:
        """Replace the basis by the p rows Y @ V."""
        new = self.combinations(Y)
        self.m = 0
        for v in new:
            self.append(v)


def _random_unit(n: int, gen: torch.Generator, device, dtype) -> torch.Tensor:
    v = torch.randn(n, generator=gen, dtype=torch.float32).to(device, dtype)  # float32: 4x faster to draw
    return v / v.norm()


class NonFiniteError(ValueError):
    """A Hessian-vector product with NaN or infinite entries."""


def _orthogonal_step(basis: _Basis, w: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, float, bool]:
    """Orthogonalize w against the basis (two passes): w, the coefficients, the norm left, and whether
    w lies in the basis to working precision; the numbers reach the host in one transfer.

    Kahan's rule: when the second pass still removes half of what the first left, that remainder is
    rounding error of the first pass, not a direction; normalizing it would break orthogonality.
    """
    w, c, first = basis.orthogonalize(w)
    host = torch.cat([c, first.reshape(1), w.norm().reshape(1)]).double().cpu().numpy()
    if not np.isfinite(host).all():  # NaN or inf anywhere in w reaches these numbers
        raise NonFiniteError("a Hessian-vector product is not finite (NaN or inf): the loss surface "
                             "overflows at these parameters")
    return w, host[:-2], float(host[-1]), bool(host[-1] <= 0.5 * host[-2])


def _check_k_tol(k: int, tol: float) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < tol < 1:  # a relative residual of 1 or more accepts any start vector
        raise ValueError(f"tol must be > 0 and < 1, got {tol}")


def lanczos(matvec, n: int, *, k: int = 1, which: str = "LA", tol: float = 1e-3,
            max_matvecs: int = 500, seed: int = 0, device=None, dtype=torch.float32,
            max_basis: int | None = None, eigenvectors: bool = False,
            start: torch.Tensor | None = None, block: int | None = None) -> Spectrum:
    """k extreme eigenvalues (LA: largest, SA: smallest algebraic) of a symmetric operator.

    Band Lanczos with full reorthogonalization and thick restarts: `block` start vectors (default k)
    grow the Krylov space together, so an eigenvalue repeated up to `block` times is found as often
    (one start vector finds one copy of each). It stops when every wanted Ritz value has a relative
    residual ||Hv - λv|| / |λ| below `tol` (for |λ| below eps^(2/3) times the largest |Ritz value|,
    relative to that floor instead). After a thick restart in low precision, whose bookkeeping can
    drift from the true products, and whenever tol·|λ| comes within a thousand rounding units of the
    largest eigenvalue, converged Ritz vectors are multiplied once more and their true residuals
    decide (and are reported); a failed check restarts the search from them, three checks at most.
    The first start vector is `start` when given (any nonzero vector), the others are random
    vectors drawn from `seed`; a residual shows that λ is an eigenvalue, not the largest, so a start
    vector that is an eigenvector can end the search at its own eigenvalue. `max_matvecs` bounds the
    search; a check may add `block` products.
    """
    _check_k_tol(k, tol)
    if k > n:
        raise ValueError(f"k={k} exceeds the operator size {n}")
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    width = min(n, k if block is None else int(block))
    if width < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if max_matvecs < max(k, width):
        raise ValueError(f"max_matvecs must be at least k and the block ({max(k, width)}), got {max_matvecs}")
    # room for several new vectors between restarts, also when the band is wide
    max_basis = min(n, max(max_basis or max(2 * k + 30, 40) + 2 * (width - 1), k + 2 * width + 1))
    gen = torch.Generator().manual_seed(seed)
    floor = torch.finfo(dtype).eps ** (2 / 3)
    basis = _basis_start(n, gen, device, dtype, start, width)
    T = np.zeros((max_basis + 1, max_basis + 1))  # V^T H V; column j is known once v_j is multiplied
    p, matvecs, converged = 0, 0, False  # rows 0..p-1 of the basis are multiplied, the rest wait
    restarted, checks = False, 0
    eps = torch.finfo(dtype).eps
    pending: list[torch.Tensor] = []  # products already known for the next rows (after a failed check)
    while True:
        if pending:
            w = pending.pop(0)
        else:
            w = matvec(basis.row(p))
            matvecs += 1
        m = basis.m
        w, c, beta, dependent = _orthogonal_step(basis, w)
        T[:m, p] = c
        T[p, :m] = c
        theta, S = np.linalg.eigh(T[:p + 1, :p + 1])
        full = m == n  # nothing is left outside the basis
        if not full and (dependent or beta <= 1e-12 * max(np.abs(theta).max(), 1e-30)):
            # H v_p lies in the basis: continue from a fresh direction (no coupling to the others)
            w = basis.orthogonalize(_random_unit(n, gen, device, dtype))[0]
            w, beta_new = w / w.norm(), 0.0
        else:
            beta_new = beta
            if not full:
                w = w / beta
        T[m, p] = T[p, m] = beta_new if not full else 0.0
        p += 1
        order = np.argsort(-theta) if which == "LA" else np.argsort(theta)
        idx = order[:k]
        # residual of a Ritz vector V_p s: the part of H V_p s outside V_p, T[p:m+1, :p] s (orthonormal V)
        scale = _scale(theta, idx, floor)
        rel = np.linalg.norm(T[p:m + 1, :p] @ S[:, idx], axis=0) / scale
        # every start vector multiplied first (a residual says λ is an eigenvalue, not the largest: a
        # start vector that is an eigenvector ends the search if no other Ritz value beats it)
        exact = full and p == m
        if len(idx) == k and p >= width and not pending and (np.all(rel < tol) or exact):
            # restarted bookkeeping drifts by about a hundred rounding units of the largest eigenvalue
            # (measured), which matters when tol·|λ| is within 1e5 of them (float32: 1.2e-2·λmax);
            # within 1e3, any bookkeeping may be finer than the products themselves
            units = tol * scale / (eps * max(np.abs(theta).max(), 1e-300))
            drift = (restarted or checks) and np.any(units < 1e5)
            if not (drift or np.any(units < 1e3)):  # a full basis too: its products carry rounding
                converged = True
                break
            # a restarted bookkeeping (or one after a failed check), or a residual near the rounding
            # of the products, says converged: the true residuals of fresh products decide
            U, W, rel = _checked(matvec, basis, theta, S, order[:width], p, floor)
            matvecs += width
            rel = rel[:k]
            checks += 1
            if np.all(rel < tol):
                converged = True
                break
            if checks == 3 or matvecs >= max_matvecs:
                break
            # restart from the Ritz vectors, whose products are known: fresh, exact bookkeeping
            basis = _Basis(n, device, dtype)
            for u in U:
                basis.append(u)
            pending = list(W)
            T[:] = 0.0
            p, restarted = 0, False
            continue
        if matvecs >= max_matvecs:
            break
        if full:
            continue
        if m == max_basis:  # thick restart: the best Ritz vectors, the waiting rows, the new direction
            keep = order[:min(p - 1, max(k + 10, max_basis // 2))]
            waiting = m - p
            Y = np.zeros((len(keep) + waiting, m))
            Y[:len(keep), :p] = S[:, keep].T
            Y[len(keep):, p:] = np.eye(waiting)
            coupling = T[p:m + 1, :p] @ S[:, keep]  # waiting rows and the new one, against the kept vectors
            basis.restart(Y)
            T[:] = 0.0
            q = len(keep)
            T[np.arange(q), np.arange(q)] = theta[keep]
            T[q:q + waiting + 1, :q] = coupling
            T[:q, q:q + waiting + 1] = coupling.T
            p, restarted = q, True
        basis.append(w)
    Y = np.zeros((len(idx), basis.m))
    Y[:, :p] = S[:, idx].T
    vectors = basis.combinations(Y) if eigenvectors else None
    if not converged:
        why, bits = "", torch.finfo(dtype).bits
        near_zero = np.all(np.abs(theta[idx]) <= floor * np.abs(theta).max())  # all within the floor
        if near_zero and tol * floor < 100 * eps:  # a residual finer than rounding at zero
            why = f": within eps^(2/3)·λmax of zero, a residual this small is finer than {bits}-bit products resolve"
        elif checks == 3:  # the third check failed
            why = f": fresh products kept the true residuals above tol; {bits}-bit products do not resolve more"
        if why and dtype != torch.float64:
            why += " (dtype=torch.float64 does)"
        warnings.warn(f"Lanczos did not converge in {matvecs} Hessian-vector products: relative "
                      f"residuals {', '.join(f'{r:.2e}' for r in rel)} > tol {tol:g}{why}", RuntimeWarning,
                      stacklevel=_caller_level())
    return Spectrum([float(x) for x in theta[idx]], [float(r) for r in rel], matvecs, converged, vectors,
                    extra={"block": width, "residuals_checked": checks})


def _checked(matvec, basis: _Basis, theta: np.ndarray, S: np.ndarray, sel: np.ndarray, p: int,
             floor: float) -> tuple[torch.Tensor, list[torch.Tensor], np.ndarray]:
    """The Ritz vectors `sel` (rows), their fresh products, and their true relative residuals."""
    Y = np.zeros((len(sel), basis.m))
    Y[:, :p] = S[:, sel].T
    U = basis.combinations(Y)
    W = [matvec(u) for u in U]
    true = torch.stack([(w - float(theta[j]) * u).norm() for w, u, j in zip(W, U, sel)])
    return U, W, true.double().cpu().numpy() / _scale(theta, sel, floor)


def _scale(theta: np.ndarray, sel: np.ndarray, floor: float) -> np.ndarray:
    """What residuals of the Ritz values `sel` are relative to: |λ|, or floor·max|θ| if larger."""
    return np.maximum(np.maximum(np.abs(theta[sel]), floor * np.abs(theta).max()), 1e-30)


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside this module (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _basis_start(n, gen, device, dtype, start: torch.Tensor | None = None, width: int = 1) -> _Basis:
    """An orthonormal basis of `width` start vectors: `start` (or a random one), then random ones."""
    basis = _Basis(n, device, dtype)
    if start is not None and tuple(start.shape) != (n,):
        raise ValueError(f"the start vector has shape {tuple(start.shape)}, the operator size is {n}")
    v = _random_unit(n, gen, device, dtype) if start is None else start.to(device, dtype)
    norm = float(v.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("the start vector must be finite and nonzero")
    basis.append(v / norm)
    while basis.m < width:
        w = basis.orthogonalize(_random_unit(n, gen, device, dtype))[0]
        basis.append(w / w.norm())
    return basis


def lanczos_tridiagonal(matvec, v0: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and squared first components of their vectors after `steps` Lanczos steps from v0."""
    basis = _Basis(len(v0), v0.device, v0.dtype)
    basis.append(v0 / v0.norm())
    T = np.zeros((steps, steps))
    for j in range(steps):
        w, c, beta, dependent = _orthogonal_step(basis, matvec(basis.row(j)))
        T[:j + 1, j] = c
        T[j, :j + 1] = c
        if j + 1 == steps or dependent or beta <= 1e-12 * max(np.abs(np.diag(T)).max(), 1e-30):
            break
        basis.append(w / beta)
    m = basis.m
    theta, S = np.linalg.eigh(T[:m, :m])
    return theta, S[0] ** 2


# -- public functions ---------------------------------------------------------------------------

def top_eigenvalues(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int = 1, *,
                    batch_size: int = 1000, mode: str = "train", dropout: str = "off",
                    tol: float = 1e-3, max_matvecs: int = 500, seed: int = 0,
                    eigenvectors: bool = False, dtype: torch.dtype | None = None,
                    memory_budget: int | None = None, progress: bool = False,
                    block: int | None = None) -> Spectrum:
    """The k largest algebraic eigenvalues of the loss Hessian, descending, with residuals."""
    return _extreme(model, X, y, k, "LA", batch_size, mode, dropout, tol, max_matvecs, seed,
                    eigenvectors, dtype, memory_budget, progress, block)


def bottom_eigenvalues(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int = 1, *,
                       batch_size: int = 1000, mode: str = "train", dropout: str = "off",
                       tol: float = 1e-3, max_matvecs: int = 500, seed: int = 0,
                       eigenvectors: bool = False, dtype: torch.dtype | None = None,
                       memory_budget: int | None = None, progress: bool = False,
                       block: int | None = None) -> Spectrum:
    """The k smallest algebraic eigenvalues, ascending, with residuals."""
    return _extreme(model, X, y, k, "SA", batch_size, mode, dropout, tol, max_matvecs, seed,
                    eigenvectors, dtype, memory_budget, progress, block)


def _extreme(model, X, y, k, which, batch_size, mode, dropout, tol, max_matvecs, seed,
             eigenvectors, dtype, memory_budget, progress=False, block=None) -> Spectrum:
    _check_k_tol(k, tol)
    op = HessianOperator(model, X, y, batch_size=batch_size, mode=mode, dropout=dropout,
                         dtype=dtype, seed=seed, memory_budget=memory_budget)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="Hessian-vector products", unit="HVP", leave=False, dynamic_ncols=True,
                   disable=None)  # no bar when stderr is not a terminal (logs stay clean)

    def matvec(v):
        out = op.matvec(v)
        if bar is not None:
            bar.update(1)
        return out

    try:
        start = _gradient_start(op, seed) if which == "LA" else None
        spec = lanczos(matvec, op.numel, k=k, which=which, tol=tol, max_matvecs=max_matvecs,
                       seed=seed, device=op.device, dtype=op.dtype, eigenvectors=eigenvectors,
                       start=start, block=block)
    finally:
        if bar is not None:
            bar.close()
    spec.extra.update(chunk_size=op.batch_size, chunks=len(op.chunks), n_examples=op.n_examples,
                      graph_reuse_chunks=len(op._graphs or []), mode=mode, dropout=dropout)
    return spec


def _gradient_start(op: HessianOperator, seed: int) -> torch.Tensor:
    """Start vector for the top eigenvalues: the unit gradient plus an independent random unit vector.

    The loss gradient lies mostly in the top eigenspace of the Hessian (Gur-Ari et al., 2018), so it
    shortens the Krylov search (11 instead of 13 products on VGG11-BN, 8 instead of 8-10 on the MLP);
    it comes free from the first-order graphs that the products reuse. The random half keeps every
    eigenvector's share at least 1/sqrt(2) of a random start's, so a gradient that misses the top
    eigenvector costs at most a fraction of a product, never a wrong answer.
    """
    gen = torch.Generator().manual_seed(seed)
    r = _random_unit(op.numel, gen, op.device, op.dtype)
    g = op.gradient()
    norm = float(g.norm())
    return r + g / norm if math.isfinite(norm) and norm > 0 else r


def lambda_max(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    """The largest algebraic eigenvalue of the loss Hessian."""
    return top_eigenvalues(model, X, y, k=1, **kwargs).eigenvalues[0]


def lambda_min(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    """The smallest algebraic eigenvalue (most negative curvature) of the loss Hessian."""
    return bottom_eigenvalues(model, X, y, k=1, **kwargs).eigenvalues[0]


def hessian_trace(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, samples: int = 100,
                  seed: int = 0, batch_size: int = 1000, mode: str = "train", dropout: str = "off",
                  dtype: torch.dtype | None = None,
                  memory_budget: int | None = None) -> tuple[float, float]:
    """Hutchinson's estimate of the Hessian trace (Rademacher probes) and its standard error."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a standard error, got {samples}")
    op = HessianOperator(model, X, y, batch_size=batch_size, mode=mode, dropout=dropout,
                         dtype=dtype, seed=seed, memory_budget=memory_budget)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        z = (torch.randint(0, 2, (op.numel,), generator=gen) * 2 - 1).to(op.device, op.dtype)
        values.append(float(z @ op.matvec(z)))
    vals = np.array(values)
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(samples))


@dataclass
class Density:
    """A smoothed spectral density: `density` on `grid` integrates to 1; the quadrature behind it."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    matvecs: int


def spectral_density(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *,
                     lanczos_steps: int = 80, runs: int = 1, seed: int = 0,
                     batch_size: int = 1000, mode: str = "train", dropout: str = "off",
                     grid_points: int = 1000, sigma: float | None = None,
                     dtype: torch.dtype | None = None, memory_budget: int | None = None) -> Density:
    """Stochastic Lanczos quadrature: the eigenvalue density, Gaussian-smoothed, averaged over runs.

    sigma (the Gaussian width) defaults to 1% of the spectrum's range.
    """
    if lanczos_steps < 1 or runs < 1:
        raise ValueError("lanczos_steps and runs must be >= 1")
    op = HessianOperator(model, X, y, batch_size=batch_size, mode=mode, dropout=dropout,
                         dtype=dtype, seed=seed, memory_budget=memory_budget)
    gen = torch.Generator().manual_seed(seed)
    steps = min(lanczos_steps, op.numel)
    nodes, weights = [], []
    for _ in range(runs):
        theta, w = lanczos_tridiagonal(op.matvec, _random_unit(op.numel, gen, op.device, op.dtype), steps)
        nodes.append(theta)
        weights.append(w / runs)
    nodes_a, weights_a = np.concatenate(nodes), np.concatenate(weights)
    grid, density, sigma = smoothed_density(nodes_a, weights_a, sigma, grid_points)
    return Density(grid, density, nodes_a, weights_a, sigma, op.matvecs)


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None,
                     grid_points: int = 1000) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-smoothed density of point masses (grid, density, sigma); it integrates to sum(weights).

    sigma defaults to 1% of the range of the nodes; the grid is refined to resolve it.
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0))
    sigma = float(sigma) if sigma else 0.01 * width
    points = min(max(grid_points, math.ceil(8 * (width + 12 * sigma) / sigma)), 1_000_000)
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, points)
    density = np.zeros_like(grid)
    for start in range(0, len(nodes), 256):  # bounded memory for long quadratures
        z = (grid[:, None] - nodes[None, start:start + 256]) / sigma
        density += np.exp(-0.5 * z ** 2) @ weights[start:start + 256]
    return grid, density / (sigma * math.sqrt(2 * math.pi)), sigma


def check_hvp(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
              mode: str = "train", dropout: str = "off", dtype: torch.dtype = torch.float64,
              eps: float = 1e-5, seed: int = 0) -> float:
    """Relative error of the Hessian-vector product against central finite differences of the gradient."""
    op = HessianOperator(model, X, y, batch_size=batch_size, mode=mode, dropout=dropout,
                         dtype=dtype, seed=seed, memory_budget=0)
    gen = torch.Generator().manual_seed(seed)
    v = _random_unit(op.numel, gen, op.device, op.dtype)
    hv = op.matvec(v)
    views = _split(v, op.params)

    def shifted_gradient(sign: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(op.params, views):
                p.add_(sign * eps * d)
        try:
            return op.gradient()
        finally:
            with torch.no_grad():
                for p, d in zip(op.params, views):
                    p.sub_(sign * eps * d)

    fd = (shifted_gradient(1.0) - shifted_gradient(-1.0)) / (2 * eps)
    return float((hv - fd).norm() / max(float(hv.norm()), 1e-30))
