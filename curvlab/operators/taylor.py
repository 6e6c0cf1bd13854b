r"""Quadratic forms vᵀHv, vᵀGv and Hessian products Hv of plain MLPs from one cached primal pass.

A Hutchinson trace needs only the numbers vᵀCv, not the products Cv. Along
θ + t v, the first two Taylor coefficients of every layer's value are
propagated forward (Griewank & Walther 2008, ch. 13). A linear layer
z = W a + b with direction (V, v_b) maps the coefficients a₁, a₂ of its input to

    z₁ = W a₁ + V a₀ + v_b,        z₂ = W a₂ + 2 V a₁,

an elementwise activation a = σ(z) maps them to

    a₁ = σ'(z₀) z₁,                a₂ = σ'(z₀) z₂ + σ''(z₀) z₁²,

with a₀, z₀ the primal values and a₁ = a₂ = 0 at the input. With f the output,

    vᵀ H v = d²R/dt² = c Σₙ [ ⟨∇_f ℓₙ, f₂ₙ⟩ + f₁ₙᵀ Λₙ f₁ₙ ],        vᵀ G v = c Σₙ f₁ₙᵀ Λₙ f₁ₙ

(the GGN keeps only the loss curvature: G = c Σ Jᵀ Λ J and J v = f₁).

f₂ itself is never formed. It is linear in its sources, 2 V a₁ at each linear
layer and σ''(z₀) z₁² at each activation, pushed through the network's
tangent-linear map; so ⟨∇_f ℓ, f₂⟩ = Σ_sources ⟨ḡ, source⟩, with ḡ the adjoint
(the backpropagated ∇_f ℓ) at the source's layer output. The adjoints are one
backward sweep of the batch, shared by every direction, and per direction

    vᵀ H v = c Σₙ [ f₁ₙᵀ Λₙ f₁ₙ + Σ_linear 2 ⟨ḡ_z, V a₁⟩ + Σ_act ⟨ḡ_a σ''(z₀), z₁²⟩ ].

A Hessian form then costs 3 GEMMs per layer (W a₁, V a₀, V a₁; 1 for the
first), against 4 when f₂ is propagated and about 6 for a reverse-over-reverse
product, and no backward pass; a GGN form costs 2. Models other than an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations on
``(N, d)`` inputs use products instead.

The same primal pass (layer inputs a₀, σ'(z₀), σ''(z₀) and the adjoints δ = ḡ)
gives Hessian products by forward-over-reverse in closed form (Pearlmutter 1994,
the R-operator): the first-order tangents above go forward, and the tangent of
the backward pass comes back. Starting from δ̇_f = ∇²_f ℓ f₁ at the output,

    activation:  δ̇_z = σ'(z₀) δ̇_a + σ''(z₀) δ_a z₁,
    linear:      δ̇_a = δ̇_z W + δ_z V,     (H v)_W = δ̇_zᵀ a₀ + δ_zᵀ a₁,     (H v)_b = Σₙ δ̇_z,

scaled by c. That is the arithmetic of a reverse-over-reverse product on a
cached graph (6 GEMMs per layer) without autograd's engine, its second copy of
the graph, or the elementwise work of differentiating each backward formula;
the gradient is δ_zᵀ a₀ off the same pass, at no extra cost. Dropping the
terms with σ'' and δ_z leaves the GGN product Jᵀ Λ J v (4 GEMMs per layer).
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


def plain_mlp(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` of ``nn.Linear`` and elementwise activations, as written.

    Each weight and bias must be the layer's own parameter, used as stored, and no
    module may have forward hooks or a parametrization: a hook (the old
    ``nn.utils.weight_norm``, or one that rescales an output) or a parametrization
    changes what a layer computes, which passes that run the layers by hand
    (here and ``curvlab.structured.sequential``) would not see.
    """
    if type(model) is not nn.Sequential or len(model) == 0:
        return False
    for module in (model, *model):
        if type(module) is not nn.Linear and not isinstance(module, ELEMENTWISE) and module is not model:
            return False
        if module._forward_pre_hooks or module._forward_hooks or nn.utils.parametrize.is_parametrized(module):
            return False
        if type(module) is nn.Linear:
            for name in ("weight", "bias"):
                tensor = getattr(module, name)
                if tensor is not None and module._parameters.get(name) is not tensor:
                    return False
    return True


