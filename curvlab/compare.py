r"""How far an approximation is from the full matrix: ``cl.compare(approx, exact)``.

Per block (the approximation's layer blocks, or the exact operator's layers) and
overall, for dense-able matrices A (approximation) and E (exact):

* ``rel_frobenius`` = ‖A − E‖_F / ‖E‖_F,
* ``rel_spectral`` = ‖A − E‖₂ / ‖E‖₂,
* ``rel_frobenius_scaled`` = min_{s ≥ 0} ‖sA − E‖_F / ‖E‖_F (the error up to a scale,
  which a learning rate absorbs),
* ``topk_eigenvalue_rel_error``: |λ_i(A) − λ_i(E)| / |λ_i(E)| for the k largest,
* ``topk_subspace_overlap`` = ‖U_Aᵀ U_E‖_F² / k for the top-k eigenvectors (1 = same
  subspace, 0 = orthogonal). Where λ_k is tied (eigenvalues within √ε·|λ|max of it,
  ε the dtype's rounding unit) the top-k subspace is not unique (a Kronecker factor
  with equal eigenvalues, a scaled identity): the overlap is then that of the average
  projector over every admissible choice, P̄ = U₁U₁ᵀ + (s/m)·U_tU_tᵀ for s of the k
  vectors drawn from a tied cluster U_t of m, i.e. tr(P̄_A P̄_E) / k, a number that
  does not depend on which basis of the cluster the eigensolver returned,
* for Kronecker blocks ``optimal_kronecker_rel_frobenius``: the error of the best
  single Kronecker product X ⊗ Y ≈ E (Van Loan & Pitsianis 1993: the top singular
  pair of the rearrangement R(E) with R[(i,i'),(j,j')] = E[(i,j),(i',j')], error
  √(‖E‖_F² − σ₁²)), next to KFAC's own ``rel_frobenius``.

When a matrix would not fit, ‖A − E‖_F and ``rel_frobenius`` are estimated
matrix-free from Rademacher probes z (E‖(A − E)z‖² = ‖A − E‖_F², E‖Ez‖² = ‖E‖_F²,
the same probes for both) with standard errors (``…_stderr``, delta method).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.memory import available_bytes
from curvlab.operators.base import CurvatureOperator
from curvlab.options import check_count
from curvlab.records import RecordParts, recordable
from curvlab.sampling import rademacher
from curvlab.spectra.lanczos import top_eigen
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kronecker import LayerMatrixBlock


@recordable("comparison")
@dataclass
class ComparisonReport:
    """Result of ``compare``: ``overall`` metrics and one dict per block in ``blocks``."""

    overall: dict
    blocks: list[dict] = field(default_factory=list)
    approx_name: str = ""
    exact_name: str = ""

    def to_dict(self) -> dict:
        """Plain Python types (floats, lists, strings) for storage."""
        return {
            "approx": self.approx_name,
            "exact": self.exact_name,
            "overall": self.overall,
            "blocks": self.blocks,
        }

    def to_record(self, settings: dict) -> RecordParts:
        """``to_dict()``: overall metrics, one group per block, the two names."""
        return RecordParts("comparison", self.to_dict(), settings)

    @classmethod
    def from_record(cls, record) -> ComparisonReport:
        """The report of a ``comparison`` record (metric lists as arrays)."""
        data = record.data
        return cls(
            dict(data["overall"]),
            [dict(b) for b in data["blocks"]],
            data.get("approx", ""),
            data.get("exact", ""),
        )

    def __str__(self) -> str:
        """A readable table."""
        columns = [
            "rel_frobenius",
            "rel_spectral",
            "topk_subspace_overlap",
            "optimal_kronecker_rel_frobenius",
        ]
        header = f"{'block':<28}" + "".join(
            f"{c:>20}" for c in ["rel_frob", "rel_spec", "subspace", "opt_kron_frob"]
        )
        lines = [f"{self.approx_name} vs {self.exact_name}", header]
        for row in [*self.blocks, {"name": "overall", **self.overall}]:
            cells = []
            for c in columns:
                value = row.get(c)
                cells.append(f"{value:>20.4g}" if isinstance(value, float) else f"{'-':>20}")
            lines.append(f"{str(row['name'])[:28]:<28}" + "".join(cells))
        return "\n".join(lines)


FULL_EIGH_LIMIT = 800  # larger symmetric matrices use a partial eigensolver


def _top_eigenpairs(M: Tensor, k: int, which: str = "LA") -> tuple[Tensor, Tensor]:
    """The k largest (``"LA"``) or largest-magnitude (``"LM"``) eigenpairs, descending."""
    n = M.shape[0]
    if n <= FULL_EIGH_LIMIT or k >= n - 1:
        values, vectors = torch.linalg.eigh(M)
        order = (values.abs() if which == "LM" else values).argsort(descending=True)[:k]
        return values[order], vectors[:, order]
    tol = 1e-10 if M.dtype == torch.float64 else 1e-5  # eigenvectors feed the subspace overlaps
    result = top_eigen(M, k, "magnitude" if which == "LM" else "largest", tol=tol, progress=False)
    return result.values, result.vectors


def _top_subspace(M: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest eigenvalues, and vectors U with weights w (Σw = k) of the average top-k projector.

    P̄ = U diag(w) Uᵀ: weight 1 for eigenvalues above the cluster tied with λ_k, s/m for
    the m members of that cluster of which s are among the top k (see the module note).
    """
    n = M.shape[0]
    tie = torch.finfo(M.dtype).eps ** 0.5
    count = n if n <= FULL_EIGH_LIMIT else min(n, 2 * k + 8)
    while True:
        values, vectors = _top_eigenpairs(M, count)
        tied = ((values - values[k - 1]).abs() <= tie * values.abs().max()).nonzero().flatten()
        first, last = int(tied[0]), int(tied[-1])
        if last < count - 1 or count == n:
            break
        count = n  # the cluster may go on past the computed pairs: all of them
    weights = torch.zeros(last + 1, dtype=M.dtype, device=M.device)
    weights[:first] = 1
    weights[first:] = (k - first) / (last + 1 - first)
    return values[:k], vectors[:, : last + 1], weights


