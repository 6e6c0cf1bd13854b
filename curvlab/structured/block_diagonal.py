"""An operator made of diagonal blocks, each a curvature object over some tensors."""

from __future__ import annotations

from curvlab.operators.base import CurvatureOperator


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

    def _matmat(self, Vs):
        results = [None] * len(Vs)
        for indices, operator in zip(self.block_indices, self.block_operators):
            for i, product in zip(indices, operator._matmat([Vs[i] for i in indices])):
                results[i] = product
        return results

    def blocks(self, by: str = "layer"):
        """The stored blocks (``by="layer"``), or one block per tensor (``"parameter"``)."""
        if by == "layer":
            return list(self.block_operators)
        if by == "parameter":
            return [b for operator in self.block_operators for b in operator.blocks(by="parameter")]
        raise ValueError(f"by must be 'parameter' or 'layer', got {by!r}")
