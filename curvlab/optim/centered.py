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

Under a process group (``process_group="auto"`` when ``torch.distributed`` runs
several processes) each rank holds a share of the global minibatch; the ranks
sum their gradients ∇W, c Σ_n δ_n and Σ_n h_n (two all-reduces,
``curvlab.optim.data_parallel.share_step``), so the step is Algorithm 2 on the
global minibatch, centered by its global mean. With a model wrapped in
``DistributedDataParallel`` the parts come from ``batch`` (DDP's averaged
gradient is not this rank's).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curvlab.distributed import Group, resolve
from curvlab.optim import data_parallel
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
        process_group: ``"auto"`` (default), ``None`` or a process group, as for
            ``CurvatureOptimizer``: the ranks' centered gradients are averaged.

    ``step(closure, batch=(X, y))``: the closure evaluates the loss on the minibatch
    ``batch`` and calls ``backward``; its gradient is centered where it can be (see
    the module doc; ``last_from_closure`` says whether the last step did), else the
    centered gradient is computed from ``batch``. ``step(batch=...)`` alone always
    computes it from ``batch``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params=None,
        lr: float = 0.01,
        momentum: float = 0.0,
        process_group="auto",
    ):
        defaults = {"lr": check_positive("lr", lr), "momentum": momentum}
        check_group(defaults)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.last_from_closure = False
        self._scratch: dict[int, torch.Tensor] = {}  # reused work tensors (not state: not saved)
        self.group: Group | None = resolve(process_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _parts_from_records(self, records: dict) -> tuple | None:
        """The closure's gradient as ``(gradients, centerings)``, or ``None`` if a parameter is not covered.

        ``gradients``: the closure's (uncentered) gradient per parameter; ``centerings``:
        per weight ``(index, c Σ_n δ_n, Σ_n h_n, number of inputs)``, what ``_center``
        needs. Covered: every parameter in a Linear layer used once whose gradient is
        UᵀX (``verified_factors``).
        """
        params, owner = self._params(), owners(records)
        by_module: dict[nn.Module, list[tuple[int, str]]] = {}
        for index, p in enumerate(params):
            if id(p) not in owner or p.grad is None:
                return None
            module, role = owner[id(p)]
            by_module.setdefault(module, []).append((index, role))
        gradients = [p.grad for p in params]
        centerings = []
        for module, entries in by_module.items():
            entries.sort(key=lambda entry: entry[1] != "weight")  # weight first, as in [W b]
            roles = [role for _, role in entries]
            factors = verified_factors(module, roles, records, [params[i].grad for i, _ in entries])
            if factors is None:
                return None
            U, X = factors
            for index, role in entries:
                if role == "weight":
                    inputs = X[:, : module.in_features]
                    centerings.append((index, U.sum(0), inputs.sum(0), float(inputs.shape[0])))
        return gradients, centerings

    def _parts_from_batch(self, batch) -> tuple:
        """``(gradients, centerings)`` as ``_parts_from_records``, from the statistics pass over ``batch``."""
        params = self._params()
        problem = Problem(  # this rank's share alone: the ranks' parts are summed by ``step``
            self.model,
            self.loss_fn,
            tuple(batch),
            params=params,
            eval_mode=not self.model.training,
            process_group=None,
        )
        layers = find_layers(
            problem, remedy="CenteredSGD centers those layers only: leave its parameters out of params"
        )
        gradients = [torch.zeros_like(p) for p in params]
        totals = {layer.weight: 0.0 for layer in layers if layer.weight is not None}
        sums = dict(totals)
        counts = dict(totals)
        c = problem.reduction_factor
        for statistics in autograd_statistics(problem, layers, "empirical"):
            (chunk,) = statistics.chunks  # one vector: one chunk
            for layer in layers:
                a = statistics.inputs[layer.name]  # (N, R, d_A)
                g = chunk.gradients[layer.name].tensor()[0]  # (N, R, d_out)
                total = g.sum(dim=(0, 1)) * c
                if layer.weight is not None:
                    h = a[..., :-1] if layer.bias is not None else a
                    weight = torch.einsum("nro,nri->oi", g, h) * c
                    gradients[layer.weight] += weight.reshape(params[layer.weight].shape)
                    totals[layer.weight] = totals[layer.weight] + total
                    sums[layer.weight] = sums[layer.weight] + h.sum(dim=(0, 1))
                    counts[layer.weight] += h.shape[0] * h.shape[1]
                if layer.bias is not None:
                    gradients[layer.bias] += total
        centerings = [(index, totals[index], sums[index], counts[index]) for index in totals]
        return gradients, centerings

    def _center(self, gradients: list[torch.Tensor], centerings: list[tuple]) -> list[torch.Tensor]:
        """The centered gradient: ∇W − (c Σ_n δ_n) h̄ᵀ per weight (h̄ = Σ_n h_n / count), biases as they are."""
        params = self._params()
        # Written into kept scratch tensors: fresh ones per step would fault in new pages.
        centered = [scratch(self._scratch, p, g.dtype).copy_(g) for g, p in zip(gradients, params)]
        for index, total, input_sum, count in centerings:
            if count == 0:  # no input reached the layer
                continue
            weight = centered[index].view(total.shape[0], -1)
            weight.sub_(torch.outer(total, input_sum / count))
        return [c.view_as(p) for c, p in zip(centered, params)]

    def centered_gradient(self, batch) -> list[torch.Tensor]:
        """The centered gradient on ``batch``: c Σ_n δ_n (h_n − h̄)ᵀ for weights, c Σ_n δ_n for biases."""
        return self._center(*self._parts_from_batch(batch))

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
        """One centered update on ``batch``; returns the closure's loss (the global one under a group)."""
        if batch is None and closure is None:
            raise ValueError(
                "CenteredSGD computes its update from the minibatch: call step(closure, batch=(X, y))"
            )
        loss, parts = None, None
        if closure is not None and isinstance(self.model, DistributedDataParallel):
            with torch.enable_grad():  # DDP averages the gradient: this rank's share comes from ``batch``
                loss = closure()
        elif closure is not None:
            with torch.enable_grad(), record_linear_factors(self.model, self._params()) as records:
                loss = closure()
            parts = self._parts_from_records(records)
            del records  # the recorded activations
        self.last_from_closure = parts is not None
        if parts is None:
            if batch is None:
                raise ValueError(
                    "CenteredSGD could not center the closure's gradient (a parameter outside a Linear "
                    "layer used once, or a modified gradient): call step(closure, batch=(X, y))"
                )
            with torch.enable_grad():
                parts = self._parts_from_batch(batch)
        gradients, centerings = parts
        if self.group is not None:  # the global minibatch's gradient, Σ δ and Σ h: then centered
            totals = [total for _, total, _, _ in centerings]
            shared = gradients + totals
            loss, _ = data_parallel.share_step(self.group, self.loss_fn, loss, batch, None, shared)
            sums = [torch.cat([s.reshape(-1), s.new_tensor([count])]) for _, _, s, count in centerings]
            self.group.sum_(sums)
            centerings = [
                (index, total, summed[:-1], float(summed[-1]))
                for (index, total, _, _), summed in zip(centerings, sums)
            ]
        gradient = self._center(gradients, centerings)
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
