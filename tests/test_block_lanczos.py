"""Block Lanczos (``top_eigen(..., block_size=b)``) against ``eigh``: clusters, multiplicities, restarts."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import memory
from tests.spectra_helpers import dense_operator

F64 = torch.float64


def _spectrum(n: int = 120, seed: int = 0) -> torch.Tensor:
    """Top: 10, a triple 8 (exact), a cluster 7 ± 1e-9 (tighter than any tolerance), 6, 5; bulk in [0, 4)."""
    top = torch.tensor([10.0, 8.0, 8.0, 8.0, 7.0 + 1e-9, 7.0, 7.0 - 1e-9, 6.0, 5.0], dtype=F64)
    bulk = torch.rand(n - top.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64) * 4
    return torch.cat([top, bulk])


def _check(result, C, k, which="largest", tol=1e-10):
    exact = torch.linalg.eigvalsh(C.to_dense())
    if which == "largest":
        expected = exact.flip(0)[:k]
    elif which == "smallest":
        expected = exact[:k]
    else:
        expected = exact[exact.abs().argsort(descending=True)][:k]
    norm = exact.abs().max()
    assert result.converged
    assert (result.values - expected).abs().max() <= 10 * tol * norm
    V = result.vectors
    assert (V.T @ V - torch.eye(k, dtype=V.dtype)).abs().max() <= 1e-8  # k distinct unit vectors
    true_residuals = (C.to_dense() @ V - V * result.values).norm(dim=0)
    floor = 1e3 * torch.finfo(V.dtype).eps * norm
    assert torch.allclose(result.residuals, true_residuals, rtol=1e-6, atol=floor)
    assert (true_residuals <= tol * norm * 1.01).all()


@pytest.mark.parametrize("block_size", [3, 4, 7])
def test_block_lanczos_finds_an_exactly_repeated_eigenvalue_in_full(block_size):
    C = dense_operator(_spectrum())
    result = cl.top_eigen(C, 9, tol=1e-10, block_size=block_size, progress=False)
    _check(result, C, 9)
    assert torch.allclose(result.values[1:4], torch.full((3,), 8.0, dtype=F64), atol=1e-9)


@pytest.mark.parametrize("basis_size", [26, 40])
def test_block_lanczos_with_thick_restarts_resolves_a_cluster_tighter_than_the_tolerance(basis_size):
    C = dense_operator(_spectrum(400, seed=1), seed=1)
    result = cl.top_eigen(C, 8, tol=1e-8, block_size=4, basis_size=basis_size, progress=False)
    _check(result, C, 8, tol=1e-8)


@pytest.mark.parametrize("which", ["smallest", "magnitude"])
def test_block_lanczos_other_ends(which):
    values = torch.linspace(-3, 2, 60, dtype=F64)
    values[:3] = -3.0  # a repeated smallest (and largest-magnitude) eigenvalue
    C = dense_operator(values, seed=2)
    result = cl.top_eigen(C, 4, which=which, tol=1e-10, block_size=4, progress=False)
    _check(result, C, 4, which=which)


def test_block_lanczos_when_the_block_does_not_divide_n():
    C = dense_operator(torch.arange(1, 11, dtype=F64), seed=3)  # n = 10, blocks of 4: 4 + 4 + 2
    result = cl.top_eigen(C, 3, tol=1e-12, block_size=4, progress=False)
    _check(result, C, 3, tol=1e-12)


def test_block_lanczos_of_a_low_rank_matrix_fills_the_missing_directions():
    """Rank 2 < b: the second block is an invariant subspace, replaced by random directions."""
    generator = torch.Generator().manual_seed(4)
    U = torch.randn(50, 2, generator=generator, dtype=F64)
    C = cl.DenseOperator(U @ U.T, [(50,)])
    result = cl.top_eigen(C, 3, tol=1e-10, block_size=4, progress=False)
    _check(result, C, 3)


def test_block_lanczos_in_float32():
    C32 = cl.DenseOperator(dense_operator(_spectrum(300, seed=5), seed=5).to_dense().float(), [(300,)])
    result = cl.top_eigen(C32, 9, tol=1e-4, block_size=4, progress=False)
    assert result.converged and result.values.dtype == torch.float32
    expected = torch.linalg.eigvalsh(C32.to_dense().double()).flip(0)[:9]
    assert (result.values.double() - expected).abs().max() <= 1e-4 * 10


def test_block_and_single_vector_lanczos_agree_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(20, 6, dtype=F64), torch.randint(0, 3, (20,))
    G = cl.GGN(cl.Problem(model, nn.CrossEntropyLoss(), (X, y)))
    block = cl.top_eigen(G, 5, tol=1e-10, block_size=3, progress=False)
    single = cl.top_eigen(G, 5, tol=1e-10, progress=False)
    assert torch.allclose(block.values, single.values, rtol=1e-9)
    _check(block, G, 5)


def test_block_lanczos_warns_when_not_converged_and_checks_its_options(monkeypatch):
    C = dense_operator(_spectrum(400, seed=6), seed=6)
    with pytest.warns(RuntimeWarning, match="blocks of 4"):
        result = cl.top_eigen(C, 8, tol=1e-12, block_size=4, max_matvecs=24, progress=False)
    assert not result.converged
    with pytest.raises(ValueError, match="block_size"):
        cl.top_eigen(C, 2, block_size=0)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 400 * 30)  # room for 30 vectors
    needed = (20 + 2 * 4 + 3 * 2) * 400 * 8  # the basis, two blocks, 3k
    with pytest.raises(cl.DenseTooLargeError, match=f"block_size=4.* would need {needed:,} bytes"):
        cl.top_eigen(C, 2, block_size=4, basis_size=20)


def test_float32_dots_of_long_vectors_are_accumulated_accurately():
    """Lanczos' norms of 10⁶–10⁷ entries: one float32 BLAS dot was 1e-6–1e-5 off (positive entries)."""
    from curvlab.spectra.lanczos import _dot, _norm

    a = torch.rand(3_000_000, generator=torch.Generator().manual_seed(0)) + 0.5
    exact = torch.dot(a.double(), a.double()).item()
    assert abs(_dot(a, a).item() - exact) / exact < 1e-7
    assert abs(_norm(a).item() ** 2 - exact) / exact < 1e-6  # the square root's own float32 rounding
