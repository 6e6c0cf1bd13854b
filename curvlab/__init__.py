"""curvlab: curvature analysis for PyTorch.

Exact Hessian, GGN, Fisher and empirical Fisher as matrix-free operators that
share one interface (``C @ v``, ``to_dense``, ``blocks``, ``to_scipy``, ``solve``),
their structured approximations (KFAC, EKFAC, ACP, block-diagonal, diagonal),
spectra and diagnostics of any of them, comparisons, HDF5 storage and plots.
"""

from curvlab._version import __version__
from curvlab.compare import ComparisonReport, compare
from curvlab.crosscheck import Crosscheck, crosscheck
from curvlab.errors import (
    CurvlabError,
    DataError,
    DenseTooLargeError,
    NonFiniteError,
    NotPositiveDefiniteError,
    UnsupportedError,
)
from curvlab.operators import GGN, CurvatureOperator, EmpiricalFisher, Fisher, Hessian
from curvlab.operators.dense import DenseOperator
from curvlab.problem import Problem
from curvlab.spectra import (
    condition_number,
    curvature_along_gradient,
    eigvalsh,
    learning_rate,
    negative_eigenvalue_share,
    spectral_density,
    top_eigen,
    trace,
)
from curvlab.storage import Store, StoreError
from curvlab.structured import (
    ACP,
    EKFAC,
    KFAC,
    BlockDiagonal,
    BlockDiagonalOperator,
    Diagonal,
    EigenbasisBlock,
    KroneckerBlock,
    LowRankKroneckerBlock,
)

__all__ = [
    "ACP",
    "BlockDiagonal",
    "Diagonal",
    "EKFAC",
    "EigenbasisBlock",
    "GGN",
    "KFAC",
    "BlockDiagonalOperator",
    "KroneckerBlock",
    "LowRankKroneckerBlock",
    "CurvatureOperator",
    "CurvlabError",
    "DataError",
    "DenseOperator",
    "DenseTooLargeError",
    "EmpiricalFisher",
    "Fisher",
    "Hessian",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "Problem",
    "Store",
    "StoreError",
    "UnsupportedError",
    "__version__",
    "compare",
    "Crosscheck",
    "crosscheck",
    "ComparisonReport",
    "eigvalsh",
    "top_eigen",
    "trace",
    "spectral_density",
    "condition_number",
    "negative_eigenvalue_share",
    "curvature_along_gradient",
    "learning_rate",
]
