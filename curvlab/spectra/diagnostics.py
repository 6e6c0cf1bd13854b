r"""Scalar diagnostics built on the spectra: conditioning, saddles, curvature along g.

* Condition number κ = λ_max / λ_min⁺ (docs/theory.md). Curvature matrices of networks
  are singular PSD (rank ≤ outputs × examples), so λ_min⁺ is the smallest
  eigenvalue above a rank cutoff rtol · λ_max, as in a numerical rank.
* Negative-eigenvalue share of the Hessian: the fraction of eigenvalues below
  −rtol · max|λ| (exact) or the quadrature mass below it (SLQ).
* Curvature along the gradient (lecture slides, ill-conditioning): a step −εg
  changes the loss by −ε gᵀg + ½ ε² gᵀCg, minimised by ε* = gᵀg / gᵀCg with a
  predicted decrease (gᵀg)² / (2 gᵀCg).
* The learning rate 1/λ_max (thesis §3.1.2): gradient descent on the quadratic
  model is stable below 2/λ_max, and 1/λ_max is the step that minimises it along
  the top eigenvector.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.operators.base import CurvatureOperator
from curvlab.options import check_nonnegative
from curvlab.spectra.density import spectral_density
from curvlab.spectra.exact import eigvalsh
from curvlab.spectra.lanczos import top_eigen
from curvlab.spectra.trace import quadratic_forms

EXACT_LIMIT = 4000  # matrices up to this size are diagonalised exactly by "auto"


def _use_exact(C, method: str) -> bool:
    if method not in ("auto", "exact", "lanczos", "slq"):
        raise ValueError(f"method must be 'auto', 'exact', 'lanczos' or 'slq', got {method!r}")
    if method == "auto":
        structured = isinstance(C, CurvatureOperator) and C.structured_eigvalsh
        return structured or C.shape[0] <= EXACT_LIMIT
    return method == "exact"


@dataclass
class ConditionNumber:
    """κ = λ_max / λ_min⁺ and how it was obtained.

    Attributes:
        value: κ (``inf`` when no eigenvalue above the cutoff but λ_max).
        lambda_max: Largest eigenvalue.
        lambda_min: λ_min⁺, the smallest eigenvalue above ``cutoff``.
        cutoff: rtol · λ_max.
        rank: Eigenvalues above the cutoff (exact method only, else ``None``).
        method: ``"exact"`` or ``"lanczos"``.
        converged: Whether Lanczos converged on λ_min. If not, its Ritz value is
            still ≥ the true λ_min (interlacing), so ``value`` is a lower bound.
    """

    value: float
    lambda_max: float
    lambda_min: float
    cutoff: float
    rank: int | None
    method: str
    converged: bool = True


def condition_number(C, rtol: float | None = None, method: str = "auto", **lanczos) -> ConditionNumber:
    """κ of a PSD curvature object, λ_min taken above a rank cutoff.

    Args:
        C: A curvature object (PSD: GGN, Fisher, EF, KFAC, ...).
        rtol: Eigenvalues ≤ rtol · λ_max count as zero (default n · eps of the
            dtype, the numerical-rank convention of ``torch.linalg.matrix_rank``).
        method: ``"exact"`` (all eigenvalues), ``"lanczos"`` (extreme eigenvalues
            matrix-free; when the smallest is below the cutoff the matrix is
            singular and λ_min⁺ cannot be reached this way, so κ is reported as
            ``inf``; the cutoff is then at least Lanczos' tolerance · λ_max) or
            ``"auto"`` (exact when small or structured).
        **lanczos: Options of ``top_eigen``.
    """
    n = C.shape[0]
    rtol = n * torch.finfo(C.dtype).eps if rtol is None else check_nonnegative("rtol", rtol)
    if _use_exact(C, method):
        values = eigvalsh(C)
        lambda_max = values[-1].item()
        cutoff = rtol * lambda_max
        above = values[values > cutoff]
        lambda_min = above[0].item() if len(above) else math.nan
        value = lambda_max / lambda_min if len(above) else math.inf  # rank 1: κ = 1; zero matrix: ∞
        return ConditionNumber(value, lambda_max, lambda_min, cutoff, len(above), "exact", True)
    lambda_max = top_eigen(C, 1, "largest", **lanczos).values[0].item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported through `converged`
        bottom = top_eigen(C, 1, "smallest", **lanczos)
    smallest = bottom.values[0].item()
    # Lanczos resolves eigenvalues only to about its tolerance times ‖C‖: below
    # that an eigenvalue cannot be told from zero.
    tol = lanczos.get("tol") or (1e-6 if C.dtype == torch.float64 else 1e-4)
    cutoff = max(rtol, tol) * lambda_max
    value = lambda_max / smallest if smallest > cutoff else math.inf
    return ConditionNumber(value, lambda_max, smallest, cutoff, None, "lanczos", bottom.converged)


def negative_eigenvalue_share(C, rtol: float = 1e-8, method: str = "auto", **slq) -> float:
    """Fraction of eigenvalues below −rtol · max|λ| (of a Hessian: saddle directions).

    ``method="exact"`` counts eigenvalues; ``"slq"`` integrates the quadrature
    mass of ``spectral_density`` (options in ``**slq``); ``"auto"`` is exact when small.
    """
    rtol = check_nonnegative("rtol", rtol)
    if _use_exact(C, method if method != "slq" else "lanczos"):
        values = eigvalsh(C)
        threshold = -rtol * values.abs().max().item()
        return (values < threshold).double().mean().item()
    density = spectral_density(C, **slq)
    used = density.weights > 0
    threshold = -rtol * density.nodes[used].abs().max().item()
    return density.mass_below(threshold)


@dataclass
class CurvatureAlongDirection:
    """Second-order model of the loss along −ε g.

    Attributes:
        g_dot_g: gᵀg.
        g_C_g: gᵀCg.
        rayleigh_quotient: gᵀCg / gᵀg, the curvature along g.
        best_step: ε* = gᵀg / gᵀCg (``inf`` if gᵀCg ≤ 0: no minimum along g).
        predicted_decrease: (gᵀg)² / (2 gᵀCg) at ε* (``inf`` if gᵀCg ≤ 0).
    """

    g_dot_g: float
    g_C_g: float
    rayleigh_quotient: float
    best_step: float
    predicted_decrease: float


def curvature_along_gradient(C, direction: Tensor | None = None) -> CurvatureAlongDirection:
    """gᵀg, gᵀCg, the best step and the predicted decrease along g.

    Args:
        C: A curvature object built on a ``Problem`` (``C.problem``) or any
            curvature object when ``direction`` is given.
        direction: Flat ``(n,)`` direction; default the problem's gradient ∇R.
    """
    if direction is None:
        problem = getattr(C, "problem", None)
        if problem is None:
            raise ValueError(f"{type(C).__name__} has no problem; pass the direction explicitly")
        direction = problem.gradient()
    elif not bool(torch.isfinite(direction).all()):
        raise DataError("the direction has NaN or Inf entries")
    gg = direction.dot(direction).item()
    gCg = quadratic_forms(C, direction.unsqueeze(1)).item()  # a form: plain MLPs need no product
    step = gg / gCg if gCg > 0 else math.inf
    decrease = gg * gg / (2 * gCg) if gCg > 0 else math.inf
    return CurvatureAlongDirection(gg, gCg, gCg / gg if gg > 0 else math.nan, step, decrease)


def learning_rate(C, **lanczos) -> float:
    """1 / λ_max (thesis §3.1.2), λ_max by ``top_eigen`` (options in ``**lanczos``)."""
    lambda_max = top_eigen(C, 1, "largest", **lanczos).values[0].item()
    if lambda_max <= 0:
        raise ValueError(f"λ_max = {lambda_max:.3e} ≤ 0: no curvature-set learning rate")
    return 1.0 / lambda_max
