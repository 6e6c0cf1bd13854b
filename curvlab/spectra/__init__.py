"""Spectra of curvature objects."""

from curvlab.spectra.exact import eigvalsh

__all__ = ["eigvalsh"]
