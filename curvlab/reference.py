r"""Dense float64 ground truth for tiny models, written independently of the operators.

Each function concatenates all batches of a ``Problem`` into one batch, copies
the parameters to float64, and builds the matrix straight from its definition
with ``torch.func`` reverse mode (``jacrev``, ``grad``) and the user's own loss
object — none of curvlab's loss rules or operators are used. Intended for models
with at most a few thousand parameters and a few hundred outputs.

Every derivative is taken of the whole batch's output: an example's output
f_n = F(θ, X_all)_n and loss ℓ_n may depend on the other examples (batch norm
in training mode), as they do for the operators when the data is one batch.
Second derivatives are ``jacrev(grad(·))``: through batch norm in training mode
torch's ``jacfwd(jacrev(·))`` (``torch.func.hessian``, see pytorch/pytorch#196699)
and ``jacrev(jacrev(·))`` both return wrong ones (checked against finite differences
in ``tests/test_batch_norm.py``).

* ``hessian``: ∇²_θ of ``loss_fn(model(X_all), y_all)``.
* ``ggn``: Jᵀ (∇²_F L) J with J = ∂F/∂θ of the stacked outputs F and L the loss
  object on all outputs — the reduction factor comes from the loss itself.
* ``fisher``: c Σ_n J_nᵀ E_ŷ[g g ᵀ] J_n with g = ∇_f ℓ(f_n, ŷ) by autodiff and the
  expectation by enumeration (classes for cross-entropy, all 2^C outcomes for
  BCE) or, for MSE, the covariance of the Gaussian with variance 1/2.
* ``empirical_fisher``: c Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ, the gradients of the per-example
  losses from one Jacobian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev

from curvlab.problem import call_with

MAX_REFERENCE_PARAMS = 20_000


def _setup(problem):
    """All data as one float64 batch, flat float64 θ, and f(θ_flat, X)."""
    Xs, ys = zip(*[(X, y) for X, y in problem.data])
    X = torch.cat([x.detach().to(torch.float64) if x.is_floating_point() else x for x in Xs])
    y = torch.cat([t.detach().to(torch.float64) if t.is_floating_point() else t for t in ys])
    device = problem.params[0].device
    X, y = X.to(device), y.to(device)
    theta = torch.cat([p.detach().to(torch.float64).flatten() for p in problem.params])
    if theta.numel() > MAX_REFERENCE_PARAMS:
        raise ValueError(f"reference matrices are for tiny models (≤ {MAX_REFERENCE_PARAMS} params)")
    shapes = [p.shape for p in problem.params]
    sizes = [p.numel() for p in problem.params]
    names = problem.param_names
    model = problem.model
    others = {
        name: t.detach().to(torch.float64) if t.is_floating_point() else t
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
        if name not in names
    }

    def f(theta_flat: Tensor, inputs: Tensor) -> Tensor:
        tensors = [t.reshape(s) for t, s in zip(theta_flat.split(sizes), shapes)]
        state = dict(others)
        state.update(zip(names, tensors))
        with problem.model_mode():  # eval mode, or the model's own without side effects
            return call_with(model, state, (inputs,))

    return X, y, theta, f


def _factor(loss_fn: nn.Module, y: Tensor, output_shape) -> float:
    """The reduction factor c (docs/theory.md): 1/(number of loss terms) for mean, 1 for sum."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if y.is_floating_point():  # probability targets (N, C, ...): a term per position
            return 1.0 / (y.numel() // y.shape[1])
        return 1.0 / int((y != loss_fn.ignore_index).sum())
    return 1.0 / torch.Size(output_shape).numel()


def _sum_loss(loss_fn: nn.Module) -> nn.Module:
    """The same loss with ``reduction="sum"`` (ℓ_n summed over the example), for the data's targets."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return nn.CrossEntropyLoss(
            reduction="sum", ignore_index=loss_fn.ignore_index, label_smoothing=loss_fn.label_smoothing
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return nn.BCEWithLogitsLoss(reduction="sum", pos_weight=loss_fn.pos_weight)
    return type(loss_fn)(reduction="sum")


def hessian_matrix(problem) -> Tensor:
    """Dense Hessian of the risk, (n, n) float64."""
    X, y, theta, f = _setup(problem)
    return _second_derivative(lambda t: problem.loss_fn(f(t, X), y), theta)


def ggn(problem) -> Tensor:
    """Dense GGN Jᵀ (∇²_F L) J, (n, n) float64."""
    X, y, theta, f = _setup(problem)
    F = f(theta, X)
    J = jacrev(lambda t: f(t, X).flatten())(theta)  # (N·C, n)
    output_hessian = _second_derivative(lambda out: problem.loss_fn(out.reshape(F.shape), y), F.flatten())
    return J.T @ output_hessian @ J


def _second_derivative(scalar_function, x: Tensor) -> Tensor:
    """∇² of a scalar function at ``x`` (flat): the Jacobian of its gradient, reverse over reverse."""
    return jacrev(grad(scalar_function))(x)


def _per_example_jacobians(problem, X, theta, f) -> Tensor:
    """J_n = ∂f_n/∂θ for every example, through the whole batch: (N, outputs per example, n)."""
    J = jacrev(lambda t: f(t, X))(theta)  # (N, *output shape, n)
    return J.reshape(X.shape[0], -1, theta.numel())


def _output_score_covariance(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """E_ŷ[g gᵀ], g = ∇_f ℓ(f, ŷ) for one example's output ``f`` (shape (1, …)), flat indices.

    The model's distribution factorizes over the loss terms (positions of a cross-entropy
    output (1, C, …), elements of a BCE output), so each term's outcomes are enumerated on
    their own and different terms' scores are uncorrelated (each has mean zero). A
    cross-entropy position whose data target is ``ignore_index`` has no term.
    """
    d = output.numel()
    if isinstance(loss_fn, nn.MSELoss):
        # ŷ ~ N(f, ½ I), g = 2(f − ŷ): E[g gᵀ] = 4 · ½ I.
        return 2.0 * torch.eye(d, dtype=output.dtype, device=output.device)
    covariance = torch.zeros(d, d, dtype=output.dtype, device=output.device)
    index = torch.arange(d, device=output.device).reshape(output.shape)
    if isinstance(loss_fn, nn.CrossEntropyLoss):

        def term(z, k):  # the model's likelihood: no label smoothing (a loss option, not the model)
            return nn.functional.cross_entropy(z[None], k[None], reduction="sum")

        logits = output.movedim(1, -1).reshape(-1, output.shape[1])  # (positions, C)
        flat_index = index.movedim(1, -1).reshape(-1, output.shape[1])
        if target.is_floating_point():  # probability targets: every position has a term
            kept = torch.ones(logits.shape[0], dtype=torch.bool)
        else:
            kept = (target != loss_fn.ignore_index).flatten()
        for z, where, has_term in zip(logits, flat_index, kept):
            if has_term:
                classes = [(p, torch.tensor(k, device=z.device)) for k, p in enumerate(z.softmax(0))]
                _accumulate(covariance, where, z, term, classes)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):

        def term(z, t):  # the model's likelihood: no pos_weight (a loss option, not the model)
            return nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum")

        for z, where in zip(output.flatten(), index.flatten()):
            s = torch.sigmoid(z)
            bits = [(s, torch.ones_like(z)[None]), (1 - s, torch.zeros_like(z)[None])]
            _accumulate(covariance, where[None], z[None], term, bits)
    else:
        raise ValueError(f"no reference Fisher for {type(loss_fn).__name__}")
    return covariance


def _accumulate(covariance: Tensor, index: Tensor, z: Tensor, term, outcomes) -> None:
    """covariance[index, index] += Σ_outcomes p g gᵀ, g = ∇_z term(z, outcome)."""
    block = torch.zeros(len(index), len(index), dtype=z.dtype, device=z.device)
    for prob, outcome in outcomes:
        g = grad(lambda w, t=outcome: term(w, t))(z).flatten()
        block += prob * torch.outer(g, g)
    covariance[index[:, None], index[None, :]] += block


def fisher(problem) -> Tensor:
    """Dense exact (type-2) Fisher, (n, n) float64."""
    X, y, theta, f = _setup(problem)
    with torch.no_grad():
        outputs = f(theta, X)
    c = _factor(problem.loss_fn, y, outputs.shape)
    J = _per_example_jacobians(problem, X, theta, f)
    result = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64, device=theta.device)
    for n in range(X.shape[0]):
        covariance = _output_score_covariance(problem.loss_fn, outputs[n : n + 1], y[n : n + 1])
        result += J[n].T @ covariance @ J[n]
    return c * result


def empirical_fisher(problem) -> Tensor:
    """Dense empirical Fisher c Σ_n ∇ℓ_n ∇ℓ_nᵀ with true labels, (n, n) float64."""
    X, y, theta, f = _setup(problem)
    sum_loss = _sum_loss(problem.loss_fn)
    with torch.no_grad():
        outputs = f(theta, X)
    c = _factor(problem.loss_fn, y, outputs.shape)

    def example_losses(t):  # ℓ_n of the whole batch's outputs: (N,)
        F = f(t, X)
        return torch.stack([sum_loss(F[n : n + 1], y[n : n + 1]) for n in range(X.shape[0])])

    G = jacrev(example_losses)(theta)  # (N, n)
    return c * G.T @ G
