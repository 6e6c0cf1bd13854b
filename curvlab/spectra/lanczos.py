r"""Lanczos with full reorthogonalization, written in torch, on the operator's device.

Two uses of the same Krylov machinery:

* ``top_eigen``: extreme eigenpairs by a thick-restarted (Krylov–Schur) Lanczos
  iteration (Wu & Simon 2000; Stewart 2001). The basis is orthogonalised twice
  against all previous vectors ("twice is enough", Giraud et al. 2005), so no
  spurious copies of converged eigenvalues appear. After m steps,
  C V_m = V_m T_m + β v_{m+1} e_mᵀ, and a Ritz pair (θ_i, V_m s_i) has residual
  norm |β s_{m,i}|, which decides convergence without extra products. Until a
  restart, the coefficients of every product are kept (the Hessenberg matrix
  H_m with C V_m = V_{m+1} H_m, exact to rounding even where the products are
  not symmetric), so the residuals reported are those of the products made:
  ‖H_m s − θ [s; 0]‖, no confirming product.
* ``lanczos_tridiagonal``: the plain m-step tridiagonalisation of several start
  vectors at once (one batched product per step), used by stochastic Lanczos
  quadrature.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.errors import DataError, NonFiniteError
from curvlab.memory import block_budget, check_workspace
from curvlab.operators.base import CurvatureOperator, in_fixed_state
from curvlab.options import check_count, check_integer, check_positive
from curvlab.progress import progress_bar
from curvlab.records import RecordParts, numpy, recordable

WHICH = ("largest", "smallest", "magnitude")
STARTS = ("auto", "random", "gradient")


@recordable("top_eigen")
@dataclass
class EigenResult:
    """Eigenpairs from ``top_eigen``; unpacks as ``values, vectors = result``.

    Attributes:
        values: ``(k,)`` Ritz values, ordered by ``which`` (largest first, smallest
            first, or largest magnitude first).
        vectors: ``(n, k)`` orthonormal Ritz vectors, flat in parameter order.
        residuals: ``(k,)`` ‖C v_i − λ_i v_i‖: from the recorded products'
            coefficients where the basis never restarted (``top_eigen``, Note),
            else by k confirming products.
        num_matvecs: Operator products used, any confirming ones included.
        converged: Whether every residual met the tolerance.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool

    def __iter__(self):
        return iter((self.values, self.vectors))

    @property
    def relative_residuals(self) -> Tensor:
        """‖C v_i − λ_i v_i‖ / |λ_i|."""
        return self.residuals / self.values.abs()

    def to_record(self, settings: dict) -> RecordParts:
        """Values and residuals; the vectors too with ``settings["save_vectors"]``."""
        data = {"values": numpy(self.values), "residuals": numpy(self.residuals)}
        if settings.pop("save_vectors", False):
            data["vectors"] = numpy(self.vectors)
        settings.setdefault("method", "lanczos")
        settings.update(num_matvecs=self.num_matvecs, converged=self.converged)
        return RecordParts("top_eigen", data, settings)

    @classmethod
    def from_record(cls, record) -> EigenResult:
        """The result of a ``top_eigen`` record (``vectors`` empty unless they were saved)."""
        values = torch.as_tensor(record.data["values"])
        vectors = record.data.get("vectors")
        vectors = (
            torch.empty(0, len(values), dtype=values.dtype) if vectors is None else torch.as_tensor(vectors)
        )
        settings = record.settings
        return cls(
            values,
            vectors,
            torch.as_tensor(record.data["residuals"]),
            settings["num_matvecs"],
            settings["converged"],
        )


def check_symmetric_matrix(C: Tensor) -> None:
    """A square, finite, symmetric (to √ε of its largest entry) float32/float64 tensor, or a DataError."""
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise DataError(f"expected a square matrix, got shape {tuple(C.shape)}")
    _check_dtype(C.dtype)
    if not bool(torch.isfinite(C).all()):
        raise NonFiniteError("the matrix has NaN or Inf entries")
    scale = C.abs().max()
    if bool((C - C.T).abs().max() > torch.finfo(C.dtype).eps ** 0.5 * scale):
        raise DataError("the matrix is not symmetric: spectra here are of symmetric matrices")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise DataError(f"spectra need float32 or float64, got {dtype}: cast the model or matrix first")


