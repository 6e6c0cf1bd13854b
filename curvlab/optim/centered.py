r"""Centered gradient descent (thesis Algorithm 2).

For every layer a = W h + b the weight update uses inputs centered by their
minibatch mean h̄:  W ← W − lr · c Σ_n δ_n (h_n − h̄)ᵀ,  b ← b − lr · c Σ_n δ_n
(c = 1/N for a mean loss: the thesis' (1/n) Σ), with δ_n = ∂ℓ_n/∂a_n. It is ACP
without the inverse covariance.

With a closure, the centered gradient comes from the closure's own backward
pass: for a Linear layer used once, c Σ_n δ_n (h_n − h̄)ᵀ = ∇W − (c Σ_n δ_n) h̄ᵀ,
so the layer inputs' mean h̄ and the output gradients' sum (recorded by hooks,
as for KFAC's factored preconditioning) center the gradient autograd already
computed, and a step costs about as much as an SGD step. Otherwise (no closure,
Conv layers, a layer used twice, a gradient that is not the closure's minibatch
gradient) the per-example δ_n and h_n come from the library's statistics pass
over ``batch``: a second forward and backward pass.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from curvlab.optim.base import all_finite, check_group, check_state_shapes, scratch
from curvlab.optim.factored import owners, record_linear_factors, verified_factors
from curvlab.options import check_positive
from curvlab.passes.autograd import autograd_statistics
from curvlab.passes.layers import find_layers
from curvlab.problem import Problem


class CenteredSGD(torch.optim.Optimizer):
    """SGD with centered inputs in every Linear/Conv layer (Algorithm 2).

    Args:
        model: The model; every trained parameter must belong to a Linear or Conv layer.
        loss_fn: Its loss.
        params: Parameters or groups (default ``model.parameters()``); groups may
            set ``lr`` and ``momentum``.
        lr: Learning rate.
        momentum: Heavy-ball momentum on the centered gradient.

    ``step(closure, batch=(X, y))``: the closure evaluates the loss on the minibatch
    ``batch`` and calls ``backward``; its gradient is centered where it can be (see
    the module doc; ``last_from_closure`` says whether the last step did), else the
    centered gradient is computed from ``batch``. ``step(batch=...)`` alone always
    computes it from ``batch``.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, params=None, lr: float = 0.01, momentum: float = 0.0
    ):
        defaults = {"lr": check_positive("lr", lr), "momentum": momentum}
        check_group(defaults)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.last_from_closure = False
        self._scratch: dict[int, torch.Tensor] = {}  # reused work tensors (not state: not saved)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _centered_from_records(self, records: dict) -> list[torch.Tensor] | None:
        """The closure's gradient centered per Linear layer, or ``None`` if a parameter is not covered."""
        params, owner = self._params(), owners(records)
        by_module: dict[nn.Module, list[tuple[int, str]]] = {}
        for index, p in enumerate(params):
            if id(p) not in owner or p.grad is None:
                return None
            module, role = owner[id(p)]
            by_module.setdefault(module, []).append((index, role))
        result: list[torch.Tensor | None] = [None] * len(params)
        for module, entries in by_module.items():
            entries.sort(key=lambda entry: entry[1] != "weight")  # weight first, as in [W b]
            roles = [role for _, role in entries]
            factors = verified_factors(module, roles, records, [params[i].grad for i, _ in entries])
            if factors is None:
                return None
            U, X = factors
            total = U.sum(0)  # c Σ_n δ_n, the bias gradient
            for index, role in entries:
                grad = params[index].grad
                if role == "weight":
                    mean = X[:, : module.in_features].mean(0)
                    out = scratch(self._scratch, params[index], grad.dtype)
                    result[index] = torch.addr(grad, total, mean, alpha=-1, out=out)  # ∇W − (c Σ δ) h̄ᵀ
                else:
                    result[index] = grad.clone()
        return result

    def centered_gradient(self, batch) -> list[torch.Tensor]:
        """The centered gradient: c Σ_n δ_n (h_n − h̄)ᵀ for weights, c Σ_n δ_n for biases."""
        params = [p for group in self.param_groups for p in group["params"]]
        problem = Problem(
            self.model, self.loss_fn, tuple(batch), params=params, eval_mode=not self.model.training
        )
        layers = find_layers(
            problem, remedy="CenteredSGD centers those layers only: leave its parameters out of params"
        )
        result = [torch.zeros_like(p) for p in params]
        c = problem.reduction_factor
        for batch in autograd_statistics(problem, layers, "empirical"):
            (chunk,) = batch.chunks  # one vector: one chunk
            for layer in layers:
                a = batch.inputs[layer.name]  # (N, R, d_A)
                g = chunk.gradients[layer.name].tensor()[0]  # (N, R, d_out)
                if layer.weight is not None:
                    h = a[..., :-1] if layer.bias is not None else a
                    centered = h - h.mean(dim=(0, 1), keepdim=True)
                    weight = torch.einsum("nro,nri->oi", g, centered) * c
                    result[layer.weight] += weight.reshape(params[layer.weight].shape)
                if layer.bias is not None:
                    result[layer.bias] += g.sum(dim=(0, 1)) * c
        return result

    def add_param_group(self, param_group: dict) -> None:
        """The torch optimizer's ``add_param_group``, refusing a nonsense ``lr`` or ``momentum``."""
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict) -> None:
        """The torch optimizer's ``load_state_dict``, refusing the state of parameters with other shapes."""
        check_state_shapes(self._params(), state_dict)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None, batch=None):
        """One centered update on ``batch``; returns the closure's loss."""
        if batch is None and closure is None:
            raise ValueError(
                "CenteredSGD computes its update from the minibatch: call step(closure, batch=(X, y))"
            )
        loss, gradient = None, None
        if closure is not None:
            with torch.enable_grad(), record_linear_factors(self.model, self._params()) as records:
                loss = closure()
            gradient = self._centered_from_records(records)
            del records  # the recorded activations
        self.last_from_closure = gradient is not None
        if gradient is None:
            if batch is None:
                raise ValueError(
                    "CenteredSGD could not center the closure's gradient (a parameter outside a Linear "
                    "layer used once, or a modified gradient): call step(closure, batch=(X, y))"
                )
            with torch.enable_grad():
                gradient = self.centered_gradient(batch)
        if not all_finite(gradient):
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