def supports(problem: Problem) -> bool:
    """Whether the forms and products of ``problem`` are computed here (a plain MLP, ``(N, d)`` inputs)."""
    if problem.input_ndims != {2} or not plain_mlp(problem.model):
        return False
    own = {id(getattr(m, name)) for m in problem.model if type(m) is nn.Linear for name in ("weight", "bias")}
    return all(id(p) in own for p in problem.params)


@dataclass
class _Linear:
    weight: Tensor  # W, (d_out, d_in)
    inputs: Tensor  # a₀, (N, d_in)
    weight_index: int | None  # position of W among the problem's parameters (None: held fixed)
    bias_index: int | None
    adjoint: Tensor | None = None  # ḡ_z, the backpropagated ∇_f ℓ at the layer's output, (N, d_out)


@dataclass
class _Activation:
    first: Tensor  # σ'(z₀), (N, d)
    second: Tensor  # σ''(z₀)
    curvature_weight: Tensor | None = None  # ḡ_a σ''(z₀) (None: σ'' = 0, piecewise linear)


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
    output_gradient = rule.output_gradient(x, y)
    _backpropagate(steps, output_gradient)
    return PrimalBatch(steps, x, output_gradient, rule.mask(y), y)


def _backpropagate(steps: list[_Linear | _Activation], output_gradient: Tensor) -> None:
    """Store at every step the adjoint its second-order source meets (one backward sweep).

    Walking back from ḡ = ∇_f ℓ: a linear layer keeps ḡ at its output and passes
    ḡ W back; an activation keeps ḡ σ''(z₀) and passes ḡ σ'(z₀) back. The sweep
    stops at the first linear layer, whose input carries no first-order term.
    """
    adjoint = output_gradient
    first_linear = next((i for i, step in enumerate(steps) if isinstance(step, _Linear)), len(steps))
    for index in range(len(steps) - 1, first_linear - 1, -1):
        step = steps[index]
        if isinstance(step, _Linear):
            step.adjoint = adjoint
            if index > first_linear:
                adjoint = adjoint @ step.weight
        else:
            if bool(step.second.any()):
                step.curvature_weight = adjoint * step.second
            adjoint = adjoint * step.first


def _propagate(batch: PrimalBatch, direction: list[Tensor], second_order: bool):
    """Along one direction: the output's f₁ and the scalar ⟨∇_f ℓ, f₂⟩ (``None`` stands for zero).

    The scalar is summed from each layer's second-order source against the stored
    adjoint (module docstring), only when ``second_order``.
    """
    x1 = None
    second = None

    def add(term: Tensor) -> None:
        nonlocal second
        second = term if second is None else second + term

    for step in batch.steps:
        if isinstance(step, _Activation):
            if x1 is None:
                continue
            if second_order and step.curvature_weight is not None:
                add(torch.vdot(step.curvature_weight.reshape(-1), (x1 * x1).reshape(-1)))
            x1 = step.first * x1
            continue
        V = None if step.weight_index is None else direction[step.weight_index]
        v_b = None if step.bias_index is None else direction[step.bias_index]
        if second_order and V is not None and x1 is not None:  # 2 ⟨ḡ_z, V a₁⟩
            add(2.0 * torch.vdot(step.adjoint.reshape(-1), (x1 @ V.T).reshape(-1)))
        x1 = _linear_tangent(step, x1, V, v_b)
    return x1, second


