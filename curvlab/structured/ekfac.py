r"""EKFAC: eigenvalue-corrected KFAC (George et al. 2018).

Keeps KFAC's eigenbases Q_G, Q_A per block and replaces the eigenvalues λ_G λ_Aᵀ
by the exact second moments of the backpropagated per-example gradients in that
basis: D = c Σ_{v,n} (Q_Gᵀ Γ_{v,n} Q_A)² (elementwise), Γ_{v,n} = Σ_r g_{v,n,r} ã_{n,r}ᵀ.
D is the diagonal of (Q_G ⊗ Q_A)ᵀ B (Q_G ⊗ Q_A) for the exact block B that KFAC
approximates, so EKFAC is the best approximation with these eigenvectors in
Frobenius norm — never farther from B than KFAC.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kfac import KFAC

_MAX_ELEMENTS = 2**24  # bound on the (vectors, examples, d_out, d_A) intermediate


def _squared_rotated_moments(g: Tensor, a: Tensor) -> Tensor:
    """Σ_{v,n} (Σ_r g_{vnr} a_{nrᵀ})² for rotated g (V, N, R, d_out) and a (N, R, d_A)."""
    V, N, R, d_out = g.shape
    d_A = a.shape[-1]
    if R == 1:  # (g aᵀ)² = g² (a²)ᵀ: no per-example matrices needed
        return torch.einsum("vno,ni->oi", g[:, :, 0] ** 2, a[:, 0] ** 2)
    total = torch.zeros(d_out, d_A, dtype=g.dtype, device=g.device)
    step = max(1, _MAX_ELEMENTS // max(1, V * d_out * d_A))
    for start in range(0, N, step):
        per_example = torch.einsum("vnro,nri->vnoi", g[:, start : start + step], a[start : start + step])
        total += (per_example**2).sum((0, 1))
    return total


class EKFAC(KFAC):
    """Eigenvalue-corrected KFAC; same arguments and flavours as ``KFAC``.

    Blocks are ``EigenbasisBlock``s: exact ``solve``/``inverse`` and eigenvalues
    from the refit diagonal, as for KFAC.
    """

    def __init__(self, problem, **options):
        super().__init__(problem, **options)
        kfac_blocks = list(self.block_operators)
        bases = [block.eigenbasis_form() for block in kfac_blocks]
        D = [torch.zeros_like(basis.D) for basis in bases]
        for _, inputs, grads in self._statistics():
            for i, ((layer, columns), basis) in enumerate(zip(self.block_sources, bases)):
                g = grads[layer.name] @ basis.Q_G
                a = inputs[layer.name][..., columns] @ basis.Q_A
                D[i] += _squared_rotated_moments(g, a)
        c = problem.reduction_factor
        for basis, moments in zip(bases, D):
            basis.D = moments * c
        BlockDiagonalOperator.__init__(
            self,
            list(zip(self.block_indices, bases)),
            self.param_shapes,
            self.dtype,
            self.device,
            self.param_names,
        )