def _dense_metrics(A: Tensor, E: Tensor, k: int) -> dict:
    difference = A - E
    E_norm = E.norm().item()
    k = min(k, E.shape[0])
    top_E, U_E, w_E = _top_subspace(E, k)
    top_A, U_A, w_A = _top_subspace(A, k)
    spectral_E = _top_eigenpairs(E, 1, "LM")[0].abs().item()
    spectral_difference = _top_eigenpairs(difference, 1, "LM")[0].abs().item()
    return {
        "rel_frobenius": difference.norm().item() / E_norm if E_norm > 0 else float("nan"),
        "rel_spectral": spectral_difference / spectral_E if spectral_E > 0 else float("nan"),
        "rel_frobenius_scaled": _scaled_rel_frobenius(A, E),
        "topk_eigenvalues_exact": top_E.tolist(),
        "topk_eigenvalues_approx": top_A.tolist(),
        "topk_eigenvalue_rel_error": ((top_A - top_E).abs() / top_E.abs().clamp_min(1e-300)).tolist(),
        "topk_subspace_overlap": (w_A @ (U_A.T @ U_E).pow(2) @ w_E).item() / k,  # tr(P̄_A P̄_E) / k
    }


def _scaled_rel_frobenius(A: Tensor, E: Tensor) -> float:
    """min_{s ≥ 0} ‖sA − E‖_F / ‖E‖_F: the error up to a global scale.

    A preconditioner's scale is absorbed by the learning rate (ACP's α, for one),
    so this is its fair distance; s* = max(⟨A, E⟩ / ‖A‖², 0) and the error is
    √(1 − ⟨A, E⟩² / (‖A‖² ‖E‖²)) when ⟨A, E⟩ > 0.
    """
    inner, A_sq, E_sq = (A * E).sum().item(), A.pow(2).sum().item(), E.pow(2).sum().item()
    if E_sq == 0:
        return float("nan")
    if A_sq == 0 or inner <= 0:
        return 1.0
    return max(1.0 - inner * inner / (A_sq * E_sq), 0.0) ** 0.5