def _linear_tangent(step: _Linear, x1: Tensor | None, V: Tensor | None, v_b: Tensor | None) -> Tensor | None:
    """z₁ = a₁ Wᵀ + a₀ Vᵀ + v_b of a linear step (``None``: zero)."""
    if V is not None:
        z1 = torch.addmm(v_b, step.inputs, V.T) if v_b is not None else step.inputs @ V.T
        if x1 is not None:
            z1.addmm_(x1, step.weight.T)
        return z1
    z1 = None if x1 is None else x1 @ step.weight.T
    if v_b is not None:
        z1 = v_b.expand(step.inputs.shape[0], -1) if z1 is None else z1.add_(v_b)
    return z1


def _loss_curvature(problem: Problem, batch: PrimalBatch, f1: Tensor) -> tuple[Tensor, Tensor]:
    """``(f₁, ∇²_f ℓ f₁)`` with rows without a loss term (``ignore_index``) zeroed in f₁, so in both."""
    if batch.mask is not None:
        f1 = f1 * batch.mask
    return f1, problem.loss_rule.hessian_vp(batch.output, f1, batch.target)


def quadratic_forms(
    problem: Problem, batches: Iterable[PrimalBatch], Vs: list[Tensor], second_order: bool
) -> Tensor:
    """vᵀHv (``second_order``) or vᵀGv for the k directions ``Vs[i]`` of shape ``(k, *param_shape)``.

    Returns:
        ``(k,)``, scaled by the problem's reduction factor.
    """
    k = Vs[0].shape[0]
    forms = torch.zeros(k, dtype=problem.dtype, device=problem.device)
    for batch in batches:
        for j in range(k):  # one direction at a time: GEMMs over the batch's rows
            f1, second = _propagate(batch, [V[j] for V in Vs], second_order)
            if f1 is None:  # no parameter of the problem in the direction's path
                continue
            f1, curvature = _loss_curvature(problem, batch, f1)
            forms[j] += torch.vdot(f1.reshape(-1), curvature.reshape(-1))
            if second is not None:
                forms[j] += second
    return forms.mul_(problem.reduction_factor)


def _first_parameter_step(steps: list[_Linear | _Activation]) -> int:
    """Index of the first linear step with a parameter of the problem (``len(steps)``: none)."""
    for index, step in enumerate(steps):
        if isinstance(step, _Linear) and (step.weight_index is not None or step.bias_index is not None):
            return index
    return len(steps)


class _Sink:
    """Where one direction's product goes: views ``dests[i]`` of the result, scaled by c.

    A parameter's first term is written over its view, later terms (a module used
    twice, later batches) are added; GEMM terms go straight into the view
    (``addmm`` with β = 0, then 1, and α = c). ``finish`` zeroes the parameters
    no term reached. No zero fill, no separate scaling pass, no copy.
    """

    def __init__(self, dests: list[Tensor], c: float):
        self.dests, self.c, self.written = dests, c, set()

    def addmm(self, index: int, a: Tensor, b: Tensor) -> None:
        """dests[index] (+)= c · a @ b."""
        dest = self.dests[index]
        torch.addmm(dest, a, b, beta=1 if index in self.written else 0, alpha=self.c, out=dest)
        self.written.add(index)

    def add(self, index: int, term: Tensor) -> None:
        """dests[index] (+)= c · term."""
        dest = self.dests[index]
        if index in self.written:
            dest.add_(term, alpha=self.c)
        else:
            torch.mul(term, self.c, out=dest)
        self.written.add(index)

    def finish(self) -> None:
        for index, dest in enumerate(self.dests):
            if index not in self.written:
                dest.zero_()


