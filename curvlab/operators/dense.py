"""A curvature object held as a dense symmetric matrix (small blocks, references)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.options import check_nonnegative


class DenseOperator(CurvatureOperator):
    """A dense symmetric (n, n) matrix over parameter tensors of the given shapes."""

    def __init__(self, matrix: Tensor, param_shapes, param_names=None):
        super().__init__(param_shapes, matrix.dtype, matrix.device, param_names)
        if matrix.shape != self.shape:
            raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not fit the shapes {param_shapes}")
        self.matrix = matrix
        self._eigen = None

    def _matmat(self, Vs):
        return self.flat_to_list(self.matrix @ self.list_to_flat(Vs))

    structured_eigvalsh = True

    def to_dense(self, max_bytes=None) -> Tensor:  # noqa: D102
        return self.matrix

    def _diag_route(self):
        return self.matrix.diagonal().clone(), "structure"

    def _added(self, other):
        if isinstance(other, DenseOperator):
            return DenseOperator(self.matrix + other.matrix, self.param_shapes, self.param_names)
        return None

    def _scaled(self, scale):
        return DenseOperator(self.matrix * scale, self.param_shapes, self.param_names)

    def eigen(self) -> tuple[Tensor, Tensor]:
        """Cached ``torch.linalg.eigh`` of the matrix."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.matrix)
        return self._eigen

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """Eigenvalues, ascending."""
        return self.eigen()[0]

    def trace(self) -> Tensor:
        """The trace."""
        return self.matrix.trace()

    def frobenius_norm(self) -> Tensor:
        """‖C‖_F."""
        return self.matrix.norm()

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> DenseOperator:
        """(C + damping·I)⁻¹ from the eigendecomposition, a new operator.

        ``pi_damping`` (factored damping) applies to Kronecker products only; this block is damped exactly.
        """
        damping = check_nonnegative("damping", damping)
        values, vectors = self.eigen()
        shifted = values + damping
        if bool((shifted <= 0).any()):
            raise ValueError("the damped block is singular or indefinite: increase damping")
        return DenseOperator((vectors / shifted) @ vectors.T, self.param_shapes, self.param_names)
