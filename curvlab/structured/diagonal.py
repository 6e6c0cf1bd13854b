r"""Diagonal curvature: exact diagonals and Hutchinson estimates, and BlockDiagonal.

Exact diagonal of the GGN / Fisher / MC Fisher / empirical Fisher for layers in the
Kronecker registry: diag(B) = c Σ_{v,n} (Σ_r g_{v,n,r} ã_{n,r}ᵀ)² (the squared
per-example gradient of each backpropagated vector; as BackPACK's
``DiagGGNExact``), from one pass over the data. Any other operator: the diagonal
from products with unit vectors (n products, batched), or Hutchinson's estimate
diag(C) ≈ 1/S Σ_s z_s ⊙ C z_s with Rademacher z (Bekas et al. 2007).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.operators.dense import DenseOperator
from curvlab.options import check_count, check_nonnegative
from curvlab.sampling import rademacher
from curvlab.structured.block_diagonal import BlockDiagonalOperator


class Diagonal(CurvatureOperator):
    """diag(d) as a curvature object, from an operator's exact or estimated diagonal.

    Args:
        C: Any curvature object.
        method: ``"exact"`` or ``"hutchinson"``.
        num_probes: Probes for Hutchinson.
        seed: Seed of the probes (drawn on the CPU).

    Attributes:
        diagonal: The flat diagonal ``(n,)``.
        standard_error: Per-entry standard error for Hutchinson, else ``None``.
        method_used: ``"layerwise"`` (one data pass), ``"products"``, ``"structure"`` (read
            off a structured object) or ``"hutchinson"``.
    """

    def __init__(self, C: CurvatureOperator, method: str = "exact", num_probes: int = 100, seed: int = 0):
        if method not in ("exact", "hutchinson"):
            raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
        super().__init__(C.param_shapes, C.dtype, C.device, C.param_names)
        self.standard_error = None
        if method == "hutchinson":
            self.diagonal, self.standard_error = _hutchinson(C, num_probes, seed)
            self.method_used = "hutchinson"
            return
        self.diagonal, self.method_used = C._diag_route()

    def _matmat(self, Vs):
        return self.flat_to_list(self.diagonal.unsqueeze(1) * self.list_to_flat(Vs))

    def to_dense(self, max_bytes=None) -> Tensor:  # noqa: D102
        return torch.diag(self.diagonal)

    def _described(self) -> dict:
        return {"method_used": self.method_used}

    structured_eigvalsh = True

    def _diag_route(self):
        return self.diagonal, "structure"

    def _added(self, other):
        if isinstance(other, Diagonal):
            return Diagonal.from_tensor(self.diagonal + other.diagonal, self.param_shapes, self.param_names)
        return None

    def _scaled(self, scale):
        return Diagonal.from_tensor(
            self.diagonal * scale, self.param_shapes, self.param_names, self.method_used
        )

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """The diagonal, sorted."""
        return self.diagonal.sort().values

    def trace(self) -> Tensor:
        """Sum of the diagonal."""
        return self.diagonal.sum()

    def frobenius_norm(self) -> Tensor:
        """‖d‖₂."""
        return self.diagonal.norm()

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> Diagonal:
        """diag(1/(d + damping)), a new ``Diagonal``.

        ``pi_damping`` (factored damping) applies to Kronecker products only; this block is damped exactly.
        """
        damping = check_nonnegative("damping", damping)
        shifted = self.diagonal + damping
        if bool((shifted <= 0).any()):
            raise ValueError("the damped diagonal has entries ≤ 0: increase damping")
        return Diagonal.from_tensor(1.0 / shifted, self.param_shapes, self.param_names, self.method_used)

    @classmethod
    def from_tensor(
        cls, diagonal: Tensor, param_shapes, param_names=None, method_used: str = "given"
    ) -> Diagonal:
        """diag(d) from a flat ``(n,)`` tensor (e.g. a stored or averaged diagonal)."""
        operator = object.__new__(cls)
        CurvatureOperator.__init__(operator, param_shapes, diagonal.dtype, diagonal.device, param_names)
        operator.diagonal, operator.standard_error, operator.method_used = diagonal, None, method_used
        return operator


def _hutchinson(C: CurvatureOperator, num_probes: int, seed: int) -> tuple[Tensor, Tensor]:
    num_probes = check_count("num_probes (Hutchinson, for a standard error)", num_probes, minimum=2)
    generator = torch.Generator().manual_seed(seed)
    n = C.shape[0]
    total = torch.zeros(n, dtype=C.dtype, device=C.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, num_probes, C.max_columns):
        k = min(C.max_columns, num_probes - start)
        Z = rademacher(n, k, generator, C.dtype, C.device)
        samples = Z * (C @ Z)
        total += samples.sum(1)
        total_sq += (samples**2).sum(1)
    mean = total / num_probes
    variance = (total_sq / num_probes - mean**2).clamp_min(0) * num_probes / (num_probes - 1)
    return mean, (variance / num_probes).sqrt()


class BlockDiagonal(BlockDiagonalOperator):
    """Exact diagonal blocks of any operator, held densely; inverse per block.

    Args:
        C: Any curvature object that provides ``blocks`` (all exact operators do).
        by: ``"layer"`` (a module's tensors together) or ``"parameter"``.
        max_bytes: Limit for each dense block (default: free memory).
    """

    def __init__(self, C: CurvatureOperator, by: str = "layer", max_bytes: int | None = None):
        if by == "layer":
            groups = C._layer_groups()
        elif by == "parameter":
            groups = [[i] for i in range(len(C.param_shapes))]
        else:
            raise ValueError(f"by must be 'parameter' or 'layer', got {by!r}")
        names = C.param_names or [None] * len(C.param_shapes)
        blocks = []
        for indices in groups:
            dense = C._block(indices).to_dense(max_bytes=max_bytes)
            shapes = [C.param_shapes[i] for i in indices]
            blocks.append((indices, DenseOperator(dense, shapes, [names[i] for i in indices])))
        super().__init__(blocks, C.param_shapes, C.dtype, C.device, C.param_names)