def _as_matvec(C):
    if isinstance(C, CurvatureOperator):
        _check_dtype(C.dtype)
        return C.shape[0], C.dtype, C.device, lambda V: C @ V
    if isinstance(C, Tensor):
        check_symmetric_matrix(C)
        return C.shape[0], C.dtype, C.device, lambda V: C @ V
    raise TypeError(f"expected a curvlab curvature object or a square tensor, got {type(C).__name__}")


def _agree(C, flag: bool) -> bool:
    """Rank 0's decision under a process group (``CurvatureOperator.agree``), else ``flag``."""
    return C.agree(bool(flag)) if isinstance(C, CurvatureOperator) else bool(flag)


def _not_finite(products: int) -> NonFiniteError:
    return NonFiniteError(
        f"a product with the curvature is not finite (NaN or Inf after {products} products): "
        "check the model's parameters and the data"
    )


def _matvec_into(C, v: Tensor, out: Tensor) -> Tensor:
    """C v written into ``out`` (a row of a preallocated basis)."""
    if isinstance(C, CurvatureOperator):
        return C._matvec_into(v, out)
    return torch.mv(C, v, out=out)


def _order(values: Tensor, which: str) -> Tensor:
    """Indices of ``values`` from most to least wanted."""
    if which == "largest":
        return torch.argsort(values, descending=True)
    if which == "smallest":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def _row_dots(A: Tensor, B: Tensor) -> Tensor:
    """aᵢ · bᵢ for the rows of two ``(p, n)`` matrices: ``(p,)``, one BLAS dot per row.

    Lanczos' coefficients and norms are dots of nearly parallel vectors (C v and v),
    where float32 rounding accumulates. Measured on this project's CPUs at 3 · 10⁶
    entries: a dot is 1e-6 off relative to ‖a‖‖b‖, torch's vector norm 6e-5 (1e-5
    at 10⁶), and ``bmm`` of ``(p, 1, n)`` by ``(p, n, 1)`` with p > 1 2e-3 (and 15
    times slower): errors that skew the basis' orthonormality, and so the Ritz
    values, by as much.
    """
    return torch.stack([_dot(a, b) for a, b in zip(A, B)])


_DOT_CHUNK = 1 << 16


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """The dot product of flat vectors; on a CPU in float32, dots of 65,536 entries summed in float64.

    One float32 BLAS dot accumulates rounding along the whole vector; at 10⁷ entries
    that is enough to skew the Lanczos basis' norms, and so the Ritz values. Chunks
    keep each partial sum short for the price of a few hundred short dots.
    """
    if a.device.type != "cpu" or a.dtype == torch.float64 or a.numel() <= _DOT_CHUNK:
        return torch.dot(a, b)
    parts = torch.stack([torch.dot(x, y) for x, y in zip(a.split(_DOT_CHUNK), b.split(_DOT_CHUNK))])
    return parts.double().sum().to(a.dtype)


def _row_norms(A: Tensor) -> Tensor:
    """‖aᵢ‖ of the rows of a ``(p, n)`` matrix by dots (``_row_dots``: accurate in float32)."""
    return _row_dots(A, A).sqrt()


def _norm(v: Tensor) -> Tensor:
    """‖v‖ of a flat vector by one dot (``_dot``: accurate in float32)."""
    return _dot(v, v).sqrt()


def _random_unit(n: int, dtype, device, generator: torch.Generator) -> Tensor:
    # Drawn on the CPU so a seed gives the same start on every device (in the
    # operator's float dtype: a float64 draw costs four times a float32 one).
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    v = torch.randn(n, generator=generator, dtype=draw_dtype).to(device, dtype)
    return v / _norm(v)


