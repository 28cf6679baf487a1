"""The Hessian engine against dense float64 Hessians (eigvalsh) on small nets."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from helpers import conv_bn, data, mlp, reference_hessian, saddle_net, same_state, state_snapshot
from sharpness import hessian as H

F64 = torch.float64


def cases():
    """(name, model, X, y, chunk, mode, dropout, reference train_mode)."""
    X, y = data(37, (12,), 4)
    Xc, yc = data(23, (1, 4, 4), 4)  # chunks of 10, 10 and 3: an uneven last chunk
    Xs, ys = data(30, (6,), 3)
    ys = torch.zeros_like(ys)
    return [
        ("mlp", mlp(), X, y, 16, "train", "off", False),
        ("mlp_dropout_eval", mlp(0.5), X, y, 16, "eval", "off", False),
        ("conv_bn_train", conv_bn(), Xc, yc, 10, "train", "off", True),
        ("conv_bn_eval", conv_bn(), Xc, yc, 10, "eval", "off", False),
        ("saddle", saddle_net(), Xs, ys, 8, "train", "off", False),
    ]


@pytest.fixture(scope="module")
def dense():
    out = {}
    for name, model, X, y, chunk, mode, dropout, train_mode in cases():
        if name == "conv_bn_eval":  # give the running statistics non-trivial values first
            with torch.no_grad():
                model.train()(X)
        ev = torch.linalg.eigvalsh(reference_hessian(model, X, y, chunk, train_mode))
        out[name] = (model, X, y, chunk, mode, dropout, ev)
    return out


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_top_eigenvalues_match_dense(dense, name):
    model, X, y, chunk, mode, dropout, ev = dense[name]
    spec = H.top_eigenvalues(model, X, y, k=3, batch_size=chunk, mode=mode, dropout=dropout,
                             tol=1e-6, dtype=F64)
    assert spec.converged and len(spec.eigenvalues) == len(spec.residuals) == 3
    expected = ev.flip(0)[:3].tolist()
    for got, want in zip(spec.eigenvalues, expected):
        assert abs(got - want) / abs(want) < 1e-4, (name, spec.eigenvalues, expected)
    assert all(r < 1e-6 for r in spec.residuals)
    assert spec.eigenvalues == sorted(spec.eigenvalues, reverse=True)


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_lambda_min_matches_dense(dense, name):
    model, X, y, chunk, mode, dropout, ev = dense[name]
    got = H.lambda_min(model, X, y, batch_size=chunk, mode=mode, dropout=dropout, tol=1e-6, dtype=F64)
    assert abs(got - ev[0].item()) <= 1e-4 * ev.abs().max().item()


def test_largest_algebraic_not_magnitude(dense):
    model, X, y, chunk, mode, dropout, ev = dense["saddle"]
    assert ev[0] < -2 * ev[-1] < 0, "the test net must have a dominant negative eigenvalue"
    got = H.lambda_max(model, X, y, batch_size=chunk, tol=1e-6, dtype=F64)
    assert abs(got - ev[-1].item()) / ev[-1].item() < 1e-4


def test_float32_default_path(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    spec = H.top_eigenvalues(model, X, y, batch_size=chunk, mode=mode, tol=1e-3)
    assert spec.converged and spec.residuals[0] < 1e-3
    assert abs(spec.eigenvalues[0] - ev[-1].item()) / ev[-1].item() < 1e-3


def test_reported_residual_is_true_residual(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    spec = H.top_eigenvalues(model, X, y, k=2, batch_size=chunk, mode=mode, tol=1e-2, dtype=F64,
                             eigenvectors=True)
    op = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode, dtype=F64)
    for lam, res, v in zip(spec.eigenvalues, spec.residuals, spec.eigenvectors):
        assert abs(float(v.norm()) - 1) < 1e-8
        true = float((op.matvec(v) - lam * v).norm()) / abs(lam)
        assert true == pytest.approx(res, rel=1e-3, abs=1e-9)


def test_graph_reuse_and_recompute_agree(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    cached = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode, dtype=F64)
    fresh = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode, dtype=F64, memory_budget=0)
    partial = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode, dtype=F64, memory_budget=1)
    a, b = cached.matvec(v), fresh.matvec(v)
    assert len(cached._graphs) == 3 and len(fresh._graphs) == 0
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    partial.memory_budget = partial.graph_bytes_per_chunk = 0
    partial.release()
    partial.memory_budget = 1 + _one_chunk_bytes(model, X, y, chunk, mode)
    assert torch.allclose(partial.matvec(v), a, rtol=1e-12, atol=1e-14)
    assert len(partial._graphs) == 1  # budget for one chunk: one cached, two recomputed


def _one_chunk_bytes(model, X, y, chunk, mode):
    op = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode, dtype=F64)
    op.matvec(torch.zeros(op.numel, dtype=F64))
    return op.graph_bytes_per_chunk


@pytest.mark.parametrize("name", ["mlp", "conv_bn_train", "conv_bn_eval", "saddle"])
def test_check_hvp(dense, name):
    model, X, y, chunk, mode, dropout, ev = dense[name]
    assert H.check_hvp(model, X, y, batch_size=chunk, mode=mode, dropout=dropout) < 1e-4


def test_check_hvp_sees_a_wrong_product(dense, monkeypatch):
    model, X, y, chunk, mode, dropout, ev = dense["mlp"]
    real = H.HessianOperator.matvec
    monkeypatch.setattr(H.HessianOperator, "matvec", lambda self, v: 1.01 * real(self, v))
    assert 5e-3 < H.check_hvp(model, X, y, batch_size=chunk) < 2e-2


def test_fixed_dropout_is_a_fixed_operator():
    model = mlp(0.5)
    X, y = data(37, (12,), 4)
    op = H.HessianOperator(model, X, y, batch_size=16, dropout="fixed", seed=3, dtype=F64)
    v = torch.randn(op.numel, dtype=F64)
    assert torch.equal(op.matvec(v), op.matvec(v))
    other = H.HessianOperator(model, X, y, batch_size=16, dropout="fixed", seed=3, dtype=F64,
                              memory_budget=0)
    assert torch.equal(op.matvec(v), other.matvec(v))  # masks depend on (seed, chunk, layer) only
    off = H.HessianOperator(model, X, y, batch_size=16, dropout="off", dtype=F64)
    assert not torch.allclose(op.matvec(v), off.matvec(v))  # the masks do act
    assert H.check_hvp(model, X, y, batch_size=16, dropout="fixed") < 1e-4
    # λmax of the fixed-mask operator equals the top of its own dense matrix
    dense_op = torch.stack([op.matvec(e) for e in torch.eye(op.numel, dtype=F64)], 1)
    top = torch.linalg.eigvalsh((dense_op + dense_op.T) / 2)[-1].item()
    got = H.lambda_max(model, X, y, batch_size=16, dropout="fixed", seed=3, tol=1e-6, dtype=F64)
    assert abs(got - top) / top < 1e-4


def test_train_mode_dropout_would_be_random():
    """Why dropout must be off or fixed: two products through live dropout differ."""
    model = mlp(0.5).train()
    X, y = data(37, (12,), 4)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def hvp():
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(X), y), params, create_graph=True)
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, v)])

    assert not torch.allclose(hvp(), hvp())


def test_no_side_effects(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_eval"]
    model.train()
    before, rng = state_snapshot(model), torch.get_rng_state()
    flags = [m.training for m in model.modules()]
    H.top_eigenvalues(model, X, y, k=2, batch_size=chunk, mode="train", tol=1e-4)
    H.hessian_trace(model, X, y, batch_size=chunk, samples=4)
    H.spectral_density(model, X, y, batch_size=chunk, lanczos_steps=10)
    H.check_hvp(model, X, y, batch_size=chunk)
    assert same_state(before, state_snapshot(model))  # BN running stats and num_batches_tracked too
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_matvec_deterministic(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    op = H.HessianOperator(model, X, y, batch_size=chunk, mode=mode)
    v = torch.randn(op.numel)
    assert torch.equal(op.matvec(v), op.matvec(v))
    assert op.matvecs == 2


def test_uneven_chunks_weighted_exactly():
    """Chunked operator == unchunked operator in eval mode (no BN batch effect)."""
    model = mlp()
    X, y = data(37, (12,), 4)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    a = H.HessianOperator(model, X, y, batch_size=10, dtype=F64).matvec(v)
    b = H.HessianOperator(model, X, y, batch_size=37, dtype=F64).matvec(v)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_trace_within_three_standard_errors(dense):
    for name in ("mlp", "conv_bn_train"):
        model, X, y, chunk, mode, dropout, ev = dense[name]
        est, se = H.hessian_trace(model, X, y, batch_size=chunk, mode=mode, samples=200, dtype=F64)
        assert abs(est - ev.sum().item()) < 3 * se, (name, est, se, ev.sum().item())
        # the standard error is that of a mean of 200 Rademacher probes: Var(z'Hz) = 2 (||H||_F^2 - sum H_ii^2)
        dense_h = reference_hessian(model, X, y, chunk, mode == "train" and name == "conv_bn_train")
        var = 2 * (float((dense_h ** 2).sum()) - float((dense_h.diagonal() ** 2).sum()))
        assert 0.7 < se / math.sqrt(var / 200) < 1.3, (name, se, math.sqrt(var / 200))


def test_spectral_density(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    n = len(ev)
    d = H.spectral_density(model, X, y, batch_size=chunk, mode=mode, lanczos_steps=n, runs=8,
                           dtype=F64, sigma=1e-3)
    assert abs(np.trapezoid(d.density, d.grid) - 1) < 1e-3
    assert abs(d.weights.sum() - 1) < 1e-9
    # with n steps the quadrature nodes are the eigenvalues themselves
    assert abs(d.nodes.max() - ev[-1].item()) < 1e-6 * ev.abs().max().item()
    # mass is where the eigenvalues are: compare CDFs at the quartiles of the dense spectrum
    evn = ev.numpy()
    for q in (0.25, 0.5, 0.75):
        x = float(np.quantile(evn, q)) + 1e-9
        est = float(d.weights[d.nodes <= x].sum())
        assert abs(est - float((evn <= x).mean())) < 0.12, (q, est)


def test_not_converged_warns(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    with pytest.warns(RuntimeWarning, match="did not converge"):
        spec = H.top_eigenvalues(model, X, y, k=3, batch_size=chunk, tol=1e-12, max_matvecs=4, dtype=F64)
    assert not spec.converged and spec.matvecs == 4


def test_thick_restart_reaches_tolerance(dense):
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_train"]
    spec = H.top_eigenvalues(model, X, y, k=4, batch_size=chunk, tol=1e-8, dtype=F64)
    op = H.HessianOperator(model, X, y, batch_size=chunk, dtype=F64)
    restarted = H.lanczos(op.matvec, op.numel, k=4, tol=1e-8, dtype=F64, max_basis=12)
    assert restarted.converged
    assert np.allclose(restarted.eigenvalues, spec.eigenvalues, rtol=1e-6)
    assert np.allclose(restarted.eigenvalues, ev.flip(0)[:4].numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be"),
    (dict(tol=0.0), "tol must be"),
    (dict(tol=-1.0), "tol must be"),
    (dict(tol=1.0), "tol must be"),
    (dict(tol=math.inf), "tol must be"),
    (dict(tol=math.nan), "tol must be"),
    (dict(batch_size=0), "batch_size"),
    (dict(mode="bogus"), "mode"),
    (dict(dropout="random"), "dropout"),
])
def test_bad_arguments(kwargs, message):
    X, y = data(10, (12,), 4)
    with pytest.raises(ValueError, match=message):
        H.top_eigenvalues(mlp(), X, y, **{"batch_size": 5, **kwargs})


def test_bad_data_and_parameters():
    X, y = data(10, (12,), 4)
    with pytest.raises(ValueError, match="empty"):
        H.lambda_max(mlp(), X[:0], y[:0])
    with pytest.raises(ValueError, match="examples"):
        H.lambda_max(mlp(), X, y[:5])
    model = mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        H.lambda_max(model, X, y)
    with pytest.raises(ValueError, match="samples"):
        H.hessian_trace(mlp(), X, y, samples=1)


def test_no_tf32_context_restores_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with H.no_tf32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_no_warning_when_converged(dense):
    model, X, y, chunk, mode, dropout, ev = dense["mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H.lambda_max(model, X, y, batch_size=chunk, tol=1e-6, dtype=F64)


def test_lanczos_start_vector():
    """A given start vector is used: an exact eigenvector converges in one product; zero is refused."""
    A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -2.0], dtype=F64))
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    spec = H.lanczos(lambda v: A @ v, 4, tol=1e-10, dtype=F64, start=3 * e0)
    assert spec.matvecs == 1 and spec.eigenvalues == [5.0]
    with pytest.raises(ValueError, match="start vector"):
        H.lanczos(lambda v: A @ v, 4, dtype=F64, start=torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="start vector has shape"):
        H.lanczos(lambda v: A @ v, 4, dtype=F64, start=torch.ones(5, dtype=F64))


def test_lanczos_leaves_matvec_output_alone():
    """An operator may return a tensor it keeps (the identity returns its input; a cache its entry)."""
    spec = H.lanczos(lambda v: v, 20, k=2, tol=1e-8, dtype=F64, eigenvectors=True)
    assert spec.converged and np.allclose(spec.eigenvalues, [1.0, 1.0])
    assert torch.allclose(spec.eigenvectors.norm(dim=1), torch.ones(2, dtype=F64))
    A = torch.diag(torch.linspace(1, 2, 30, dtype=F64))
    returned = []

    def kept(v):
        out = A @ v
        returned.append((out, out.clone()))
        return out

    spec = H.lanczos(kept, 30, tol=1e-8, dtype=F64)
    assert spec.converged and abs(spec.eigenvalues[0] - 2.0) < 1e-8
    assert all(torch.equal(out, copy) for out, copy in returned)


@pytest.mark.parametrize("shape, affine", [((6, 5), True), ((6, 5, 3), False), ((3, 4, 2, 2), True)])
def test_batch_statistics_norm_is_train_mode_batchnorm(shape, affine):
    """The measured copy's batch-statistics BatchNorm computes what a train-mode BatchNorm computes."""
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](
        shape[1], affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(shape, dtype=F64) * 3 + 2
    assert torch.allclose(H._BatchStatNorm(bn)(x), bn.train()(x), rtol=1e-12, atol=1e-12)
    if len(shape) == 2:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            H._BatchStatNorm(bn)(x[:1])


def test_eval_mode_keeps_running_statistics(dense):
    """In eval mode BatchNorm is the affine map of its running statistics, so it is not replaced."""
    model, X, y, chunk, mode, dropout, ev = dense["conv_bn_eval"]
    op = H.HessianOperator(model, X, y, batch_size=chunk, mode="eval")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in op.model.modules())
    op = H.HessianOperator(model, X, y, batch_size=chunk, mode="train")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in op.model.modules())


