"""Small models for the main job, the analyses and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Fully connected network ``sizes[0] → … → sizes[-1]``, no activation after the last layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def deep_autoencoder(inputs: int = 784, activation: str = "sigmoid") -> nn.Sequential:
    """The thesis' deep autoencoder ``inputs-1000-500-250-30-250-500-1000-inputs``."""
    return mlp([inputs, 1000, 500, 250, 30, 250, 500, 1000, inputs], activation)


def small_cnn(in_channels: int = 1, side: int = 8, classes: int = 10, width: int = 16) -> nn.Sequential:
    """Two 3×3 convolutions with ReLU, then a linear classifier (for 8×8 or 28×28 images)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * ((side + 1) // 2) ** 2, classes),
    )