def _product(
    batch: PrimalBatch, direction: list[Tensor], sink: _Sink, problem: Problem, second_order: bool
) -> None:
    """(H v) (``second_order``) or (G v) of one batch into ``sink`` (which scales by c).

    The GGN product is the Hessian's without the terms of the network's own
    curvature (σ'' δ_a z₁, δ_zᵀ a₁, δ_z V): J v forward, Λ, then Jᵀ back
    (2 + 2 GEMMs a layer, 1 + 1 for the first).
    """
    steps = batch.steps
    tangents: list[Tensor | None] = []  # z₁ or a₁ entering each step (None: zero)
    x1 = None
    for step in steps:
        tangents.append(x1)
        if isinstance(step, _Activation):
            x1 = None if x1 is None else step.first * x1
            continue
        V = None if step.weight_index is None else direction[step.weight_index]
        v_b = None if step.bias_index is None else direction[step.bias_index]
        x1 = _linear_tangent(step, x1, V, v_b)
    d = None if x1 is None else _loss_curvature(problem, batch, x1)[1]  # δ̇, entering each step from above
    first = _first_parameter_step(steps)
    for index in range(len(steps) - 1, first - 1, -1):
        step, x1_in = steps[index], tangents[index]
        if isinstance(step, _Activation):  # δ̇_z = σ' δ̇_a + σ'' δ_a z₁
            new = None if d is None else step.first * d
            if second_order and step.curvature_weight is not None and x1_in is not None:
                term = step.curvature_weight * x1_in
                new = term if new is None else new.add_(term)
            d = new
            continue
        if step.weight_index is not None:  # δ̇_zᵀ a₀ + δ_zᵀ a₁
            if d is not None:
                sink.addmm(step.weight_index, d.T, step.inputs)
            if second_order and x1_in is not None:
                sink.addmm(step.weight_index, step.adjoint.T, x1_in)
        if step.bias_index is not None and d is not None:
            sink.add(step.bias_index, d.sum(0))
        if index > first:  # δ̇_a = δ̇_z W + δ_z V
            V = None if step.weight_index is None else direction[step.weight_index]
            new = None if d is None else d @ step.weight
            if second_order and V is not None:
                new = step.adjoint @ V if new is None else new.addmm_(step.adjoint, V)
            d = new


def products(
    problem: Problem,
    batches: Iterable[PrimalBatch],
    Vs: list[Tensor],
    second_order: bool,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """H V (``second_order``) or G V for the k directions ``Vs[i]`` ``(k, *param_shape)``, over all batches.

    Args:
        problem: A problem ``supports`` accepts.
        batches: Its primal passes (``primal``), one per batch.
        Vs: The directions, one ``(k, *param_shape)`` tensor per parameter.
        second_order: The Hessian (True) or the GGN (False).
        out: Tensors like ``Vs`` to write the products into (e.g. views of a flat
            vector); ``None``: new ones. They must not overlap ``Vs``.

    Returns:
        A list like ``Vs`` (``out`` if given), scaled by the problem's reduction factor.
    """
    k = Vs[0].shape[0]
    totals = [torch.empty_like(V) for V in Vs] if out is None else out
    sinks = [_Sink([t[j] for t in totals], problem.reduction_factor) for j in range(k)]
    for batch in batches:
        for j in range(k):  # one direction at a time: GEMMs over the batch's rows
            _product(batch, [V[j] for V in Vs], sinks[j], problem, second_order)
    for sink in sinks:
        sink.finish()
    return totals


def gradient(problem: Problem, batches: Iterable[PrimalBatch]) -> Tensor:
    """∇_θ R from the primal passes' adjoints (∇_W = c Σ δ_zᵀ a₀, ∇_b = c Σ δ_z): flat ``(n,)``."""
    totals = [torch.zeros_like(p) for p in problem.params]
    for batch in batches:
        for step in batch.steps:
            if not isinstance(step, _Linear) or step.adjoint is None:
                continue
            if step.weight_index is not None:
                totals[step.weight_index].addmm_(step.adjoint.T, step.inputs)
            if step.bias_index is not None:
                totals[step.bias_index].add_(step.adjoint.sum(0))
    return torch.cat([t.reshape(-1) for t in totals]).mul_(problem.reduction_factor)