def test_batchnorm_subclass_and_hooked_batchnorm_kept():
    """Only plain, hook-free BatchNorm layers are rewritten; anything else keeps its own forward."""
    class Shifted(torch.nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) + 1.0

    hooked = torch.nn.BatchNorm1d(3)
    hooked.register_forward_hook(lambda module, inputs, output: output * 2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), Shifted(3), hooked, torch.nn.Linear(3, 2))
    X, y = data(10, (4,), 2)
    op = H.HessianOperator(model, X, y, batch_size=10, mode="train", dtype=F64)
    assert [type(m) for m in op.model][1:3] == [Shifted, torch.nn.BatchNorm1d]
    twin = copy.deepcopy(model).double().train()
    expected = torch.nn.functional.cross_entropy(twin(X.double()), y).item()
    assert op.loss() == pytest.approx(expected, rel=1e-12)


def test_scipy_linear_operator_view(dense):
    from scipy.sparse.linalg import eigsh

    model, X, y, chunk, mode, dropout, ev = dense["saddle"]
    op = H.HessianOperator(model, X, y, batch_size=chunk, dtype=F64)
    top = eigsh(op.as_linear_operator(), k=1, which="LA", return_eigenvectors=False)[0]
    assert abs(top - ev[-1].item()) / ev[-1].item() < 1e-8


