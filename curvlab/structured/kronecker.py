r"""Kronecker-factored blocks G ⊗ A over one layer's weight (and bias).

For a weight W of shape (d_out, d_in) flattened row-major, (G ⊗ A) vec(M) =
vec(G M A) (A symmetric), so a product never forms the Kronecker matrix. With the
bias folded in, M = [W b] of shape (d_out, d_in + 1) and A's last row/column
belongs to the constant input 1 (THEORY.md §Kronecker factorization).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator


class KroneckerBlock(CurvatureOperator):
    """G ⊗ A for one layer; the parameters are the weight and optionally the bias.

    Args:
        G: Output-side factor, (d_out, d_out).
        A: Input-side factor, (d_in [+ 1], d_in [+ 1]); with ``bias_folded`` the last
            index is the bias' constant input.
        param_shapes: Shapes of the block's tensors: ``[weight]``, ``[weight, bias]``,
            or ``[bias]`` alone (then A is 1 × 1).
        bias_folded: Whether the block's last tensor is a bias folded into A.
        param_names: Names of the tensors.
    """

    def __init__(self, G: Tensor, A: Tensor, param_shapes, bias_folded: bool, param_names=None):
        super().__init__(param_shapes, G.dtype, G.device, param_names)
        self.G = G
        self.A = A
        self.bias_folded = bias_folded
        self._eigen = None

    def _to_matrix(self, Vs: list[Tensor]) -> Tensor:
        """List format → (k, d_out, d_A)."""
        k, d_out = Vs[0].shape[0], self.G.shape[0]
        parts = [V.reshape(k, d_out, -1) for V in Vs]
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _from_matrix(self, M: Tensor) -> list[Tensor]:
        k = M.shape[0]
        if len(self.param_shapes) == 1:
            return [M.reshape(k, *self.param_shapes[0])]
        weight, bias = M[:, :, :-1], M[:, :, -1]
        return [weight.reshape(k, *self.param_shapes[0]), bias.reshape(k, *self.param_shapes[1])]

    def _matmat(self, Vs):
        return self._from_matrix(self.G @ self._to_matrix(Vs) @ self.A)

    def _block(self, indices):
        if len(indices) == len(self.param_shapes):
            return self
        (index,) = indices
        names = [self.param_names[index]] if self.param_names else None
        A = self.A[:-1, :-1] if index == 0 else self.A[-1:, -1:]
        return KroneckerBlock(self.G, A, [self.param_shapes[index]], False, names)

    # -------------------------------------------------------- structure
    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cached eigendecompositions ``(λ_G, Q_G, λ_A, Q_A)`` of the factors."""
        if self._eigen is None:
            lam_G, Q_G = torch.linalg.eigh(self.G)
            lam_A, Q_A = torch.linalg.eigh(self.A)
            self._eigen = (lam_G, Q_G, lam_A, Q_A)
        return self._eigen

    def eigvalsh(self) -> Tensor:
        """All eigenvalues λ_i(G) λ_j(A), ascending, without forming G ⊗ A."""
        lam_G, _, lam_A, _ = self.eigen()
        return torch.outer(lam_G, lam_A).flatten().sort().values

    def trace(self) -> Tensor:
        """tr(G ⊗ A) = tr G · tr A."""
        return self.G.trace() * self.A.trace()

    def frobenius_norm(self) -> Tensor:
        """‖G ⊗ A‖_F = ‖G‖_F ‖A‖_F."""
        return self.G.norm() * self.A.norm()

    def logdet(self, damping: float = 0.0) -> Tensor:
        """Log-determinant log det(G ⊗ A + damping·I) from the factor eigenvalues."""
        return torch.log(self.eigvalsh() + damping).sum()

    def solve(self, v, damping: float = 0.0, tol: float | None = None, maxiter: int | None = None):
        """(G ⊗ A + damping·I)⁻¹ v exactly, in the factors' eigenbases (no CG)."""
        if damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}")
        lam_G, Q_G, lam_A, Q_A = self.eigen()
        denominator = torch.outer(lam_G, lam_A) + damping
        as_list = isinstance(v, (list, tuple))
        if as_list:
            Vs = [t.unsqueeze(0) for t in v]
        else:
            flat = v.unsqueeze(1) if v.dim() == 1 else v
            Vs = self.flat_to_list(flat)
        M = self._to_matrix(Vs)
        rotated = Q_G.T @ M @ Q_A
        result = self._from_matrix(Q_G @ (rotated / denominator) @ Q_A.T)
        if as_list:
            return [r.squeeze(0) for r in result]
        out = self.list_to_flat(result)
        return out.squeeze(1) if v.dim() == 1 else out
