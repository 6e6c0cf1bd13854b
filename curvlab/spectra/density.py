r"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

For a probe v with ‖v‖ = 1, m Lanczos steps give T = S diag(θ) Sᵀ and the Gauss
quadrature vᵀ f(C) v ≈ Σ_i τ_i f(θ_i) with weights τ_i = S_{1i}² (squared first
components of T's eigenvectors), exact for polynomials f of degree ≤ 2m − 1.
Averaged over Rademacher probes (E[vvᵀ] = I/n after normalisation), the nodes
and weights estimate the eigenvalue distribution φ(t) = 1/n Σ_j δ(t − λ_j);
Gaussian broadening of width σ turns them into a smooth density that integrates
to 1. (PyHessian, Yao et al. 2019, takes the same route.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.memory import check_workspace
from curvlab.options import check_count, check_integer, check_positive
from curvlab.progress import progress_bar
from curvlab.records import RecordParts, numpy, recordable
from curvlab.sampling import rademacher
from curvlab.spectra.lanczos import _as_matvec, lanczos_tridiagonal


@recordable("spectral_density")
@dataclass
class SpectralDensity:
    """An estimated eigenvalue density φ on a grid, with its quadrature.

    Attributes:
        grid: ``(g,)`` eigenvalue axis.
        density: ``(g,)`` φ on the grid; ∫φ = 1 (up to the grid's truncation).
        nodes: ``(p, m)`` Ritz values per probe (padded with 0 where T was smaller).
        weights: ``(p, m)`` quadrature weights τ per probe (0 in padding; rows sum to 1).
        sigma: Gaussian broadening width.
        num_probes: p.
        lanczos_steps: m.
        seed: Seed of the probes.
        num_params: n, the dimension (φ · n is an eigenvalue count density).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_probes: int
    lanczos_steps: int
    seed: int
    num_params: int

    def moment(self, power: int) -> float:
        """Estimate of tr(C^power) / n from the quadrature (exact in expectation for power ≤ 2m − 1)."""
        return (self.weights * self.nodes**power).sum(1).mean().item()

    def mass_below(self, threshold: float) -> float:
        """Estimated fraction of eigenvalues below ``threshold`` (quadrature, no broadening)."""
        return (self.weights * (self.nodes < threshold)).sum(1).mean().item()

    _ARRAYS = ("grid", "density", "nodes", "weights")
    _SETTINGS = ("sigma", "num_probes", "lanczos_steps", "seed", "num_params")

    def to_record(self, settings: dict) -> RecordParts:
        """The grid, density and quadrature; width, probes, steps, seed and n as settings."""
        settings.setdefault("method", "slq")
        settings.update({name: getattr(self, name) for name in self._SETTINGS})
        return RecordParts("spectral_density", {k: numpy(getattr(self, k)) for k in self._ARRAYS}, settings)

    @classmethod
    def from_record(cls, record) -> SpectralDensity:
        """The density of a ``spectral_density`` record."""
        arrays = {name: torch.as_tensor(record.data[name]) for name in cls._ARRAYS}
        return cls(**arrays, **{name: record.settings[name] for name in cls._SETTINGS})


def spectral_density(
    C,
    num_probes: int = 10,
    lanczos_steps: int = 90,
    num_points: int = 1000,
    sigma: float | None = None,
    grid: Tensor | None = None,
    seed: int = 0,
    probes_per_pass: int | None = None,
    progress: bool | None = None,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric curvature object by SLQ.

    Args:
        C: A curvature object (or a square symmetric tensor).
        num_probes: Rademacher probes p (more: less variance).
        lanczos_steps: Lanczos steps m per probe (more: finer resolution; ≤ n).
        num_points: Grid points when ``grid`` is not given.
        sigma: Broadening width; default 1% of the spread of the Ritz values (of
            their magnitude, or 0.01, where they are one point).
        grid: Eigenvalue axis; default spans the Ritz values ± 5σ.
        seed: Seed of the probes (drawn on the CPU: device-independent).
        probes_per_pass: Probes tridiagonalised together in one batched pass
            (memory (m + 3) · n · probes_per_pass entries, checked before the first
            product); default all, capped at 16.
        progress: Show a progress bar (``None``: only on a terminal).
    """
    n, dtype, device, _ = _as_matvec(C)
    seed = check_integer("seed", seed)
    check_count("num_probes", num_probes)
    check_count("lanczos_steps", lanczos_steps)
    check_count("num_points", num_points, minimum=2)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    m = min(lanczos_steps, n)
    per_pass = min(probes_per_pass or 16, num_probes)
    check_workspace(  # each probe's basis, the start vectors, the product and its scratch
        f"spectral_density with {per_pass} probes per pass of {m} Lanczos steps",
        (m + 3) * per_pass,
        n,
        dtype,
        device,
        "tridiagonalise fewer probes together (probes_per_pass) or take fewer lanczos_steps "
        "(memory (lanczos_steps + 3)·probes_per_pass·n entries)",
    )
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(num_probes, m, dtype=dtype, device=device)
    weights = torch.zeros_like(nodes)
    bar = progress_bar(total=num_probes, desc="spectral density", enabled=progress)
    for first in range(0, num_probes, per_pass):
        p = min(per_pass, num_probes - first)
        V0 = rademacher(n, p, generator, dtype, device)
        alpha, beta, lengths = lanczos_tridiagonal(C, V0, m)
        for column in range(p):
            length = int(lengths[column])
            T = torch.diag(alpha[column, :length])
            if length > 1:
                off = beta[column, : length - 1]
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            nodes[first + column, :length] = theta
            weights[first + column, :length] = S[0] ** 2
        bar.update(p)
    bar.close()
    used = weights > 0
    low, high = nodes[used].min().item(), nodes[used].max().item()
    if sigma is None:
        # 1 % of the spread; a spectrum of one point (C = cI, or C = 0 of a saturated
        # model) gets 1 % of its magnitude, or 0.01: never a width whose Gaussian overflows.
        spread, scale = high - low, max(abs(low), abs(high))
        sigma = 0.01 * spread if spread > 1e-6 * scale else (0.01 * scale if scale > 0 else 0.01)
    if grid is None:
        grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, num_points, dtype=dtype, device=device)
    grid = torch.as_tensor(grid, dtype=dtype, device=device)
    if grid.dim() != 1 or not bool(torch.isfinite(grid).all()):
        raise ValueError(f"grid must be a 1-d tensor of finite values, got shape {tuple(grid.shape)}")
    gaussians = torch.exp(-0.5 * ((grid[:, None] - nodes[used][None, :]) / sigma) ** 2)
    density = gaussians @ weights[used] / (num_probes * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, density, nodes, weights, float(sigma), num_probes, m, seed, n)
