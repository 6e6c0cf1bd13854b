"""A learning rate set by the curvature: 1/λ_max (thesis §3.1.2, LeCun et al. 1993)."""

from __future__ import annotations

from torch import nn

from curvlab.operators.exact import exact_class
from curvlab.problem import Problem
from curvlab.spectra.diagnostics import learning_rate


def curvature_learning_rate(
    model: nn.Module, loss_fn: nn.Module, batch, curvature: str = "hessian", **lanczos
) -> float:
    """1 / λ_max of the Hessian (or GGN) on ``batch``, by Lanczos (``cl.top_eigen``).

    Use it to set SGD's step: ``torch.optim.SGD(model.parameters(), lr=curvature_learning_rate(...))``.
    """
    operator = exact_class(curvature, allowed=("hessian", "ggn"))
    lanczos.setdefault("progress", False)
    problem = Problem(model, loss_fn, tuple(batch), eval_mode=not model.training)  # the trained function
    return learning_rate(operator(problem), **lanczos)