def _start_vector(C, start, which: str, n: int, dtype, device, generator: torch.Generator) -> Tensor:
    """The unit start vector of ``top_eigen`` (see its ``start`` argument)."""
    if isinstance(start, Tensor):
        if start.shape != (n,):
            raise DataError(f"start must be a flat ({n},) vector, got shape {tuple(start.shape)}")
        v = start.detach().to(device, dtype).clone()
        if not bool(torch.isfinite(v).all()) or _norm(v) == 0:
            raise DataError("start must be finite and nonzero")
        return v / _norm(v)
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS} or a flat tensor, got {start!r}")
    random = _random_unit(n, dtype, device, generator)
    has_gradient = callable(getattr(C, "gradient", None))
    if start == "gradient" and not has_gradient:
        raise ValueError(f"start='gradient' needs a curvature object of a problem, got {type(C).__name__}")
    if start == "random" or (start == "auto" and (which == "smallest" or not has_gradient)):
        return random
    # The gradient lies mostly in the top eigenspace of the Hessian and GGN
    # (Gur-Ari, Roberts & Dyer 2018), so Lanczos started there converges in fewer
    # steps; the equal random part keeps every eigenvector in the start (with
    # probability 1), so none can be missed where the gradient is orthogonal to it.
    gradient = C.gradient().to(dtype)
    norm = _norm(gradient)
    if not bool(torch.isfinite(norm)) or norm == 0:
        return random
    v = gradient / norm + random
    return v / _norm(v)


