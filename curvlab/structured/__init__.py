"""Structured curvature: Kronecker-factored (KFAC) and block-diagonal operators."""

from curvlab.structured.acp import ACP
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.diagonal import BlockDiagonal, Diagonal
from curvlab.structured.ekfac import EKFAC
from curvlab.structured.kfac import KFAC
from curvlab.structured.kronecker import EigenbasisBlock, KroneckerBlock, LowRankKroneckerBlock

__all__ = [
    "ACP",
    "BlockDiagonal",
    "Diagonal",
    "EKFAC",
    "KFAC",
    "BlockDiagonalOperator",
    "EigenbasisBlock",
    "KroneckerBlock",
    "LowRankKroneckerBlock",
]