def test_non_finite_products_are_an_error_not_a_value(monkeypatch):
    """Products that overflow (NaN or inf) must raise, never end as an eigenvalue or a density."""
    for bad in (math.nan, math.inf):
        with pytest.raises(H.NonFiniteError, match="not finite"):
            H.lanczos(lambda v: torch.full_like(v, bad), 6, dtype=F64)
    X, y = data(10, (12,), 4)
    monkeypatch.setattr(H.HessianOperator, "matvec", lambda self, v: torch.full_like(v, math.inf))
    with pytest.raises(H.NonFiniteError):
        H.lambda_max(mlp(), X, y, batch_size=5)
    with pytest.raises(H.NonFiniteError):
        H.spectral_density(mlp(), X, y, batch_size=5, lanczos_steps=4)


def test_repeated_top_eigenvalue_found_k_times():
    """At a symmetric point (a zero-initialized linear classifier) the top eigenvalue is repeated:
    top_eigenvalues(k) returns as many copies as k asks, where one start vector finds one copy."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    X, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    ev = torch.linalg.eigvalsh(reference_hessian(model, X, y, 60, False)).flip(0)
    assert abs(ev[0] - ev[1]) < 1e-12 and ev[1] - ev[2] > 1e-2  # a double top eigenvalue
    for k in (2, 3):
        spec = H.top_eigenvalues(model, X, y, k=k, batch_size=60, tol=1e-8, dtype=F64)
        assert spec.converged and spec.extra["block"] == k
        assert np.allclose(spec.eigenvalues, ev[:k].numpy(), rtol=1e-7)
    single = H.lanczos(H.HessianOperator(model, X, y, batch_size=60, dtype=F64).matvec, 15, k=2,
                       tol=1e-8, dtype=F64, block=1)
    assert single.eigenvalues[1] < ev[1] - 1e-2  # why the default block is k: one vector misses the copy


def test_small_lambda_min_has_its_own_relative_residual():
    """λmin far smaller than λmax: the residual is relative to |λmin|, so tol bounds its own error."""
    model = mlp(d=12, h=10, k=4, seed=2)
    X, y = data(40, (12,), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    ev = torch.linalg.eigvalsh(reference_hessian(model, X, y, 40, False))
    assert abs(ev[0]) < 0.05 * ev[-1]  # the regime where a residual relative to λmax says little
    spec = H.bottom_eigenvalues(model, X, y, batch_size=40, tol=1e-3, dtype=F64)
    assert spec.converged and spec.residuals[0] < 1e-3
    assert abs(spec.eigenvalues[0] - ev[0].item()) <= 1e-3 * abs(ev[0].item())


def test_frozen_and_unused_parameters():
    """The Hessian is over the trainable parameters; a parameter the loss never uses has a zero block."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
            self.unused = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = Net()
    net.a.requires_grad_(False)
    X, y = data(30, (6,), 3)
    op = H.HessianOperator(net, X, y, batch_size=30, dtype=F64)
    assert op.numel == 8 * 3 + 3 + 2 * 2 + 2
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.numel, dtype=F64)], 1)
    assert torch.count_nonzero(dense[-6:]) == 0 and torch.count_nonzero(dense[:, -6:]) == 0
    full = reference_hessian(net, X, y, 30, False)  # over every parameter: a, b, unused
    b_block = full[8 * 6 + 8:8 * 6 + 8 + 27, 8 * 6 + 8:8 * 6 + 8 + 27]
    assert torch.allclose(dense[:27, :27], b_block, atol=1e-12)
    top = torch.linalg.eigvalsh(b_block)[-1].item()
    assert abs(H.lambda_max(net, X, y, batch_size=30, tol=1e-8, dtype=F64) - top) < 1e-7 * top
    assert all(p.requires_grad is False for p in net.a.parameters())  # the user's flags are untouched
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        H.HessianOperator(net, X, y, batch_size=30)