def _combine_rows_in_place(V: Tensor, m: int, Q: Tensor) -> None:
    """V[:k] ← Qᵀ V[:m] for Q ``(m, k)``, k ≤ m, column block by column block.

    Each block's result is computed from its own columns before they are
    overwritten, so no ``(k, n)`` temporary (for millions of parameters, hundreds
    of MB of fresh pages) and no second pass to copy it back.
    """
    k = Q.shape[1]
    Qt = Q.T.contiguous()
    columns = max(1, block_budget(V.device) // (k * V.element_size()))
    for start in range(0, V.shape[1], columns):
        V[:k, start : start + columns] = Qt @ V[:m, start : start + columns]


def _orthogonalize(basis: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of W made orthogonal to its own basis, in place: ``(h, norms)``.

    ``basis`` is ``(p, j, n)`` (p bases of j orthonormal rows), ``W`` ``(p, n)``;
    afterwards W_before = W + hᵀ basis per row, with ``h`` ``(p, j)``, and ``norms``
    ``(p,)`` are the rows' norms. The newest two basis rows first (where the
    three-term recurrence puts most of W), then one classical Gram–Schmidt pass
    over all rows, repeated only when it removed more than 1 − 1/√2 of what was
    left (the DGKS criterion; Daniel, Gragg, Kaufman & Stewart 1976), which keeps
    the basis orthogonal to rounding at about one pass over it per step. Updates
    are fused batched GEMVs (``baddbmm_``): no temporaries the size of W.
    """
    rows = W.unsqueeze(1)  # (p, 1, n), a view: rows − cᵀ B is written into W
    h = torch.zeros(basis.shape[:2], dtype=W.dtype, device=W.device)
    local = basis[:, -2:]
    coefficients = _coefficients(local, W)  # (p, 1, ≤ 2)
    rows.baddbmm_(coefficients, local, alpha=-1)
    h[:, -2:] += coefficients[:, 0]
    norms = _row_norms(W)
    for _ in range(3):
        before = norms
        coefficients = _coefficients(basis, W)
        rows.baddbmm_(coefficients, basis, alpha=-1)
        h += coefficients[:, 0]
        norms = _row_norms(W)
        if bool((norms >= before / math.sqrt(2)).all()):
            break
    return h, norms


def _coefficients(basis: Tensor, W: Tensor) -> Tensor:
    """Each row of W against its own basis: ``(p, 1, j)`` for ``basis`` ``(p, j, n)``, W ``(p, n)``.

    One batched GEMV, except for a one-row basis of several probes, where ``bmm``
    falls back to a slow, inaccurate kernel (``_row_dots``): dots there.
    """
    p, j, _ = basis.shape
    if j == 1 and p > 1:
        return _row_dots(basis[:, 0], W).view(p, 1, 1)
    return torch.bmm(basis, W.unsqueeze(2)).transpose(1, 2)


def _orthogonalize_vector(V: Tensor, w: Tensor) -> tuple[Tensor, float]:
    """``_orthogonalize`` of one vector w against the rows of V ``(j, n)``: ``(h, ‖w‖)``."""
    h, norms = _orthogonalize(V.unsqueeze(0), w.unsqueeze(0))
    return h[0], norms.item()


_DEFAULT_BASIS_ENTRIES = 2**22  # a default basis of up to 16 MB (float32) when n is small


@in_fixed_state
def top_eigen(
    C,
    k: int = 1,
    which: str = "largest",
    tol: float | None = None,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    seed: int = 0,
    start: str | Tensor = "auto",
    guard: int | None = None,
    progress: bool | None = None,
    block_size: int = 1,
) -> EigenResult:
    r"""K extreme eigenpairs of a symmetric curvature object, matrix-free.

    Args:
        C: A curvature object (or a square symmetric tensor).
        k: Number of eigenpairs.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or
            ``"magnitude"``.
        tol: A Ritz pair counts as converged when ‖C v − θ v‖ ≤ tol · ‖C‖, with ‖C‖
            estimated by the largest Ritz value in magnitude (for the top
            eigenvalue of a PSD matrix this is the relative residual).
            Default 1e-6 in float64, 1e-4 in float32.
        max_matvecs: Product budget (default max(1000, 20·basis_size)); a warning
            if it runs out.
        basis_size: Krylov basis kept between restarts. Default max(2(k + guard) + 10, 20), or
            as many vectors as fit in 2²² entries if more (small problems: a basis
            up to n never restarts and ends in at most n products, where clustered
            small eigenvalues of a thick-restarted basis can take thousands); at
            most n. Memory: (basis_size + 1 + 3k) · n entries (the basis, then the Ritz
            vectors, their products and residuals), checked before the first
            product: ``cl.DenseTooLargeError`` with the byte count if it would not fit.
        seed: Seed of the random start (drawn on the CPU: device-independent).
        start: The Lanczos start vector. ``"random"``: a seeded Gaussian vector.
            ``"gradient"``: the normalised gradient ∇R of the operator's problem
            plus an equal-norm seeded random part; the gradient lies mostly in the
            top eigenspace (Gur-Ari et al. 2018), which saves Lanczos steps, and the
            random part keeps every eigenvector in the start. A cached ``cl.Hessian``
            reads the gradient off its graph; other problem operators pay one
            gradient pass. ``"auto"`` (default):
            ``"gradient"`` for problem operators unless ``which="smallest"``, else
            ``"random"``. A flat ``(n,)`` tensor: that vector.
        guard: Extra Ritz pairs, next in line after the k, that must converge too
            (their estimate |β s_m| only) and are then dropped. Within a cluster
            tighter than the tolerance resolves, one Ritz vector can still mix two
            eigenvectors while the k-th place goes to the next eigenvalue, every
            residual within tolerance (``docs/numerics.md`` has a measured case).
            Default 0 for k = 1 (its Ritz value is the largest), else 2; at most
            n − k and basis_size − k − 1.
        progress: Show a progress bar (``None``: only on a terminal).
        block_size: Vectors per product. 1 (default): single-vector Lanczos. b > 1:
            block Lanczos (``curvlab.spectra.block_lanczos``): one ``(n, b)`` product
            per step, thick restarts, a multiplicity up to b found in full; on a GPU a
            block product costs little more than one product, on a CPU about b
            (``docs/numerics.md``). Memory (basis_size + 2b + 3k)·n entries.

    Returns:
        An ``EigenResult`` with values, vectors, true residual norms, product count.

    Note:
        Single-vector Lanczos finds each *distinct* eigenvalue once: an exactly
        repeated eigenvalue (KFAC's Kronecker products repeat them) appears once
        among the k. ``cl.eigvalsh`` gives structured objects' full spectrum.

        Residuals: while the basis has not restarted, C y for a Ritz vector
        y = V s is the same combination of the products already made, so the
        residuals come from their recorded coefficients (exact to rounding, also
        for a product that is not symmetric) and cost no product. After a
        restart they are confirmed by k more products. Either way they are the
        residuals of the products as computed: an operator computed with reduced
        precision (e.g. TF32 matmuls on a GPU) is only as accurate as those.
    """
    n, dtype, device, matvec = _as_matvec(C)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    k = check_count("k", k)
    if k > n:
        raise ValueError(f"k must be between 1 and n = {n}, got {k}")
    tol = (1e-6 if dtype == torch.float64 else 1e-4) if tol is None else check_positive("tol", tol)
    guard = (0 if k == 1 else 2) if guard is None else check_count("guard", guard, minimum=0)
    seed = check_integer("seed", seed)
    guarded = k + min(guard, n - k)  # the pairs that must converge
    block_size = min(check_count("block_size", block_size), n)
    if block_size > 1:
        return _block_top_eigen(
            C, matvec, n, k, which, tol, max_matvecs, basis_size, block_size, guarded, seed, start, progress
        )
    if basis_size is None:
        m = min(n, max(2 * guarded + 10, 20, _DEFAULT_BASIS_ENTRIES // n))
    else:
        m = min(n, check_count("basis_size", basis_size))
        guarded = max(k, min(guarded, m - 1))
    if m < k:
        raise ValueError(f"basis_size must be ≥ k = {k}, got {m}")
    max_matvecs = max(1000, 20 * m) if max_matvecs is None else check_count("max_matvecs", max_matvecs)
    generator = torch.Generator().manual_seed(seed)
    check_workspace(  # the basis, then the Ritz vectors, their products and residuals
        f"top_eigen(k={k}) with a basis of {m}",
        m + 1 + 3 * k,
        n,
        dtype,
        device,
        "ask for fewer eigenpairs (k) or a smaller basis_size (memory (basis_size + 1 + 3k)·n entries)",
    )

    V = torch.empty(m + 1, n, dtype=dtype, device=device)  # rows are read only once written
    T = torch.zeros(m, m, dtype=dtype, device=device)
    # Every product's coefficients as made, C V[:j]ᵀ = V[:j+1]ᵀ hessenberg[:j+1, :j],
    # valid while `recorded` (no restart, no invariant subspace met).
    hessenberg = torch.zeros(m + 1, m, dtype=dtype, device=device)
    recorded = True
    V[0] = _start_vector(C, start, which, n, dtype, device, generator)
    size, matvecs = 0, 0  # basis vectors V[:size] with T = V[:size] C V[:size]ᵀ
    bar = progress_bar(total=max_matvecs, desc=f"top-{k} eigen", enabled=progress)
    while True:
        # One Lanczos step with full reorthogonalization: V[size] joins the basis,
        # its product goes straight into the next row and is orthogonalised there.
        w = _matvec_into(C, V[size], V[size + 1])
        matvecs += 1
        bar.update(1)
        h, beta = _orthogonalize_vector(V[: size + 1], w)
        if not math.isfinite(beta):
            raise _not_finite(matvecs)
        T[: size + 1, size] = h
        T[size, : size + 1] = h
        hessenberg[: size + 1, size] = h
        hessenberg[size + 1, size] = beta
        size += 1
        theta, S = torch.linalg.eigh(T[:size, :size])
        norm_estimate = max(theta.abs().max().item(), 1e-300)
        if _agree(C, beta <= 1e3 * torch.finfo(dtype).eps * norm_estimate):
            # An invariant subspace: continue with a fresh direction, coupling 0.
            beta = 0.0
            recorded = False  # what is left of w is dropped for a fresh direction
            if size < n:
                w.copy_(_random_unit(n, dtype, device, generator))
                _, norm = _orthogonalize_vector(V[:size], w)
                w /= norm
        else:
            w /= beta
        if size < guarded:
            continue
        order = _order(theta, which)
        wanted = order[:k]
        estimates = (beta * S[size - 1, order[:guarded]]).abs()  # the guard's too
        exhausted = matvecs >= max_matvecs
        if _agree(C, size == n or exhausted or bool((estimates <= tol * norm_estimate).all())):
            # The residuals of the products themselves: rounding in them (or a
            # product that is not quite symmetric) can leave these above the
            # recurrence's estimate, which assumes T is C's projection.
            rows = S[:, wanted].T @ V[:size]  # the Ritz vectors, probe-major (k, n)
            rows /= _row_norms(rows).unsqueeze(1)  # unit to rounding
            vectors = rows.T
            if recorded:
                values, residuals = _recorded_residuals(hessenberg[: size + 1, :size], S[:, wanted])
            else:  # one batched confirming product
                products = matvec(vectors)
                values = (vectors * products).sum(0)  # Rayleigh quotients: error O(residual²)
                residuals = (products - vectors * values).norm(dim=0)
                matvecs += k
                bar.update(k)
            converged = _agree(C, size == n or bool((residuals <= tol * norm_estimate).all()))
            if converged or exhausted:
                break
        if size == m:
            # Thick restart: keep the most wanted Ritz vectors; the residual
            # direction V[m] continues the basis, coupled to them by β s_{m,i}.
            keep = min(m - 1, guarded + (m - guarded) // 2)
            kept = order[:keep]
            _combine_rows_in_place(V, m, S[:, kept])
            V[keep] = V[m]
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[kept])
            size = keep
            recorded = False
    bar.close()
    if isinstance(C, CurvatureOperator):
        C.from_rank_zero(values, vectors, residuals)  # every rank returns rank 0's numbers
    if not converged:
        warnings.warn(
            f"top_eigen: {k} eigenpair(s) not converged after {matvecs} products "
            f"(largest residual {residuals.max().item():.2e}, tolerance {tol:.1e} · {norm_estimate:.3e}); "
            f"raise max_matvecs or basis_size",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(values, vectors, residuals, matvecs, converged)


def _block_top_eigen(
    C, matvec, n, k, which, tol, max_matvecs, basis_size, block_size, guarded, seed, start, progress
) -> EigenResult:
    """``top_eigen`` by block Lanczos (``curvlab.spectra.block_lanczos``): the same arguments, checked."""
    from curvlab.spectra.block_lanczos import block_top_eigen, default_basis_size

    _, dtype, device, _ = _as_matvec(C)
    least = min(n, guarded + 2 * block_size)  # the guarded pairs and two blocks
    if basis_size is None:
        m = default_basis_size(guarded, block_size, n, _DEFAULT_BASIS_ENTRIES)
    else:
        m = max(least, min(n, check_count("basis_size", basis_size)))
    max_matvecs = max(1000, 20 * m) if max_matvecs is None else check_count("max_matvecs", max_matvecs)
    check_workspace(
        f"top_eigen(k={k}, block_size={block_size}) with a basis of {m}",
        m + 2 * block_size + 3 * k,
        n,
        dtype,
        device,
        "ask for fewer eigenpairs (k), a smaller block_size or basis_size "
        "(memory (basis_size + 2b + 3k)·n entries)",
    )
    generator = torch.Generator().manual_seed(seed)
    first = _start_vector(C, start, which, n, dtype, device, generator)
    values, vectors, residuals, matvecs, converged, norm_estimate = block_top_eigen(
        C,
        matvec,
        k,
        tol,
        max_matvecs,
        m,
        block_size,
        guarded,
        first,
        generator,
        lambda theta: _order(theta, which),
        lambda flag: _agree(C, flag),
        progress,
    )
    if not converged:
        warnings.warn(
            f"top_eigen: {k} eigenpair(s) not converged after {matvecs} products in blocks of {block_size} "
            f"(largest residual {residuals.max().item():.2e}, tolerance {tol:.1e} · {norm_estimate:.3e}); "
            f"raise max_matvecs or basis_size",
            RuntimeWarning,
            stacklevel=3,
        )
    return EigenResult(values, vectors, residuals, matvecs, converged)


def _recorded_residuals(hessenberg: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotients and residual norms of the Ritz vectors V S from the recorded products.

    With C V_jᵀ = V_{j+1}ᵀ H (``hessenberg`` H ``(j + 1, j)``, V orthonormal rows),
    C y = V_{j+1}ᵀ H s for y = V_jᵀ s: the Rayleigh quotient is sᵀ H_{:j} s and the
    residual ‖C y − λ y‖ = ‖H s − λ [s; 0]‖, both from ``(j + 1, k)`` numbers.
    """
    HS = hessenberg @ S  # (j + 1, k)
    values = (S * HS[:-1]).sum(0)
    HS[:-1] -= S * values
    return values, HS.norm(dim=0)


@in_fixed_state
def lanczos_tridiagonal(C, V0: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""m-step Lanczos tridiagonalisation of several start vectors at once.

    Each column of ``V0`` runs its own Lanczos recursion; one batched product per
    step serves all of them. Full reorthogonalization within each column's basis
    (one pass, a second where DGKS asks for it).

    Args:
        C: A curvature object or a square tensor, (n, n).
        V0: ``(n, p)`` start vectors (normalised here).
        steps: m, the number of Lanczos steps (at most n).

    Returns:
        ``(alpha, beta, lengths)``: ``alpha`` ``(p, m)`` diagonals, ``beta`` ``(p, m − 1)``
        off-diagonals of the p tridiagonal matrices T, and ``lengths`` ``(p,)``, the
        size of each T after an early invariant subspace (entries beyond are 0).
    """
    n, dtype, device, matvec = _as_matvec(C)
    p = V0.shape[1]
    m = min(steps, n)
    # Basis stored probe-major, (p, m, n): each probe's basis is one contiguous
    # (m, n) matrix, so reorthogonalization is batched GEMVs without copies. Rows
    # are written before they are read; every update below is in place (for
    # millions of parameters a fresh n-vector costs as much as the pass itself).
    Q = torch.empty(p, m, n, dtype=dtype, device=device)
    alpha = torch.zeros(p, m, dtype=dtype, device=device)
    beta = torch.zeros(p, m, dtype=dtype, device=device)
    lengths = torch.full((p,), m, dtype=torch.long, device=device)
    active = torch.ones(p, dtype=torch.bool, device=device)
    Q[:, 0] = V0.T
    Q[:, 0] /= _row_norms(Q[:, 0]).unsqueeze(1)
    for j in range(m):
        # The product of the newest basis vectors goes straight into the next rows
        # (the last step's product, needed only for α, into a scratch buffer).
        W = Q[:, j + 1] if j + 1 < m else torch.empty(p, n, dtype=dtype, device=device)
        if p == 1:
            _matvec_into(C, Q[0, j], W[0])
        else:
            W.copy_(matvec(Q[:, j].T).T)
        alpha[:, j] = _row_dots(Q[:, j], W)  # no n-sized temporary
        if j + 1 == m:
            break  # the last step needs only α
        # Full reorthogonalization of every probe against its own basis (α is
        # taken above, from the product itself, as the recurrence defines it).
        _, norms = _orthogonalize(Q[:, : j + 1], W)
        if not bool(torch.isfinite(norms).all()):
            raise _not_finite(j + 1)
        scale = torch.cat([alpha[:, : j + 1], beta[:, :j]], 1).abs().amax(1)
        breakdown = active & (norms <= 1e3 * torch.finfo(dtype).eps * scale.clamp_min(1e-300))
        if isinstance(C, CurvatureOperator):
            breakdown = C._agreed_mask(breakdown)
        lengths = torch.where(breakdown, j + 1, lengths)
        active &= ~breakdown
        beta[:, j] = torch.where(active, norms, torch.zeros_like(norms))
        # Normalise; a probe past an invariant subspace continues with zeros
        # (selected, not multiplied: 1 / 0 would leave NaN in its basis).
        inverse_norms = torch.where(
            active, 1 / norms.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(norms)
        )
        W.mul_(inverse_norms.unsqueeze(1))
    if isinstance(C, CurvatureOperator):
        C.from_rank_zero(alpha, beta, lengths)  # every rank returns rank 0's numbers
    return alpha, beta[:, : m - 1], lengths


def tridiagonal_eigen(alpha: Tensor, beta: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues and first components of the eigenvectors of one Lanczos T."""
    T = torch.diag(alpha[:length]) + torch.diag(beta[: length - 1], 1) + torch.diag(beta[: length - 1], -1)
    values, vectors = torch.linalg.eigh(T)
    return values, vectors[0]