def optimal_kronecker_rel_frobenius(E_kron_order: Tensor, d_out: int, d_A: int) -> float:
    """Relative Frobenius error of the best X ⊗ Y (X: d_out², Y: d_A²) for a block in [W b] order."""
    R = E_kron_order.reshape(d_out, d_A, d_out, d_A).permute(0, 2, 1, 3).reshape(d_out * d_out, d_A * d_A)
    sigma = torch.linalg.svdvals(R)
    total = E_kron_order.norm() ** 2
    return ((total - sigma[0] ** 2).clamp_min(0).sqrt() / total.sqrt()).item()


def _kron_permutation(block: LayerMatrixBlock) -> Tensor:
    """Flat parameter index of every entry of M = [W b] in row-major order."""
    n = block.shape[0]
    index = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    as_list = [t.to(block.dtype) for t in block.flat_to_list(index)]
    return block._to_matrix([t.double() for t in as_list]).flatten().round().long()


def _probe_squares(approx, exact, num_probes: int, seed: int) -> tuple[Tensor, Tensor]:
    """‖(A − E) z‖² and ‖E z‖² for Rademacher probes z: unbiased for ‖A − E‖_F², ‖E‖_F²."""
    generator = torch.Generator().manual_seed(seed)
    n = exact.shape[0]
    Z = rademacher(n, num_probes, generator, exact.dtype, exact.device)
    EZ = exact @ Z
    return (approx @ Z - EZ).pow(2).sum(0), EZ.pow(2).sum(0)


def _frobenius_from_squares(squares: Tensor) -> tuple[float, float]:
    """√(mean) and its standard error (delta method: se(√m) = se(m) / 2√m)."""
    mean = squares.mean()
    error = squares.std() / squares.numel() ** 0.5
    value = mean.sqrt()
    return value.item(), (error / (2 * value)).item() if value > 0 else 0.0


def _relative_from_squares(squares: Tensor, exact_squares: Tensor) -> tuple[float, float]:
    """√(mean d / mean e) and its standard error (delta method for a ratio of means)."""
    d, e = squares.mean(), exact_squares.mean()
    if e <= 0:
        return float("nan"), float("nan")
    ratio = d / e
    ratio_error = (squares - ratio * exact_squares).std() / (squares.numel() ** 0.5 * e)
    value = ratio.sqrt()
    return value.item(), (ratio_error / (2 * value)).item() if value > 0 else 0.0


def frobenius_estimate(
    approx: CurvatureOperator, exact: CurvatureOperator, num_probes: int = 20, seed: int = 0
):
    """Matrix-free ‖A − E‖_F and its standard error from Rademacher probes."""
    return _frobenius_from_squares(_probe_squares(approx, exact, num_probes, seed)[0])


def relative_frobenius_estimate(
    approx: CurvatureOperator, exact: CurvatureOperator, num_probes: int = 20, seed: int = 0
):
    """Matrix-free ‖A − E‖_F / ‖E‖_F and its standard error, from the same probes for both norms."""
    return _relative_from_squares(*_probe_squares(approx, exact, num_probes, seed))


def _matrix_free_metrics(approx, exact, num_probes: int) -> dict:
    squares, exact_squares = _probe_squares(approx, exact, num_probes, seed=0)
    value, error = _frobenius_from_squares(squares)
    relative, relative_error = _relative_from_squares(squares, exact_squares)
    return {
        "frobenius_difference": value,
        "frobenius_difference_stderr": error,
        "rel_frobenius": relative,
        "rel_frobenius_stderr": relative_error,
        "num_probes": num_probes,
    }