def test_integer_inputs_stay_integer():
    """Token indices reach an Embedding as integers (only floating inputs take the operator's dtype)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(20, 3))
    X, y = torch.randint(0, 10, (23, 5)), torch.randint(0, 3, (23,))
    top = torch.linalg.eigvalsh(reference_hessian(model, X, y, 10, False))[-1].item()
    assert abs(H.lambda_max(model, X, y, batch_size=10, tol=1e-8, dtype=F64) - top) < 1e-7 * top


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Dropout2d, (4, 12, 5, 5)), (torch.nn.Dropout2d, (4, 12, 5)), (torch.nn.Dropout1d, (4, 12, 5)),
    (torch.nn.Dropout1d, (12, 5)), (torch.nn.Dropout3d, (2, 12, 3, 3, 3)), (torch.nn.Dropout3d, (12, 3, 3, 3))])
def test_fixed_dropout_keeps_channel_structure(layer, shape):
    """dropout='fixed' draws masks the way the layer does: Dropout1d/2d/3d drop whole channels."""
    native = layer(0.5).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about Dropout2d on 3-D inputs
        ones = torch.ones(shape)
        native_out = native(ones)
    model = torch.nn.Sequential(layer(0.5))
    fixed = H._measurement_copy(model, "train", "fixed", None, seed=1)[0][0]
    out = fixed(ones)
    channel_dims = {torch.nn.Dropout1d: len(shape) - 1, torch.nn.Dropout2d: 2,
                    torch.nn.Dropout3d: 2 if len(shape) == 5 else 1}[layer]
    for o in (native_out, out):  # constant within each channel, for the native layer and ours alike
        flat = o.reshape(*shape[:channel_dims], -1)
        assert torch.equal(flat.amin(-1), flat.amax(-1))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    # ... and drawn per channel (and per sample): not one mask shared by all
    per_channel = out.reshape(*shape[:channel_dims], -1)[..., 0].reshape(-1)
    assert len(per_channel) >= 6 and 0 < int((per_channel == 0).sum()) < len(per_channel)
    if channel_dims == 2:  # batched input: samples differ too
        masks = out.reshape(shape[0], shape[1], -1)[..., 0]
        assert not all(torch.equal(masks[0], m) for m in masks[1:])


def test_fixed_dropout_is_element_wise_for_dropout():
    """nn.Dropout draws every element, as the native layer does, and the draw depends on the chunk."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    fixed, state = H._measurement_copy(model, "train", "fixed", None, seed=1)
    ones = torch.ones(8, 50)
    out = fixed[0](ones)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert 0.3 < float((out == 0).float().mean()) < 0.7
    assert all(0 < int((row == 0).sum()) < 50 for row in out)  # within each example, not one per example
    assert all(0 < int((col == 0).sum()) < 8 for col in out.T[:10])  # and not one mask for all examples
    assert torch.equal(out, fixed[0](ones))
    state["chunk"] = 1
    assert not torch.equal(out, fixed[0](ones))


