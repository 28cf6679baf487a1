"""SAM: perturbation of norm rho, the update is SGD on the gradient at the perturbed point."""

import copy

import torch
import torch.nn.functional as F

from helpers import conv_bn, data, mlp
from sharpness.optim import accumulate_gradients, sam_perturbation, sam_step, sgd_step


def _grads(model, X, y):
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_perturbation_has_norm_rho():
    grads = [torch.randn(3, 4), torch.randn(5)]
    e = sam_perturbation(grads, 0.05)
    norm = torch.sqrt(sum((t ** 2).sum() for t in e))
    assert abs(float(norm) - 0.05) < 1e-7
    g_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert all(torch.allclose(a, 0.05 * g / g_norm, atol=1e-7) for a, g in zip(e, grads))


def test_sam_update_is_sgd_at_perturbed_point():
    model = mlp()
    X, y = data(32, (12,), 4)
    lr, rho = 0.1, 0.05
    w0 = [p.detach().clone() for p in model.parameters()]
    g = _grads(model, X, y)
    e = sam_perturbation(g, rho)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(probe.parameters(), e):
            p.add_(d)
    g_pert = _grads(probe, X, y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sam_step(model, opt, X, y, chunk=10, rho=rho)  # chunked: same mathematics
    for p, w, gp in zip(model.parameters(), w0, g_pert):
        assert torch.allclose(p.detach(), w - lr * gp, atol=1e-6)


def test_sam_updates_batchnorm_stats_in_first_pass_only():
    model = conv_bn().train()
    X, y = data(16, (1, 4, 4), 4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(X)  # one forward pass at w: what the running statistics should see
    sam_step(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y, chunk=16, rho=0.05)
    bn, ref = model[1], reference[1]
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_chunked_gradient_equals_full_batch_mean():
    model = mlp()
    X, y = data(30, (12,), 4)
    full = _grads(model, X, y)
    model.zero_grad()
    loss = accumulate_gradients(model, X, y, chunk=7)
    assert torch.allclose(loss, F.cross_entropy(model(X), y), atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), full))


def test_sgd_step_is_plain_sgd():
    model = mlp()
    X, y = data(30, (12,), 4)
    w0 = [p.detach().clone() for p in model.parameters()]
    g = _grads(model, X, y)
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.5), X, y, chunk=1000)
    assert all(torch.allclose(p, w - 0.5 * gg, atol=1e-6) for p, w, gg in zip(model.parameters(), w0, g))
