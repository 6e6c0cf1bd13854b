r"""Block Lanczos for ``top_eigen(..., block_size=b)``: b vectors per product, thick restarts.

Each step multiplies a block of b orthonormal vectors at once (one ``(n, b)``
product: one pass over the data for b vectors) and orthogonalises the b results
against the whole basis by two classical Gram–Schmidt passes of GEMMs. The
projected matrix T = V C Vᵀ is filled from those coefficients, symmetric by
construction. With C V_jᵀ = V_jᵀ T_j + Q R E_jᵀ (Q the next block, R its b × b
coupling), a Ritz pair (θ_i, V s_i) has the residual norm ‖R s_i^{last}‖ (the last
block's rows of s_i): convergence is decided without extra products, and the k
results are confirmed by one block product at the end.

Why blocks: single-vector Lanczos finds an exactly repeated eigenvalue once and
resolves a cluster tighter than its tolerance slowly; a block of b vectors finds a
multiplicity up to b and takes a cluster of b eigenvalues as one. On a GPU a block
product costs little more than one product. On a CPU it costs about b products
(``docs/numerics.md`` has the figures), so single-vector Lanczos stays the default.

A thick restart (the block form of Krylov–Schur, Zhou & Saad 2008) keeps the most
wanted Ritz vectors; the pending block Q continues the basis, coupled to them by
R S^{last}. Where the new block is rank-deficient (an invariant subspace, or a
multiplicity exhausted), its missing directions are replaced by random ones,
coupled by 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.progress import progress_bar
from curvlab.spectra.lanczos import _row_norms


def _orthogonalize_block(basis: Tensor, W: Tensor) -> Tensor:
    """W ``(b, n)`` made orthogonal to the rows of ``basis`` ``(j, n)`` in place; returns H ``(j, b)``.

    Two classical Gram–Schmidt passes of GEMMs ("twice is enough"): W_before = W + Hᵀ basis.
    """
    H = basis @ W.T
    W.addmm_(H.T, basis, alpha=-1)
    correction = basis @ W.T
    W.addmm_(correction.T, basis, alpha=-1)
    return H + correction


def _orthonormal_block(
    W: Tensor, basis: Tensor, scale: float, generator: torch.Generator
) -> tuple[Tensor, int]:
    """Orthonormal rows Q ``(b, n)`` spanning W (orthogonal to ``basis``); random where W is deficient.

    Returns ``(Q, replaced)``: a direction of W with norm ≤ 10³ ε · ``scale`` after the
    orthogonalisation is a random one instead (how many: ``replaced``).
    """
    b, n = W.shape
    Q_t, R = torch.linalg.qr(W.T)  # (n, b), (b, b)
    tiny = R.diagonal().abs() <= 1e3 * torch.finfo(W.dtype).eps * max(scale, 1e-300)
    replaced = int(tiny.sum())
    if not replaced:
        return Q_t.T.contiguous(), 0
    fresh = Q_t.T.contiguous()
    draw = torch.randn(replaced, n, generator=generator, dtype=W.dtype).to(W.device)
    fresh[tiny] = draw
    # Orthogonal to the basis and to the kept directions, then orthonormal among themselves.
    kept = fresh[~tiny]
    for _ in range(2):
        others = torch.cat([basis, kept]) if kept.shape[0] else basis
        fresh[tiny] -= (fresh[tiny] @ others.T) @ others
    Q_new, _ = torch.linalg.qr(fresh[tiny].T)
    fresh[tiny] = Q_new.T
    return fresh, replaced


def block_top_eigen(
    C,
    matvec,
    k: int,
    tol: float,
    max_matvecs: int,
    basis_size: int,
    block_size: int,
    guarded: int,
    start: Tensor,
    generator: torch.Generator,
    order,
    agree,
    progress: bool | None,
):
    """The block iteration behind ``top_eigen``: ``(values, vectors, residuals, matvecs, converged, ‖C‖)``.

    ``start`` is the unit start vector (the block's first row; the others random);
    ``order(values)`` ranks Ritz values from most to least wanted; ``agree(flag)``
    is rank 0's decision under a process group; ``basis_size`` ≥ guarded + 2b or n.
    """
    from curvlab.spectra.lanczos import _combine_rows_in_place, _not_finite

    n, dtype, device = start.shape[0], start.dtype, start.device
    b, m = block_size, basis_size
    V = torch.empty(m + b, n, dtype=dtype, device=device)
    T = torch.zeros(m + b, m + b, dtype=dtype, device=device)
    first = torch.randn(min(b, n), n, generator=generator, dtype=dtype).to(device)
    first[0] = start
    V[: first.shape[0]], _ = _orthonormal_block(first, V[:0], 1.0, generator)
    size, width, matvecs, norm_estimate = 0, first.shape[0], 0, 0.0
    target = tol  # what the estimates must reach before a confirming product
    bar = progress_bar(total=max_matvecs, desc=f"top-{k} eigen (blocks of {b})", enabled=progress)
    while True:
        W = matvec(V[size : size + width].T).T.contiguous()  # (width, n): one pass for the block
        matvecs += width
        bar.update(width)
        H = _orthogonalize_block(V[: size + width], W)
        if not bool(torch.isfinite(H).all() and torch.isfinite(W).all()):
            bar.close()
            raise _not_finite(matvecs)
        T[: size + width, size : size + width] = H
        T[size : size + width, : size + width] = H.T
        new = T[size : size + width, size : size + width]
        new.copy_((new + new.T) / 2)
        size += width
        theta, S = torch.linalg.eigh(T[:size, :size])
        norm_estimate = max(norm_estimate, theta.abs().max().item(), 1e-300)
        if size < n:
            Q, _ = _orthonormal_block(W, V[:size], norm_estimate, generator)
            R = Q @ W.T  # the last block's products along the next block: C V_lastᵀ = … + Qᵀ R
        else:  # the basis spans everything: the Ritz pairs are exact
            Q, R = W[:0], W.new_zeros(0, width)
        ranked = order(theta)
        wanted = ranked[: min(guarded, size)]
        estimates = (R @ S[size - width : size, wanted]).norm(dim=0)
        exhausted = matvecs + b > max_matvecs
        done = size >= n or (size >= guarded and bool((estimates <= target * norm_estimate).all()))
        if agree(done or exhausted):
            keep = ranked[:k]
            rows = S[:, keep].T @ V[:size]  # the Ritz vectors, (k, n)
            rows /= _row_norms(rows).unsqueeze(1)  # unit to rounding (float64-summed dots)
            vectors = rows.T
            products = matvec(vectors)  # one confirming block product
            matvecs += k
            bar.update(k)
            values = (vectors * products).sum(0)  # Rayleigh quotients: error O(residual²)
            residuals = (products - vectors * values).norm(dim=0)
            converged = agree(size >= n or bool((residuals <= tol * norm_estimate).all()))
            if converged or exhausted:
                break
            # The products' own residuals are above the estimates (rounding in the products):
            # ask the estimates for that much more before the next confirming product.
            target *= 0.5 * tol * norm_estimate / max(residuals.max().item(), 1e-300)
        if size + min(Q.shape[0], n - size) > m:  # thick restart: the most wanted Ritz vectors, then Q
            kept = ranked[: min(m - b, max(guarded, (m - b + guarded) // 2))]
            _combine_rows_in_place(V, size, S[:, kept])
            size = kept.shape[0]
            T.zero_()
            T[:size, :size] = torch.diag(theta[kept])  # their couplings to Q come with its products
        width = min(Q.shape[0], n - size)  # fewer than b only where the basis then spans everything
        V[size : size + width] = Q[:width]
    bar.close()
    if isinstance(C, CurvatureOperator):
        C.from_rank_zero(values, vectors, residuals)
    return values, vectors, residuals, matvecs, converged, norm_estimate


def default_basis_size(guarded: int, block_size: int, n: int, entries: int) -> int:
    """Vectors kept between restarts: twice the guarded pairs and eight blocks, or all that fit ``entries``.

    A restart keeps about half the basis, so about four block steps run between restarts.
    """
    return min(n, max(2 * guarded + 8 * block_size, 20, entries // n))