def test_fixed_dropout_edge_cases():
    """p = 1 gives zeros, as native dropout does; dropout layers with other semantics are refused."""
    X, y = data(20, (12,), 4)
    model = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Dropout(1.0), torch.nn.Linear(6, 4))
    op = H.HessianOperator(model, X, y, batch_size=10, dropout="fixed", dtype=F64)
    hv = op.matvec(torch.ones(op.numel, dtype=F64))
    assert torch.isfinite(hv).all()
    assert torch.count_nonzero(hv[:12 * 6 + 6]) == 0  # nothing reaches the first layer: zeros, not 0/0
    assert torch.count_nonzero(op.model[1](torch.ones(3, 6, dtype=F64))) == 0
    kept = H.HessianOperator(model, X, y, batch_size=10, dropout="off", dtype=F64)
    assert torch.count_nonzero(kept.matvec(torch.ones(op.numel, dtype=F64))[:12 * 6 + 6]) > 0
    alpha = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.AlphaDropout(0.2), torch.nn.Linear(6, 4))
    with pytest.raises(ValueError, match="AlphaDropout is not supported"):
        H.HessianOperator(alpha, X, y, batch_size=10, dropout="fixed")
    assert H.HessianOperator(alpha, X, y, batch_size=10, dropout="off").numel > 0


