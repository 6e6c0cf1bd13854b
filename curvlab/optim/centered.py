r"""Centered gradient descent (thesis Algorithm 2).

For every layer a = W h + b the weight update uses inputs centered by their
minibatch mean h̄:  W ← W − lr · c Σ_n δ_n (h_n − h̄)ᵀ,  b ← b − lr · c Σ_n δ_n
(c = 1/N for a mean loss: the thesis' (1/n) Σ), with δ_n = ∂ℓ_n/∂a_n. It is ACP
without the inverse covariance. The per-example δ_n and h_n come from the
library's one statistics pass (the same hooks KFAC and ACP use).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from curvlab.problem import Problem
from curvlab.structured.statistics import find_layers, layer_statistics


class CenteredSGD(torch.optim.Optimizer):
    """SGD with centered inputs in every Linear/Conv layer (Algorithm 2).

    Args:
        model: The model; every trained parameter must belong to a Linear or Conv layer.
        loss_fn: Its loss.
        params: Parameters or groups (default ``model.parameters()``); groups may
            set ``lr`` and ``momentum``.
        lr: Learning rate.
        momentum: Heavy-ball momentum on the centered gradient.

    ``step(closure, batch=(X, y))``: the closure (optional) only reports the loss;
    the centered gradient is computed from ``batch``.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, params=None, lr: float = 0.01, momentum: float = 0.0
    ):
        if lr <= 0 or momentum < 0:
            raise ValueError("lr must be > 0 and momentum ≥ 0")
        super().__init__(model.parameters() if params is None else params, {"lr": lr, "momentum": momentum})
        self.model = model
        self.loss_fn = loss_fn

    def centered_gradient(self, batch) -> list[torch.Tensor]:
        """The centered gradient: c Σ_n δ_n (h_n − h̄)ᵀ for weights, c Σ_n δ_n for biases."""
        params = [p for group in self.param_groups for p in group["params"]]
        problem = Problem(self.model, self.loss_fn, tuple(batch), params=params)
        layers = find_layers(problem)
        result = [torch.zeros_like(p) for p in params]
        c = problem.reduction_factor
        for _, inputs, grads in layer_statistics(problem, layers, "empirical"):
            for layer in layers:
                a, g = inputs[layer.name], grads[layer.name][0]  # (N, R, d_A), (N, R, d_out)
                if layer.weight is not None:
                    h = a[..., :-1] if layer.bias is not None else a
                    centered = h - h.mean(dim=(0, 1), keepdim=True)
                    weight = torch.einsum("nro,nri->oi", g, centered) * c
                    result[layer.weight] += weight.reshape(params[layer.weight].shape)
                if layer.bias is not None:
                    result[layer.bias] += g.sum(dim=(0, 1)) * c
        return result

    @torch.no_grad()
    def step(self, closure=None, batch=None):
        """One centered update on ``batch``; returns the closure's loss."""
        if batch is None:
            raise ValueError(
                "CenteredSGD computes its update from the minibatch: call step(closure, batch=(X, y))"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.enable_grad():
            gradient = self.centered_gradient(batch)
        if not all(bool(torch.isfinite(g).all()) for g in gradient):
            warnings.warn("CenteredSGD: step skipped (non-finite gradient)", RuntimeWarning, stacklevel=2)
            return loss
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                d = gradient[index]
                index += 1
                if group["momentum"] > 0:
                    buffer = self.state[p].get("momentum_buffer")
                    buffer = d.clone() if buffer is None else buffer.mul_(group["momentum"]).add_(d)
                    self.state[p]["momentum_buffer"] = buffer
                    d = buffer
                p.add_(d, alpha=-group["lr"])
        return loss
