"""Architectures of the paper, by their original ids; input shape and class count come from the data."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SharpnessError

MLP_DROPOUT = {"mlp_p=0": 0.0, "mlp_p=1e-1": 0.1, "mlp_p=2e-1": 0.2, "mlp_p=5e-1": 0.5,
               "mlp_p=6e-1": 0.6, "mlp_p=7e-1": 0.7}
VGG = {"vgg11_no_dropout": False, "vgg11_bn_no_dropout": True}
ARCHITECTURES = list(VGG) + list(MLP_DROPOUT)

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
MLP_WIDTH = 256


def check_arch_name(arch_id: str) -> None:
    """Raise a clear error when `arch_id` is not a known architecture."""
    if arch_id not in ARCHITECTURES:
        raise SharpnessError(f"unknown architecture {arch_id!r}; valid architectures: "
                             f"{', '.join(ARCHITECTURES)}")


def check_compatible(arch_id: str, input_shape: tuple[int, ...], dataset: str = "the dataset") -> None:
    """Raise a clear error when `arch_id` cannot take inputs of `input_shape`."""
    check_arch_name(arch_id)
    if arch_id in VGG:
        if len(input_shape) != 3:
            raise SharpnessError(f"{arch_id} needs image inputs (C x H x W); {dataset} has "
                                 f"inputs of shape {tuple(input_shape)}")
        _, h, w = input_shape
        if h < 32 or w < 32:
            raise SharpnessError(f"{arch_id} halves the image five times and needs inputs of at "
                                 f"least 32x32 pixels; {dataset} has {'x'.join(map(str, input_shape))}")


def build_model(arch_id: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None) -> nn.Module:
    """The network `arch_id` for inputs of `input_shape` (C, H, W), initialised under `seed`."""
    check_compatible(arch_id, input_shape)
    if seed is not None:
        torch.manual_seed(seed)
    if arch_id in MLP_DROPOUT:
        return mlp(math.prod(input_shape), num_classes, MLP_DROPOUT[arch_id])
    return vgg11(input_shape, num_classes, batch_norm=VGG[arch_id])


def mlp(in_features: int, num_classes: int, p: float) -> nn.Sequential:
    """Flatten -> Linear(d,256) -> ReLU -> Dropout(p) -> Linear(256,256) -> ReLU -> Dropout(p) -> Linear(256,k)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, MLP_WIDTH), nn.ReLU(), nn.Dropout(p),
        nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.ReLU(), nn.Dropout(p),
        nn.Linear(MLP_WIDTH, num_classes),
    )


def vgg11(input_shape: tuple[int, ...], num_classes: int, batch_norm: bool) -> nn.Sequential:
    """VGG configuration A (no dropout), optionally with BatchNorm after every convolution."""
    channels, h, w = input_shape
    layers: list[nn.Module] = []
    for v in VGG11_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            h, w = h // 2, w // 2
            continue
        conv = nn.Conv2d(channels, v, kernel_size=3, padding=1)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (3 * 3 * v)))
        nn.init.zeros_(conv.bias)
        layers.append(conv)
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        channels = v
    features = channels * h * w
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(features, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_dropout(model: nn.Module) -> bool:
    """Whether the model contains a dropout layer with p > 0."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