def test_not_converged_warning_points_at_the_caller(dense):
    model, X, y, chunk, mode, dropout, ev = dense["mlp"]
    with pytest.warns(RuntimeWarning, match="did not converge") as record:
        H.lambda_max(model, X, y, batch_size=chunk, tol=1e-12, max_matvecs=2, dtype=F64)
    assert record[0].filename == __file__


def test_wide_band_converges_with_the_default_basis():
    """A band wider than k (here 13 start vectors for k = 10) still leaves room between restarts."""
    g = np.random.default_rng(306)
    ev = np.sort(-g.uniform(0.01, 1, 120))
    ev[:2] = ev[0]  # a double smallest eigenvalue
    Q, _ = np.linalg.qr(g.standard_normal((120, 120)))
    A = torch.tensor(Q @ np.diag(ev) @ Q.T)
    spec = H.lanczos(lambda v: A @ v, 120, k=10, which="SA", tol=1e-7, block=13, dtype=F64)
    assert spec.converged and np.allclose(spec.eigenvalues, ev[:10], atol=1e-10)


def test_an_eigenvector_among_the_start_vectors_does_not_end_the_search():
    """With a band, every start vector is multiplied before convergence is accepted."""
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((50, 50)))
    A = torch.tensor(Q @ np.diag(np.linspace(1, 2, 50)) @ Q.T)
    spec = H.lanczos(lambda v: A @ v, 50, k=1, block=2, tol=1e-8, dtype=F64, start=torch.tensor(Q[:, 0]))
    assert spec.converged and abs(spec.eigenvalues[0] - 2.0) < 1e-8
    with pytest.raises(ValueError, match="max_matvecs must be at least k"):
        H.lanczos(lambda v: A @ v, 50, k=5, dtype=F64, max_matvecs=2)


