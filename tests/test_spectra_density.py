"""Spectral densities by stochastic Lanczos quadrature against exact spectra."""

import pytest
import torch

import curvlab as cl
from curvlab import reference
from curvlab.sampling import rademacher
from curvlab.spectra.lanczos import lanczos_tridiagonal
from tests.helpers import assert_close_rel
from tests.spectra_helpers import dense_operator


def test_slq_density_integrates_to_one_and_is_nonnegative(spectra_problem):
    density = cl.spectral_density(cl.Hessian(spectra_problem), num_probes=8, lanczos_steps=20, progress=False)
    assert (density.density >= 0).all()
    assert torch.trapezoid(density.density, density.grid).item() == pytest.approx(1.0, abs=1e-6)
    assert_close_rel(density.weights.sum(1), torch.ones(8, dtype=torch.float64), 1e-12, "weights")


def test_slq_quadrature_reproduces_probe_moments_exactly():
    # Gauss quadrature with m nodes is exact for vᵀ C^p v, p ≤ 2m − 1, for the probe v.
    D = dense_operator(torch.linspace(-1, 3, 60, dtype=torch.float64))
    M = D.to_dense()
    density = cl.spectral_density(D, num_probes=1, lanczos_steps=6, seed=7, progress=False)
    v = rademacher(60, 1, torch.Generator().manual_seed(7), torch.float64, "cpu").squeeze(1)
    for power in range(0, 12):
        expected = (v @ torch.linalg.matrix_power(M, power) @ v).item() / 60
        assert density.moment(power) == pytest.approx(expected, rel=1e-9, abs=1e-12), power


def test_slq_moments_match_trace_moments(spectra_problem):
    G = reference.ggn(spectra_problem)
    n = G.shape[0]
    density = cl.spectral_density(
        cl.GGN(spectra_problem), num_probes=200, lanczos_steps=10, seed=0, progress=False
    )
    for power in (1, 2):
        exact = torch.linalg.matrix_power(G, power).trace().item() / n
        # Rademacher quadratic forms: relative spread well under 1/√(probes) · 3 here.
        assert density.moment(power) == pytest.approx(exact, rel=0.25), power


def test_slq_with_full_steps_recovers_the_eigenvalues():
    eigenvalues = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    density = cl.spectral_density(dense_operator(eigenvalues), num_probes=4, lanczos_steps=6, progress=False)
    nodes = density.nodes[density.weights > 1e-12]
    for node in nodes:
        assert (eigenvalues - node).abs().min() < 1e-10


def test_slq_is_reproducible():
    D = dense_operator(torch.linspace(0, 1, 40, dtype=torch.float64))
    a = cl.spectral_density(D, num_probes=3, lanczos_steps=5, seed=1, progress=False)
    b = cl.spectral_density(D, num_probes=3, lanczos_steps=5, seed=1, probes_per_pass=1, progress=False)
    assert_close_rel(a.density, b.density, 1e-12, "density does not depend on batching of probes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_tridiagonal_after_an_invariant_subspace_is_zero_not_nan(dtype):
    # The zero matrix breaks down at once, diag(1, 2, 0, …) after three steps:
    # entries beyond each T's length are 0 (documented), in float32 too.
    for matrix, length in ((torch.zeros(6, 6), 1), (torch.diag(torch.tensor([1.0, 2, 0, 0, 0, 0])), 3)):
        alpha, beta, lengths = lanczos_tridiagonal(matrix.to(dtype), torch.ones(6, 2, dtype=dtype), 5)
        assert lengths.tolist() == [length, length]
        assert torch.isfinite(alpha).all() and torch.isfinite(beta).all()
        assert (alpha[:, length:] == 0).all() and (beta[:, length - 1 :] == 0).all()


def test_slq_of_a_problem_operator_does_not_depend_on_probes_per_pass(spectra_problem):
    # One probe a pass writes each product straight into the basis; several go
    # through one batched product: the same tridiagonal matrices either way.
    H = cl.Hessian(spectra_problem)
    a = cl.spectral_density(H, num_probes=3, lanczos_steps=8, seed=2, progress=False)
    b = cl.spectral_density(H, num_probes=3, lanczos_steps=8, seed=2, probes_per_pass=1, progress=False)
    assert_close_rel(b.nodes, a.nodes, 1e-10, "nodes")
    assert_close_rel(b.weights, a.weights, 1e-10, "weights")
