"""Pieces shared by the spectra tests: a dense operator with given eigenvalues, residual checks."""

import torch

import curvlab as cl


def dense_operator(eigenvalues: torch.Tensor, seed: int = 0) -> cl.DenseOperator:
    """A dense symmetric operator with these eigenvalues and a random eigenbasis."""
    generator = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return cl.DenseOperator((Q * eigenvalues) @ Q.T, [(n,)])


def assert_residuals_match(reported, true, norm):
    """Reported residual norms are the true ones: to 1e-6 relative, or to rounding (1e3 · eps · ‖C‖).

    The guard pairs (``top_eigen(guard=...)``) keep Lanczos going after the k have
    converged, so these often end at rounding level, where only the floor is meaningful.
    """
    floor = 1e3 * torch.finfo(true.dtype).eps * norm
    assert ((reported - true).abs() <= 1e-6 * true + floor).all(), (reported, true)
