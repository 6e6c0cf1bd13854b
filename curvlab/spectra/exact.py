"""Exact spectra: structured where the object has structure, dense otherwise."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.spectra.lanczos import check_symmetric_matrix


def eigvalsh(C: CurvatureOperator | Tensor, max_bytes: int | None = None) -> Tensor:
    """All eigenvalues of a symmetric curvature object (or square symmetric tensor), ascending.

    Structured objects (KFAC, EKFAC, block-diagonal, Kronecker blocks) use their
    structure, e.g. eig(G ⊗ A) = {λ_i(G) λ_j(A)}, and never build the dense matrix;
    others are materialised (``to_dense`` refuses if that would not fit). On the
    object's device.
    """
    if isinstance(C, Tensor):
        check_symmetric_matrix(C)
        return torch.linalg.eigvalsh(C)
    if not isinstance(C, CurvatureOperator):
        raise TypeError(f"expected a curvlab curvature object or a square tensor, got {type(C).__name__}")
    return C.eigvalsh(max_bytes=max_bytes)
