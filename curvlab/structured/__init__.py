"""Structured curvature: Kronecker-factored (KFAC) and block-diagonal operators."""

from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kfac import KFAC
from curvlab.structured.kronecker import KroneckerBlock

__all__ = ["KFAC", "BlockDiagonalOperator", "KroneckerBlock"]
