"""Optimizers built on the library's curvature objects (``torch.optim.Optimizer`` semantics).

``opt.step(closure, batch=(X, y))``: the closure re-evaluates loss and gradient
as in ``torch.optim``; ``batch`` is the minibatch the curvature is estimated on.
``opt.curvature`` is a regular curvlab curvature object.
"""

from curvlab.optim.base import CurvatureOptimizer
from curvlab.optim.centered import CenteredSGD
from curvlab.optim.lr import curvature_learning_rate
from curvlab.optim.preconditioned import ACP, EKFAC, KFAC, DiagonalGGN, HessianFree, Newton

__all__ = [
    "ACP",
    "CenteredSGD",
    "CurvatureOptimizer",
    "DiagonalGGN",
    "EKFAC",
    "HessianFree",
    "KFAC",
    "Newton",
    "curvature_learning_rate",
]