def _fits(n: int, dtype: torch.dtype, device) -> bool:
    need = 4 * n * n * torch.empty((), dtype=dtype).element_size()  # A, E, difference, eigenvectors
    return need <= available_bytes(device)


def compare(
    approx: CurvatureOperator,
    exact: CurvatureOperator,
    k: int = 10,
    num_probes: int = 20,
    approx_name: str | None = None,
    exact_name: str | None = None,
) -> ComparisonReport:
    """Compare an approximation with an exact curvature object, per block and overall.

    Args:
        approx: e.g. ``cl.KFAC``, ``cl.EKFAC``, ``cl.Diagonal``, ``cl.BlockDiagonal``.
        exact: e.g. ``cl.GGN`` or ``cl.Hessian`` of the same problem (same parameters).
        k: Number of top eigenvalues/eigenvectors compared.
        num_probes: Probes of the matrix-free Frobenius estimate for matrices that
            do not fit in memory.
        approx_name: Label of the approximation (default: its class name).
        exact_name: Label of the exact matrix (default: its class name).
    """
    for what, operator in (("approx", approx), ("exact", exact)):
        if not isinstance(operator, CurvatureOperator):
            raise TypeError(
                f"{what} must be a curvlab curvature object, got {type(operator).__name__} "
                "(wrap a dense matrix as cl.DenseOperator(matrix, param_shapes))"
            )
    k = check_count("k", k)
    num_probes = check_count("num_probes (for a standard error)", num_probes, minimum=2)
    if approx.shape != exact.shape or approx.param_shapes != exact.param_shapes:
        raise ValueError(f"approx {approx.shape} and exact {exact.shape} are over different parameters")
    if approx.dtype != exact.dtype or approx.device != exact.device:
        raise DataError(
            f"approx is {approx.dtype} on {approx.device} but exact is {exact.dtype} on {exact.device}: "
            "compare objects of one problem (build both from the same model)"
        )
    if isinstance(approx, BlockDiagonalOperator):
        groups, approx_blocks = approx.block_indices, approx.block_operators
    else:
        groups = exact._layer_groups()
        approx_blocks = [approx._block(g) for g in groups]
    names = exact.param_names or [str(i) for i in range(len(exact.param_shapes))]
    n = exact.shape[0]
    whole = _fits(n, exact.dtype, exact.device)
    if whole:  # one dense matrix each; blocks are slices of it
        A_full, E_full = approx.to_dense(), exact.to_dense()
        offsets = exact.block_offsets()
    rows = []
    for indices, approx_block in zip(groups, approx_blocks):
        size = sum(exact.param_shapes[i].numel() for i in indices)
        row = {"name": " + ".join(names[i] for i in indices), "size": size}
        if whole:
            index = torch.cat(
                [torch.arange(offsets[i], offsets[i + 1], device=exact.device) for i in indices]
            )
            A, E = A_full[index][:, index], E_full[index][:, index]
        elif _fits(size, exact.dtype, exact.device):
            A, E = approx_block.to_dense(), exact._block(indices).to_dense()
        else:
            row.update(_matrix_free_metrics(approx_block, exact._block(indices), num_probes))
            rows.append(row)
            continue
        row.update(_dense_metrics(A, E, k))
        if isinstance(approx_block, LayerMatrixBlock):
            order = _kron_permutation(approx_block)
            d_out = approx_block.d_out
            row["optimal_kronecker_rel_frobenius"] = optimal_kronecker_rel_frobenius(
                E[order][:, order], d_out, size // d_out
            )
        rows.append(row)
    if whole:
        overall = {"size": n, **_dense_metrics(A_full, E_full, k)}
    else:
        overall = {"size": n, **_matrix_free_metrics(approx, exact, num_probes)}
    return ComparisonReport(
        overall, rows, approx_name or type(approx).__name__, exact_name or type(exact).__name__
    )


__all__ = [
    "ComparisonReport",
    "compare",
    "frobenius_estimate",
    "optimal_kronecker_rel_frobenius",
    "relative_frobenius_estimate",
]
