r"""Trace estimators: Hutchinson (1989) and Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

Both use Rademacher probes drawn on the CPU from a seed (the same estimate on
every device) and keep memory at O(n · columns): probes are generated and
multiplied in chunks of the operator's ``columns_per_chunk()`` (within a memory budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvlab.memory import check_workspace
from curvlab.operators.base import CurvatureOperator, in_fixed_state
from curvlab.options import check_count, check_integer
from curvlab.progress import progress_bar
from curvlab.records import RecordParts, recordable
from curvlab.sampling import probe_buffer, rademacher

METHODS = ("hutchinson", "hutch++", "exact")


@recordable("trace")
@dataclass
class TraceEstimate:
    """A trace with its standard error (0 for ``"exact"``); ``float(estimate)`` works."""

    value: float
    standard_error: float
    method: str
    num_matvecs: int
    seed: int | None

    def __float__(self) -> float:
        return self.value

    def to_record(self, settings: dict) -> RecordParts:
        """Value and standard error; method, products and seed as settings."""
        data = {"value": np.float64(self.value), "standard_error": np.float64(self.standard_error)}
        settings.update(method=self.method, num_matvecs=self.num_matvecs, seed=self.seed)
        return RecordParts("trace", data, settings)

    @classmethod
    def from_record(cls, record) -> TraceEstimate:
        """The estimate of a ``trace`` record."""
        data, settings = record.data, record.settings
        return cls(
            float(data["value"]),
            float(data["standard_error"]),
            settings["method"],
            settings["num_matvecs"],
            settings["seed"],
        )


def orthonormal_basis(Y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of a tall ``Y`` (n ≫ k).

    Cholesky QR twice (CholQR2: two GEMMs and two k × k Cholesky factorisations,
    orthogonal to rounding for well-conditioned Y); Householder QR where the
    Gram matrix is not numerically positive definite.
    """
    Q = Y
    identity = torch.eye(Y.shape[1], dtype=Y.dtype, device=Y.device)
    for _ in range(2):
        R, info = torch.linalg.cholesky_ex(Q.T @ Q, upper=True)
        if int(info) != 0:
            return torch.linalg.qr(Y)[0]
        # Q R⁻¹ as (R⁻ᵀ Qᵀ)ᵀ: one GEMM with the k × k inverse, probe-major like the
        # operator's products (a triangular solve on the tall side is far slower).
        R_inverse = torch.linalg.solve_triangular(R, identity, upper=True)
        Q = (R_inverse.T @ Q.T).T
    return Q


def _project_out(Q: Tensor, V: Tensor) -> Tensor:
    """V − Q Qᵀ V, computed probe-major: ``(n, k)`` with ``(k, n)`` storage."""
    Vt = V.T
    return torch.addmm(Vt, Vt @ Q, Q.T, alpha=-1).T


def quadratic_forms(C, V: Tensor) -> Tensor:
    """vᵢᵀ C vᵢ for the columns of ``V`` ``(n, k)``: the object's ``quadratic_forms``, else by product."""
    if not isinstance(C, CurvatureOperator):
        return (V * (C @ V)).sum(0)
    return C.quadratic_forms(V)


def _quadratic_forms(
    C: CurvatureOperator, n: int, count: int, generator, project=None, bar=None, chunk: int = 64
) -> Tensor:
    """vᵢᵀ C vᵢ for ``count`` Rademacher probes (optionally projected first)."""
    values = []
    done = 0
    buffer = probe_buffer(n, min(chunk, count), C.dtype, C.device)  # one allocation for every chunk
    while done < count:
        k = min(chunk, count - done)
        V = rademacher(n, k, generator, C.dtype, C.device, out=buffer)
        if project is not None:
            V = project(V)
        values.append(quadratic_forms(C, V))
        done += k
        if bar is not None:
            bar.update(k)
    return torch.cat(values)


@in_fixed_state
def trace(
    C: CurvatureOperator,
    method: str = "hutch++",
    num_matvecs: int = 100,
    seed: int = 0,
    progress: bool | None = None,
) -> TraceEstimate:
    r"""tr(C), exact or estimated from ``num_matvecs`` products.

    Args:
        C: A curvature object.
        method: ``"hutchinson"``: mean of vᵀCv over Rademacher v, standard error
            s/√m. ``"hutch++"``: a third of the products sketch the dominant range
            Q = orth(C S), whose trace tr(QᵀCQ) is exact, a third compute it, and
            the rest estimate the remainder by Hutchinson on (I − QQᵀ)C(I − QQᵀ);
            its standard error is that of the remainder (Meyer et al. 2021, Alg. 1).
            ``"exact"``: the structure's own trace where it has one (KFAC, diagonal,
            dense), else the sum of the exact diagonal from n products.
        num_matvecs: m, products to spend (estimators only; ``"exact"`` reports 0).
        seed: Seed of the probes.
        progress: Show a progress bar (``None``: only on a terminal).

    Memory beyond the model: Hutch++ holds five ``(n, m/3)`` blocks (checked before
    the first product); Hutchinson works in chunks of ``C.columns_per_chunk()`` probes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_matvecs = check_count("num_matvecs", num_matvecs)
    seed = check_integer("seed", seed)
    n = C.shape[0]
    if method == "exact":  # the structure's trace, or the exact diagonal's sum (C.trace())
        return TraceEstimate(float(C.trace()), 0.0, method, 0, None)
    generator = torch.Generator().manual_seed(seed)
    chunk = C.columns_per_chunk() if isinstance(C, CurvatureOperator) else 64
    bar = progress_bar(total=num_matvecs, desc=f"trace ({method})", enabled=progress)
    try:
        if method == "hutchinson":
            if num_matvecs < 2:
                raise ValueError("hutchinson needs num_matvecs ≥ 2 for a standard error")
            forms = _quadratic_forms(C, n, num_matvecs, generator, bar=bar, chunk=chunk)
            value, error = _from_rank_zero(C, forms.mean(), forms.std() / math.sqrt(num_matvecs))
            return TraceEstimate(value, error, method, num_matvecs, seed)
        third = num_matvecs // 3
        if third < 2:
            raise ValueError("hutch++ needs num_matvecs ≥ 6")
        check_workspace(  # S, C S, Q, C Q and Q ∘ C Q: five (n, m/3) blocks
            f"trace(hutch++, num_matvecs={num_matvecs})",
            5 * third,
            n,
            C.dtype,
            C.device,
            "spend fewer products (num_matvecs; memory 5·(num_matvecs/3)·n entries) or use "
            "method='hutchinson' (memory 3·chunk·n, products in chunks)",
        )
        S = rademacher(n, third, generator, C.dtype, C.device)
        Q = orthonormal_basis(C @ S)
        bar.update(third)
        top = (Q * (C @ Q)).sum().item()
        bar.update(third)
        remaining = num_matvecs - 2 * third
        forms = _quadratic_forms(
            C, n, remaining, generator, project=lambda V: _project_out(Q, V), bar=bar, chunk=chunk
        )
        value, error = _from_rank_zero(C, top + forms.mean(), forms.std() / math.sqrt(remaining))
        return TraceEstimate(value, error, method, num_matvecs, seed)
    finally:
        bar.close()


def _from_rank_zero(C, value: Tensor, error: Tensor) -> tuple[float, float]:
    """``(value, error)`` as floats, rank 0's under a process group (every rank returns the same)."""
    numbers = torch.stack([value.reshape(()), error.reshape(())]).to(torch.float64)
    if isinstance(C, CurvatureOperator):
        C.from_rank_zero(numbers)
    return numbers[0].item(), numbers[1].item()
