"""Tiny named problems shared by the tests (test cases as data).

Each case builds ``(model, loss_fn, data, params)`` for a dtype and device from a
fixed seed. ``params`` is ``None`` (all parameters) or a function of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import curvlab as cl


def _targets(loss: str, outputs_shape: tuple[int, ...], generator, dtype) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, outputs_shape[1], (outputs_shape[0], *outputs_shape[2:]), generator=generator)
    if loss in ("bce", "ce_soft"):  # ce_soft: probability targets, sums ≠ 1 on purpose
        return torch.rand(outputs_shape, generator=generator, dtype=dtype)
    return torch.randn(outputs_shape, generator=generator, dtype=dtype)


LOSSES = {
    "mse": nn.MSELoss,
    "ce": nn.CrossEntropyLoss,
    "bce": nn.BCEWithLogitsLoss,
    "ce_soft": nn.CrossEntropyLoss,
}


@dataclass(frozen=True)
class Case:
    """One tiny problem: how to build the model and data, which loss and reduction."""

    name: str
    build_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    loss: str
    reduction: str
    batch_sizes: tuple[int, ...] = (8,)
    params: Callable[[nn.Module], list] | None = None
    loss_options: tuple[tuple[str, object], ...] = ()  # extra keyword arguments of the loss

    def build(self, dtype=torch.float64, device="cpu", seed=0) -> cl.Problem:
        """The ``cl.Problem`` of this case."""
        torch.manual_seed(seed)
        model = self.build_model().to(device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(seed + 1)
        data = []
        for size in self.batch_sizes:
            # Drawn in float64 and cast, so every dtype sees the same numbers.
            X = torch.randn((size, *self.input_shape), generator=generator, dtype=torch.float64)
            y = _targets(self.loss, (size, *self.output_shape), generator, torch.float64)
            y = y.to(dtype) if y.is_floating_point() else y
            data.append((X.to(device, dtype), y.to(device)))
        params = self.params(model) if self.params is not None else None
        loss_fn = LOSSES[self.loss](reduction=self.reduction, **dict(self.loss_options))
        return cl.Problem(model, loss_fn, data, params=params)


def _mlp(*sizes, act=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _scalar_regressor():
    """One number per example: outputs (N,), as ``model(x).squeeze(-1)`` gives."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 4)
    )


class ClassesFirst(nn.Module):
    """(N, L, C) → (N, C, L): the layout CrossEntropyLoss takes for a sequence."""

    def forward(self, x):
        return x.transpose(1, 2)


def _sequence_classifier():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), ClassesFirst())


def _segmentation_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1))


CASES = [
    Case("mlp_tanh_mse_mean", lambda: _mlp(5, 4, 3), (5,), (3,), "mse", "mean"),
    Case("mlp_sigmoid_ce_sum", lambda: _mlp(5, 6, 4, act=nn.Sigmoid), (5,), (4,), "ce", "sum"),
    Case("mlp_gelu_bce_mean", lambda: _mlp(4, 5, 3, act=nn.GELU), (4,), (3,), "bce", "mean"),
    Case(
        "mlp_relu_ce_mean_3batches", lambda: _mlp(5, 6, 3, act=nn.ReLU), (5,), (3,), "ce", "mean", (7, 4, 2)
    ),
    Case("mlp_elu_mse_sum_2batches", lambda: _mlp(3, 4, 2, act=nn.ELU), (3,), (2,), "mse", "sum", (5, 3)),
    Case(
        "mlp_softplus_bce_sum_2batches",
        lambda: _mlp(3, 4, 2, act=nn.Softplus),
        (3,),
        (2,),
        "bce",
        "sum",
        (4, 6),
    ),
    Case("conv2d_ce_mean", _conv_net, (2, 4, 4), (4,), "ce", "mean", (6,)),
    Case("conv2d_mse_mean_2batches", _conv_net, (2, 4, 4), (4,), "mse", "mean", (3, 2)),
    Case(
        "subset_reversed_mse_mean",
        lambda: _mlp(4, 5, 3),
        (4,),
        (3,),
        "mse",
        "mean",
        (6, 3),
        params=lambda m: [m[2].bias, m[0].weight],
    ),
    Case("linear_ce_mean", lambda: nn.Linear(4, 3), (4,), (3,), "ce", "mean", (5, 4)),
    Case("linear_mse_sum", lambda: nn.Linear(4, 3), (4,), (3,), "mse", "sum"),
    Case("linear_bce_mean", lambda: nn.Linear(4, 2), (4,), (2,), "bce", "mean", (3, 5)),
    # a loss term per position: (N, C, L) logits, (N, L, C) regression, (N, C, H, W) maps
    Case("sequence_ce_mean", _sequence_classifier, (4, 3), (3, 4), "ce", "mean", (3, 2)),
    Case("sequence_mse_sum", lambda: _mlp(3, 4, 2), (4, 3), (4, 2), "mse", "sum", (3,)),
    Case("segmentation_bce_mean", _segmentation_net, (2, 3, 3), (2, 3, 3), "bce", "mean", (2,)),
    Case(
        "mlp_ce_label_smoothing_mean",
        lambda: _mlp(5, 4, 3),
        (5,),
        (3,),
        "ce",
        "mean",
        (6, 3),
        loss_options=(("label_smoothing", 0.2),),
    ),
    Case("scalar_regressor_mse_mean", _scalar_regressor, (4,), (), "mse", "mean", (5, 3)),
    Case("scalar_regressor_bce_sum", _scalar_regressor, (4,), (), "bce", "sum", (6,)),
    Case("mlp_ce_probability_targets_sum", lambda: _mlp(5, 4, 3), (5,), (3,), "ce_soft", "sum", (6, 3)),
    Case(
        "mlp_bce_pos_weight_mean",
        lambda: _mlp(4, 5, 3),
        (4,),
        (3,),
        "bce",
        "mean",
        (5, 2),
        loss_options=(("pos_weight", torch.tensor([0.5, 3.0, 1.5])),),
    ),
    Case(
        "segmentation_bce_pos_weight_sum",
        _segmentation_net,
        (2, 3, 3),
        (2, 3, 3),
        "bce",
        "sum",
        (2,),
        loss_options=(("pos_weight", torch.tensor([[[2.0]], [[0.25]]])),),  # per channel
    ),
    Case(
        "sequence_ce_probability_targets_smoothing_mean",
        _sequence_classifier,
        (4, 3),
        (3, 4),
        "ce_soft",
        "mean",
        (3, 2),
        loss_options=(("label_smoothing", 0.1),),
    ),
]

LINEAR_CASES = [c for c in CASES if c.name.startswith("linear_")]
