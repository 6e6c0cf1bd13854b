"""An operator made of diagonal blocks, each a curvature object over some tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.records import RecordParts, numpy, recordable
from curvlab.structured.kronecker import KroneckerBlock, LowRankKroneckerBlock


@recordable("kfac_factors")
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
        return sum(b.trace() for b in self.block_operators)

    def frobenius_norm(self):
        """√(Σ_blocks ‖B_i‖_F²)."""
        return sum(b.frobenius_norm() ** 2 for b in self.block_operators) ** 0.5

    @property
    def structured_eigvalsh(self) -> bool:  # noqa: D102
        return all(b.structured_eigvalsh for b in self.block_operators)

    def eigvalsh(self, max_bytes: int | None = None):
        """All eigenvalues (the union of the blocks'), ascending."""
        return torch.cat([b.eigvalsh(max_bytes) for b in self.block_operators]).sort().values

    def _diag_route(self):
        parts: list = [None] * len(self.param_shapes)
        for indices, block in zip(self.block_indices, self.block_operators):
            sizes = [self.param_shapes[i].numel() for i in indices]
            for i, piece in zip(indices, block.diag().split(sizes)):
                parts[i] = piece
        return torch.cat(parts), "structure"

    def _scaled(self, scale):
        blocks = [(i, b._scaled(scale)) for i, b in zip(self.block_indices, self.block_operators)]
        return BlockDiagonalOperator(blocks, self.param_shapes, self.dtype, self.device, self.param_names)

    def _added(self, other):
        """Block by block where both have the same blocks (KFAC + KFAC: sums of Kronecker blocks)."""
        if not isinstance(other, BlockDiagonalOperator) or other.block_indices != self.block_indices:
            return None
        blocks = [
            (i, a + b) for i, a, b in zip(self.block_indices, self.block_operators, other.block_operators)
        ]
        return BlockDiagonalOperator(blocks, self.param_shapes, self.dtype, self.device, self.param_names)

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

    # ------------------------------------------------------------ as a store record
    def _factor_keys(self) -> list[tuple[str, slice | None]]:
        """Per Kronecker block: the key of its stored factors and the columns of A it uses (all)."""
        return [
            (" + ".join(block.param_names or map(str, indices)), None)
            for indices, block in zip(self.block_indices, self.block_operators)
            if isinstance(block, KroneckerBlock)
        ]

    def _stored_factors(self, key: str, block: KroneckerBlock) -> dict[str, Tensor]:
        """``{"A" or "Z": …, "G": …}`` stored under ``key`` for ``block`` (KFAC: the layer's whole A).

        A low-rank input factor is stored as its root Z (A = ZᵀZ), never densified.
        """
        if isinstance(block, LowRankKroneckerBlock):
            return {"Z": block.Z, "G": block.G}
        return {"A": block.A, "G": block.G}

    def to_record(self, settings: dict) -> RecordParts:
        """The Kronecker blocks' factors (``kfac_factors``), and where each block sits.

        Other blocks (``other_structure``'s exact or diagonal blocks) are not stored;
        ``settings["complete"]`` says whether every block was.
        """
        kronecker = [
            (indices, block)
            for indices, block in zip(self.block_indices, self.block_operators)
            if isinstance(block, KroneckerBlock)
        ]
        if not kronecker:
            raise TypeError(f"a {type(self).__name__} without Kronecker blocks has no factors to store")
        data, described = {}, []
        for (key, columns), (indices, block) in zip(self._factor_keys(), kronecker):
            data[key] = {name: numpy(t) for name, t in self._stored_factors(key, block).items()}
            described.append(
                {
                    "key": key,
                    "columns": None if columns is None else [columns.start, columns.stop],
                    "indices": list(indices),
                    "bias_folded": block.bias_folded,
                }
            )
        settings.update(
            blocks=described,
            complete=len(kronecker) == len(self.block_operators),
            param_shapes=[list(s) for s in self.param_shapes],
            param_names=self.param_names,
        )
        return RecordParts("kfac_factors", data, settings)

    @classmethod
    def from_record(cls, record) -> BlockDiagonalOperator:
        """The operator of a complete ``kfac_factors`` record (every block a Kronecker product)."""
        settings = record.settings
        if not settings.get("complete"):
            raise ValueError(
                f"record {record.name!r} holds only the Kronecker blocks of its operator "
                "(others were exact or diagonal blocks, not stored): read its factors from record.data"
            )
        shapes = [torch.Size(s) for s in settings["param_shapes"]]
        names = settings["param_names"]
        blocks = []
        for entry in settings["blocks"]:
            factors = record.data[entry["key"]]
            low_rank = "Z" in factors
            A, G = torch.as_tensor(factors["Z" if low_rank else "A"]), torch.as_tensor(factors["G"])
            if entry["columns"] is not None:
                start, stop = entry["columns"]
                A = A[:, start:stop] if low_rank else A[start:stop, start:stop]
            indices = entry["indices"]
            block_names = None if names is None else [names[i] for i in indices]
            Block = KroneckerBlock
            if low_rank and A.shape[1] == 1:  # a bias on its own: its 1 × 1 factor
                A = A.T @ A
            elif low_rank:
                Block = LowRankKroneckerBlock
            blocks.append(
                (indices, Block(G, A, [shapes[i] for i in indices], entry["bias_folded"], block_names))
            )
        return BlockDiagonalOperator(blocks, shapes, blocks[0][1].dtype, blocks[0][1].device, names)

    def blocks(self, by: str = "layer"):
        """The stored blocks (``by="layer"``), or one block per tensor (``"parameter"``)."""
        if by == "layer":
            return list(self.block_operators)
        if by == "parameter":
            return [b for operator in self.block_operators for b in operator.blocks(by="parameter")]
        raise ValueError(f"by must be 'parameter' or 'layer', got {by!r}")
