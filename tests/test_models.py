"""Architectures: parameter counts of the paper, init, compatibility with every dataset."""

import math

import pytest
import torch
from torch import nn

from sharpness import models
from sharpness.errors import SharpnessError


@pytest.mark.parametrize("arch, shape, count", [
    ("mlp_p=0", (1, 28, 28), 269_322),
    ("mlp_p=5e-1", (1, 28, 28), 269_322),
    ("vgg11_no_dropout", (3, 32, 32), 9_750_922),
    ("vgg11_bn_no_dropout", (3, 32, 32), 9_756_426),
])
def test_parameter_counts(arch, shape, count):
    assert models.num_parameters(models.build_model(arch, shape, 10)) == count


def test_dropout_placement_and_rates():
    for arch, p in models.MLP_DROPOUT.items():
        net = models.build_model(arch, (1, 28, 28), 10)
        kinds = [type(m).__name__ for m in net]
        assert kinds == ["Flatten", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
        assert [m.p for m in net if isinstance(m, nn.Dropout)] == [p, p]


def test_vgg_init():
    net = models.build_model("vgg11_bn_no_dropout", (3, 32, 32), 10, seed=0)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and sum(isinstance(m, nn.BatchNorm2d) for m in net) == 8
    last = convs[-1]
    assert torch.all(last.bias == 0)
    assert abs(last.weight.detach().std().item() - math.sqrt(2 / (9 * 512))) < 0.02 * math.sqrt(2 / (9 * 512))


def test_same_seed_same_network():
    a = models.build_model("mlp_p=0", (1, 8, 8), 10, seed=3)
    b = models.build_model("mlp_p=0", (1, 8, 8), 10, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_every_architecture_runs_on_digits_shape(arch):
    net = models.build_model(arch, (1, 32, 32), 10).eval()
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_incompatible_combination_is_a_clear_error():
    with pytest.raises(SharpnessError, match="at least 32x32"):
        models.check_compatible("vgg11_no_dropout", (1, 28, 28), "fashion_mnist")
    with pytest.raises(SharpnessError, match="valid architectures"):
        models.check_arch_name("resnet18")
