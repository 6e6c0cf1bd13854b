"""An operator made of diagonal blocks, each a curvature object over some tensors."""

from __future__ import annotations

import torch

from curvlab.operators.base import CurvatureOperator


def _structured(block: CurvatureOperator, method: str):
    """``block.method()`` if the block has structure, else from its dense matrix."""
    if hasattr(block, method):
        return getattr(block, method)()
    dense = block.to_dense()
    return {
        "trace": dense.trace,
        "frobenius_norm": dense.norm,
        "eigvalsh": lambda: torch.linalg.eigvalsh(dense),
    }[method]()


class BlockDiagonalOperator(CurvatureOperator):
    """blockdiag(B_1, …, B_m); block i acts on the parameter tensors ``indices[i]``.

    Args:
        blocks: ``(indices, operator)`` pairs; every tensor in exactly one block.
        param_shapes: Shapes of all tensors, in the flattening order.
        dtype: Dtype of the operator.
        device: Its device.
        param_names: Names of the tensors.
    """

    def __init__(self, blocks, param_shapes, dtype, device, param_names=None):
        super().__init__(param_shapes, dtype, device, param_names)
        covered = sorted(i for indices, _ in blocks for i in indices)
        if covered != list(range(len(self.param_shapes))):
            raise ValueError(f"blocks must cover every tensor exactly once, got indices {covered}")
        self.block_indices = [list(indices) for indices, _ in blocks]
        self.block_operators = [operator for _, operator in blocks]

    def _operands(self):
        return list(self.block_operators)

    def _matmat(self, Vs):
        results = [None] * len(Vs)
        for indices, operator in zip(self.block_indices, self.block_operators):
            for i, product in zip(indices, operator._matmat([Vs[i] for i in indices])):
                results[i] = product
        return results

    def trace(self):
        """Sum of the blocks' traces."""
        return sum(_structured(b, "trace") for b in self.block_operators)

    def frobenius_norm(self):
        """√(Σ_blocks ‖B_i‖_F²)."""
        return sum(_structured(b, "frobenius_norm") ** 2 for b in self.block_operators) ** 0.5

    def eigvalsh(self):
        """All eigenvalues (the union of the blocks'), ascending."""
        return torch.cat([_structured(b, "eigvalsh") for b in self.block_operators]).sort().values

    def logdet(self, damping: float = 0.0):
        """Log det(C + damping·I) = Σ_blocks log det(B_i + damping·I)."""
        return torch.log(self.eigvalsh() + damping).sum()

    @property
    def has_inverse(self) -> bool:  # noqa: D102
        return all(b.has_inverse for b in self.block_operators)

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> BlockDiagonalOperator:
        """blockdiag((B_i + damping·I)⁻¹), a new operator (nothing is mutated).

        ``pi_damping``: Martens & Grosse's factored damping for the Kronecker blocks; every
        other block (dense, diagonal, an EKFAC eigenbasis) is damped exactly.
        """
        blocks = [
            (i, b.inverse(damping, pi_damping=pi_damping))
            for i, b in zip(self.block_indices, self.block_operators)
        ]
        return BlockDiagonalOperator(blocks, self.param_shapes, self.dtype, self.device, self.param_names)

    def blocks(self, by: str = "layer"):
        """The stored blocks (``by="layer"``), or one block per tensor (``"parameter"``)."""
        if by == "layer":
            return list(self.block_operators)
        if by == "parameter":
            return [b for operator in self.block_operators for b in operator.blocks(by="parameter")]
        raise ValueError(f"by must be 'parameter' or 'layer', got {by!r}")
