"""Batched conjugate gradient on matrix-free products (Hessian-free solves)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.errors import NotPositiveDefiniteError
from curvlab.options import check_count


def conjugate_gradient(
    matmat: Callable[[Tensor], Tensor],
    B: Tensor,
    tol: float = 1e-6,
    maxiter: int | None = None,
    agree: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Solve A X = B column by column, all columns advanced in one batched product.

    Args:
        matmat: X ↦ A X for X of shape (n, k); A symmetric positive definite.
        B: Right-hand sides, shape (n, k).
        tol: Stop a column when ‖b − A x‖ ≤ tol · ‖b‖.
        maxiter: Iteration cap (default 10 n).
        agree: Applied to every boolean decision (the columns still active, the
            non-positive curvature check): under a process group, rank 0's decision
            for every rank, so that none takes another branch.

    Returns:
        ``(X, relative_residuals, iterations)``.

    Raises:
        NotPositiveDefiniteError: a search direction p with pᵀ A p ≤ 0.
    """
    n, _k = B.shape
    agree = agree or (lambda decision: decision)
    maxiter = 10 * n if maxiter is None else check_count("maxiter", maxiter)
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    b_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    rs = (R * R).sum(0)
    active = agree((rs.sqrt() / b_norm) > tol)
    iteration = 0
    while bool(active.any()) and iteration < maxiter:
        AP = matmat(P)
        curvature = (P * AP).sum(0)
        if bool(agree((curvature[active] <= 0).any().reshape(1))):
            raise NotPositiveDefiniteError(
                "conjugate gradient met non-positive curvature pᵀ(C + damping·I)p ≤ 0: the "
                "damped matrix is not positive definite (the Hessian can be indefinite); "
                "increase damping or use a PSD curvature (GGN, Fisher)"
            )
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(0)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        P = R + beta * P
        rs = rs_new
        active = agree((rs.sqrt() / b_norm) > tol)
        iteration += 1
    residual = (B - matmat(X)).norm(dim=0) / b_norm
    if bool((residual > 10 * tol).any()):
        warnings.warn(
            f"conjugate gradient stopped after {iteration} iterations with relative residual "
            f"{residual.max().item():.2e} > tol={tol:.1e}; raise maxiter or damping",
            RuntimeWarning,
            stacklevel=3,
        )
    return X, residual, iteration
