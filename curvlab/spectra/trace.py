r"""Trace estimators: Hutchinson (1989) and Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

Both use Rademacher probes drawn on the CPU from a seed (the same estimate on
every device) and keep memory at O(n · columns): probes are generated and
multiplied in chunks of the operator's ``columns_per_chunk()`` (within a memory budget).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator, in_fixed_state
from curvlab.options import check_count, check_integer
from curvlab.progress import progress_bar
from curvlab.records import RecordParts, recordable

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


def rademacher(
    n: int, k: int, generator: torch.Generator, dtype, device, out: Tensor | None = None
) -> Tensor:
    """``(n, k)`` random signs drawn on the CPU, probe after probe (probe-major layout).

    The i-th probe of a seed is the same however the probes are chunked, and on
    every device. Eight signs per random byte (bits), which is several times
    faster than one integer draw per entry for millions of parameters; only the
    bytes cross to the device, where each is looked up in a 256 × 8 table of its
    signs (on a GPU, unpacking on the CPU and copying the signs cost ten times
    the products of a trace).

    Args:
        n: Probe length.
        k: Number of probes.
        generator: CPU generator the bytes are drawn from.
        dtype: Float dtype of the signs.
        device: Where the signs go.
        out: A ``(≥ k, 8 ⌈n/8⌉)`` buffer of ``dtype`` on ``device`` to write into
            (``probe_buffer``): probes drawn chunk after chunk then reuse one
            allocation, where fresh memory for every chunk costs more in page
            faults than drawing the signs. The result is a view of it.
    """
    size = (n + 7) // 8
    random_bytes = torch.randint(0, 256, (k, size), generator=generator, dtype=torch.uint8).to(device)
    if out is None:
        out = probe_buffer(n, k, dtype, device)
    elif (
        out.shape[0] < k
        or out.shape[1] != 8 * size
        or (out.dtype, out.device) != (dtype, random_bytes.device)
    ):
        raise ValueError(
            f"out must be a ({k}+, {8 * size}) {dtype} buffer on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    signs = out[:k]
    table = _sign_table(dtype, random_bytes.device)  # the concrete device ("cuda" → cuda:i)
    torch.index_select(table, 0, random_bytes.reshape(-1).int(), out=signs.view(k * size, 8))
    return signs[:, :n].T


def probe_buffer(n: int, k: int, dtype, device) -> Tensor:
    """Storage for ``k`` probes of length ``n`` from ``rademacher``: ``(k, 8 ⌈n/8⌉)``."""
    return torch.empty(k, 8 * ((n + 7) // 8), dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _sign_table(dtype, device) -> Tensor:
    """``(256, 8)``: row b holds the signs 2 bit_j(b) − 1 of byte b, lowest bit first (kept, read only)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & 1
    return bits.to(dtype).mul_(2).sub_(1).to(device)


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
        num_matvecs: m, products to spend (estimators only).
        seed: Seed of the probes.
        progress: Show a progress bar (``None``: only on a terminal).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_matvecs = check_count("num_matvecs", num_matvecs)
    seed = check_integer("seed", seed)
    n = C.shape[0]
    if method == "exact":
        if hasattr(C, "trace"):
            return TraceEstimate(float(C.trace()), 0.0, method, 0, None)
        from curvlab.structured.diagonal import Diagonal

        return TraceEstimate(float(Diagonal(C).trace()), 0.0, method, n, None)
    generator = torch.Generator().manual_seed(seed)
    chunk = C.columns_per_chunk() if isinstance(C, CurvatureOperator) else 64
    bar = progress_bar(total=num_matvecs, desc=f"trace ({method})", enabled=progress)
    try:
        if method == "hutchinson":
            if num_matvecs < 2:
                raise ValueError("hutchinson needs num_matvecs ≥ 2 for a standard error")
            forms = _quadratic_forms(C, n, num_matvecs, generator, bar=bar, chunk=chunk)
            return TraceEstimate(
                forms.mean().item(), (forms.std() / math.sqrt(num_matvecs)).item(), method, num_matvecs, seed
            )
        third = num_matvecs // 3
        if third < 2:
            raise ValueError("hutch++ needs num_matvecs ≥ 6")
        S = rademacher(n, third, generator, C.dtype, C.device)
        Q = orthonormal_basis(C @ S)
        bar.update(third)
        top = (Q * (C @ Q)).sum().item()
        bar.update(third)
        remaining = num_matvecs - 2 * third
        forms = _quadratic_forms(
            C, n, remaining, generator, project=lambda V: _project_out(Q, V), bar=bar, chunk=chunk
        )
        value = top + forms.mean().item()
        return TraceEstimate(value, (forms.std() / math.sqrt(remaining)).item(), method, num_matvecs, seed)
    finally:
        bar.close()
