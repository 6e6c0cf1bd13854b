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

from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kfac import KFAC


class EKFAC(KFAC):
    """Eigenvalue-corrected KFAC; same arguments and flavours as ``KFAC``.

    Blocks are ``EigenbasisBlock``s: exact ``solve``/``inverse`` and eigenvalues
    from the refit diagonal, as for KFAC.
    """

    def __init__(self, problem, **options):
        if options.pop("low_rank", False) is not False:
            raise ValueError("EKFAC refits the eigenvalues of full eigenbases: low_rank must be False")
        super().__init__(problem, low_rank=False, **options)
        kronecker_blocks = self.block_operators[: len(self.block_sources)]  # others: other_structure
        bases = [block.eigenbasis_form() for block in kronecker_blocks]

        def local() -> list[torch.Tensor]:
            D = [torch.zeros_like(basis.D) for basis in bases]
            for batch in self._statistics() if bases else ():
                for chunk in batch.chunks:
                    for i, ((layer, columns), basis) in enumerate(zip(self.block_sources, bases)):
                        g = chunk.gradients[layer.name].rotated(basis.Q_G)
                        a = batch.inputs[layer.name][chunk.examples][..., columns] @ basis.Q_A
                        D[i] += g.squared_moments(a)
            return D

        D = problem.sum_over_ranks(local, lambda: [torch.zeros_like(basis.D) for basis in bases])
        c = problem.reduction_factor
        for basis, moments in zip(bases, D):
            basis.D = moments * c
        BlockDiagonalOperator.__init__(
            self,
            list(zip(self.block_indices, bases + self.block_operators[len(bases) :])),
            self.param_shapes,
            self.dtype,
            self.device,
            self.param_names,
        )
