"""Spectra of curvature objects: exact, Lanczos top-k, traces, densities, diagnostics.

Free functions taking any curvature object (exact, structured, dense), running
on its device.
"""

from curvlab.spectra.density import SpectralDensity, spectral_density
from curvlab.spectra.diagnostics import (
    ConditionNumber,
    CurvatureAlongDirection,
    condition_number,
    curvature_along_gradient,
    learning_rate,
    negative_eigenvalue_share,
)
from curvlab.spectra.exact import eigvalsh
from curvlab.spectra.lanczos import EigenResult, top_eigen
from curvlab.spectra.trace import TraceEstimate, trace

__all__ = [
    "ConditionNumber",
    "CurvatureAlongDirection",
    "EigenResult",
    "SpectralDensity",
    "TraceEstimate",
    "condition_number",
    "curvature_along_gradient",
    "eigvalsh",
    "learning_rate",
    "negative_eigenvalue_share",
    "spectral_density",
    "top_eigen",
    "trace",
]
