"""Exact spectra: structured where the object has structure, dense otherwise."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator


def eigvalsh(C: CurvatureOperator, max_bytes: int | None = None) -> Tensor:
    """All eigenvalues of a symmetric curvature object, ascending, on its device.

    Structured objects (KFAC, EKFAC, block-diagonal, Kronecker blocks) use their
    structure, e.g. eig(G ⊗ A) = {λ_i(G) λ_j(A)}, and never build the dense matrix;
    others are materialised (``to_dense`` refuses if that would not fit).
    """
    if hasattr(C, "eigvalsh"):
        return C.eigvalsh()
    return torch.linalg.eigvalsh(C.to_dense(max_bytes=max_bytes))