def _noisy_operator(n: int, noise: float, noisy_calls: int, seed: int = 0):
    """A float32 symmetric matrix whose first `noisy_calls` products carry fresh noise of norm `noise`
    (like rounding, which the Lanczos bookkeeping cannot see)."""
    g = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    A = torch.tensor(Q @ np.diag(np.linspace(0.1, 1.0, n) ** 3) @ Q.T, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    calls = [0]

    def matvec(v):
        calls[0] += 1
        out = A @ v
        if calls[0] <= noisy_calls:
            out = out + noise * torch.randn(n, generator=gen) / math.sqrt(n)
        return out

    return A, matvec, calls


def _true_residual(A, spec) -> float:
    u, lam = spec.eigenvectors[0].double(), spec.eigenvalues[0]
    return float((A.double() @ u - lam * u).norm() / abs(lam))


def test_restarted_search_reports_true_residuals():
    """After a float32 thick restart the converged Ritz vector is multiplied again: its residual is true."""
    A, matvec, calls = _noisy_operator(200, 0.0, 0)
    spec = H.lanczos(matvec, 200, tol=1e-3, max_basis=12, eigenvectors=True)
    assert spec.converged and spec.extra["residuals_checked"] == 1 and spec.matvecs == calls[0]
    assert spec.residuals[0] == pytest.approx(_true_residual(A, spec), rel=1e-3)
    easy = H.lanczos(lambda v: A @ v, 200, tol=1e-2)  # no restart: nothing to check
    assert easy.converged and easy.matvecs < 40 and easy.extra["residuals_checked"] == 0
    f64 = H.lanczos(lambda v: A.double() @ v, 200, tol=1e-3, max_basis=12, dtype=F64)
    assert f64.converged and f64.extra["residuals_checked"] == 0  # float64 bookkeeping does not drift


def test_a_failed_check_restarts_from_the_ritz_vector():
    """Products that drift from the bookkeeping (here: noise in the first 15) fail the check; the search
    restarts from the Ritz vector with exact products and its reported residual is the true one."""
    A, matvec, calls = _noisy_operator(200, 1e-2, 15)
    spec = H.lanczos(matvec, 200, tol=1e-4, max_basis=12, eigenvectors=True)
    assert spec.converged and spec.extra["residuals_checked"] >= 2  # one failed, the last passed
    assert _true_residual(A, spec) < 1.2e-4
    assert abs(spec.eigenvalues[0] - 1.0) < 1e-5


def test_products_too_coarse_for_tol_end_unconverged_with_the_true_residual():
    """Every product off by about 1e-3 (like rounding): the bookkeeping's residual falls below 1e-5, the
    products' cannot; after three failed checks the search ends unconverged with the checked residual."""
    A, matvec, calls = _noisy_operator(200, 1e-3, 10 ** 9)
    with pytest.warns(RuntimeWarning, match="fresh products kept the true residuals above tol"):
        spec = H.lanczos(matvec, 200, tol=1e-5, max_basis=12, max_matvecs=2000)
    assert not spec.converged and spec.extra["residuals_checked"] == 3 and spec.matvecs < 2000
    assert 1e-5 < spec.residuals[0] < 1e-2


def test_float32_eigenvalue_at_zero_says_what_limits_it():
    """Softmax regression has an exact null space: in float32, λmin = 0 cannot reach tol relative to the
    eps^(2/3)·λmax floor; the warning says why instead of pretending or only counting products."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.tensor(d.data[:500], dtype=torch.float32) / 16, torch.tensor(d.target[:500])
    model = torch.nn.Linear(64, 10)
    with pytest.warns(RuntimeWarning, match="finer than 32-bit products resolve .dtype=torch.float64"):
        spec = H.bottom_eigenvalues(model, X, y, batch_size=500, max_matvecs=60)
    assert not spec.converged
    top = H.lambda_max(model, X, y, batch_size=500)
    assert abs(spec.eigenvalues[0]) < 1e-5 * top


def test_a_product_inside_the_basis_does_not_become_a_direction():
    """-2·I: every product lies in the basis; its float32 rounding remainder must not be normalized into
    a new basis vector (that broke orthogonality and gave 15.0 for an eigenvalue of -2)."""
    spec = H.lanczos(lambda v: -2 * v, 10, k=2, block=5, tol=1e-3, eigenvectors=True)
    assert spec.converged and np.allclose(spec.eigenvalues, [-2, -2], atol=1e-5)
    assert torch.allclose(spec.eigenvectors.norm(dim=1), torch.ones(2), atol=1e-5)
    spec = H.lanczos(lambda v: -2 * v, 200, k=2, block=5, which="SA", tol=0.079, max_basis=51, seed=1)
    assert np.allclose(spec.eigenvalues, [-2, -2], atol=1e-5)


def test_a_full_basis_is_checked_too():
    """n below the basis size: the bookkeeping says residual 0, but float32 products cannot give 1e-6
    relative to a λmin at zero; the checks say so instead of claiming convergence."""
    n = 30
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    A = torch.tensor((Q * np.linspace(0, 1, n)) @ Q.T, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        spec = H.lanczos(lambda v: A @ v, n, which="SA", tol=1e-6)
    assert not spec.converged and spec.residuals[0] > 1e-6 and spec.extra["residuals_checked"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero operator: no division by zero on the way
        assert H.lanczos(lambda v: 0 * v, 50).eigenvalues == [0.0]
