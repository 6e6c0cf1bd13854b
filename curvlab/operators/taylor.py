r"""Quadratic forms vᵀHv and vᵀGv of plain MLPs by forward propagation (Taylor mode).

A Hutchinson trace needs only the numbers vᵀCv, not the products Cv. Along
θ + t v, the first two Taylor coefficients of every layer's value are
propagated forward (Griewank & Walther 2008, ch. 13). A linear layer
z = W a + b with direction (V, v_b) maps the coefficients a₁, a₂ of its input to

    z₁ = W a₁ + V a₀ + v_b,        z₂ = W a₂ + 2 V a₁,

an elementwise activation a = σ(z) maps them to

    a₁ = σ'(z₀) z₁,                a₂ = σ'(z₀) z₂ + σ''(z₀) z₁²,

with a₀, z₀ the primal values and a₁ = a₂ = 0 at the input. With f the output,

    vᵀ H v = d²R/dt² = c Σₙ [ ⟨∇_f ℓₙ, f₂ₙ⟩ + f₁ₙᵀ Λₙ f₁ₙ ],        vᵀ G v = c Σₙ f₁ₙᵀ Λₙ f₁ₙ

(the GGN keeps only the loss curvature: G = c Σ Jᵀ Λ J and J v = f₁). A Hessian
form costs 4 GEMMs per layer (1 for the first), against about 5.5 for a
reverse-over-reverse product on a cached graph, and no backward pass; a GGN form
costs 2. Models other than an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations on ``(N, d)`` inputs use products instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.problem import Problem

ELEMENTWISE = (
    nn.Identity,
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
)


def activation_derivatives(activation: nn.Module, s: Tensor, second: bool = False):
    """σ'(s) and, if ``second``, σ''(s) of an elementwise activation, by autograd (ReLU'(0) = 0 as torch).

    Returns:
        ``σ'(s)`` alone, or ``(σ'(s), σ''(s))`` when ``second``; shaped like ``s``.
    """
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        out = activation(leaf * 1.0)  # not the leaf itself: in-place activations are fine
        (d1,) = torch.autograd.grad(out.sum(), leaf, create_graph=second)
        if not second:
            return d1
        if not d1.requires_grad:  # piecewise linear (ReLU, LeakyReLU, Identity): σ'' = 0
            return d1, torch.zeros_like(d1)
        (d2,) = torch.autograd.grad(d1.sum(), leaf)
    return d1.detach(), d2


def supports(problem: Problem) -> bool:
    """Whether the forms of ``problem`` can be propagated forward (a plain MLP on ``(N, d)`` inputs)."""
    model = problem.model
    if type(model) is not nn.Sequential or len(model) == 0 or problem.input_ndims != {2}:
        return False
    return all(type(m) is nn.Linear or isinstance(m, ELEMENTWISE) for m in model)


@dataclass
class _Linear:
    weight: Tensor  # W, (d_out, d_in)
    inputs: Tensor  # a₀, (N, d_in)
    weight_index: int | None  # position of W among the problem's parameters (None: held fixed)
    bias_index: int | None


@dataclass
class _Activation:
    first: Tensor  # σ'(z₀), (N, d)
    second: Tensor  # σ''(z₀)


@dataclass
class PrimalBatch:
    """One batch's primal values: what the forms of every direction share."""

    steps: list[_Linear | _Activation]
    output: Tensor  # f, (N, C)
    output_gradient: Tensor  # ∇_f ℓ (sum reduction), (N, C)
    mask: Tensor | None  # entries with a loss term (None: all), broadcastable to (N, C)
    target: Tensor  # y, for the loss' output Hessian


def primal(problem: Problem, X: Tensor, y: Tensor) -> PrimalBatch:
    """Forward pass of one batch, keeping layer inputs and activation derivatives."""
    index_of = {id(p): i for i, p in enumerate(problem.params)}
    steps: list[_Linear | _Activation] = []
    x = X
    with torch.no_grad(), problem.model_mode():
        for module in problem.model:
            if type(module) is nn.Linear:
                bias_index = None if module.bias is None else index_of.get(id(module.bias))
                steps.append(_Linear(module.weight.detach(), x, index_of.get(id(module.weight)), bias_index))
                x = F.linear(x, module.weight, module.bias)
            else:
                steps.append(_Activation(*activation_derivatives(module, x, second=True)))
                x = module(x)
    problem.loss_rule.check(x, y)  # shapes, and NaN/Inf in the output or target
    rule = problem.loss_rule
    return PrimalBatch(steps, x, rule.output_gradient(x, y), rule.mask(y), y)


def _propagate(batch: PrimalBatch, direction: list[Tensor], second_order: bool):
    """Output coefficients (f₁, f₂) along one direction; ``None`` stands for zero."""
    x1 = x2 = None
    for step in batch.steps:
        if isinstance(step, _Activation):
            if x1 is None:
                continue
            if second_order:
                curvature = step.second * x1 * x1
                x2 = curvature if x2 is None else curvature.addcmul_(step.first, x2)
            x1 = step.first * x1
            continue
        W = step.weight
        V = None if step.weight_index is None else direction[step.weight_index]
        v_b = None if step.bias_index is None else direction[step.bias_index]
        if V is not None:
            y1 = torch.addmm(v_b, step.inputs, V.T) if v_b is not None else step.inputs @ V.T
            if x1 is not None:
                y1.addmm_(x1, W.T)
        else:
            y1 = None if x1 is None else x1 @ W.T
            if v_b is not None:
                y1 = v_b.expand(step.inputs.shape[0], -1) if y1 is None else y1.add_(v_b)
        if second_order:
            y2 = None if x2 is None else x2 @ W.T
            if V is not None and x1 is not None:
                y2 = 2.0 * (x1 @ V.T) if y2 is None else y2.addmm_(x1, V.T, alpha=2.0)
            x2 = y2
        x1 = y1
    return x1, x2


def quadratic_forms(
    problem: Problem, batches: Iterable[PrimalBatch], Vs: list[Tensor], second_order: bool
) -> Tensor:
    """vᵀHv (``second_order``) or vᵀGv for the k directions ``Vs[i]`` of shape ``(k, *param_shape)``.

    Returns:
        ``(k,)``, scaled by the problem's reduction factor.
    """
    k = Vs[0].shape[0]
    rule = problem.loss_rule
    forms = torch.zeros(k, dtype=problem.dtype, device=problem.device)
    for batch in batches:
        for j in range(k):  # one direction at a time: GEMMs over the batch's rows
            f1, f2 = _propagate(batch, [V[j] for V in Vs], second_order)
            if f1 is None:  # no parameter of the problem in the direction's path
                continue
            if batch.mask is not None:  # rows without a loss term (ignore_index) add nothing
                f1 = f1 * batch.mask
            curvature = rule.hessian_vp(batch.output, f1, batch.target)
            forms[j] += torch.vdot(f1.reshape(-1), curvature.reshape(-1))
            if f2 is not None:
                forms[j] += torch.vdot(batch.output_gradient.reshape(-1), f2.reshape(-1))
    return forms.mul_(problem.reduction_factor)
