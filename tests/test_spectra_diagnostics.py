"""Condition numbers, negative shares, curvature along the gradient, exact spectra of tensors."""

import math

import pytest
import torch

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel
from tests.spectra_helpers import dense_operator


def test_condition_number_exact_uses_the_rank_cutoff(spectra_problem):
    G = cl.GGN(spectra_problem)
    eigenvalues = torch.linalg.eigvalsh(reference.ggn(spectra_problem))
    result = cl.condition_number(G, rtol=1e-6, method="exact")
    above = eigenvalues[eigenvalues > 1e-6 * eigenvalues[-1]]
    assert result.rank == len(above)
    assert result.value == pytest.approx((eigenvalues[-1] / above[0]).item(), rel=1e-8)


def test_condition_number_by_lanczos_matches_exact_for_a_definite_matrix():
    D = dense_operator(torch.logspace(-2, 1, 150, dtype=torch.float64))
    exact = cl.condition_number(D, method="exact")
    lanczos = cl.condition_number(D, method="lanczos", progress=False, tol=1e-8, basis_size=60)
    assert lanczos.value == pytest.approx(exact.value, rel=1e-6) and exact.value == pytest.approx(
        1000, rel=1e-10
    )


def test_condition_number_of_a_singular_matrix_by_lanczos_is_infinite():
    eigenvalues = torch.cat(
        [torch.zeros(20, dtype=torch.float64), torch.linspace(1, 2, 30, dtype=torch.float64)]
    )
    result = cl.condition_number(dense_operator(eigenvalues), method="lanczos", progress=False)
    assert math.isinf(result.value)
    assert cl.condition_number(dense_operator(eigenvalues), method="exact").value == pytest.approx(2.0)


def test_negative_eigenvalue_share(spectra_problem):
    H = cl.Hessian(spectra_problem)
    eigenvalues = torch.linalg.eigvalsh(reference.hessian_matrix(spectra_problem))
    expected = (eigenvalues < -1e-8 * eigenvalues.abs().max()).double().mean().item()
    assert cl.negative_eigenvalue_share(H, method="exact") == pytest.approx(expected)
    estimate = cl.negative_eigenvalue_share(H, method="slq", num_probes=100, lanczos_steps=30, progress=False)
    assert estimate == pytest.approx(expected, abs=0.08)


def test_curvature_along_the_gradient(spectra_problem):
    H = cl.Hessian(spectra_problem)
    g = spectra_problem.gradient()
    H_dense = reference.hessian_matrix(spectra_problem)
    result = cl.curvature_along_gradient(H)
    gHg = (g @ H_dense @ g).item()
    assert result.g_dot_g == pytest.approx((g @ g).item(), rel=1e-12)
    assert result.g_C_g == pytest.approx(gHg, rel=1e-10)
    if gHg > 0:
        assert result.best_step == pytest.approx((g @ g).item() / gHg, rel=1e-10)
        assert result.predicted_decrease == pytest.approx((g @ g).item() ** 2 / (2 * gHg), rel=1e-10)


def test_problem_gradient_matches_autograd_on_the_risk(spectra_problem):
    problem = spectra_problem
    total = sum(problem.batch_loss(problem.params, X, y) for X, y in problem.batches())
    grads = torch.autograd.grad(total * problem.reduction_factor, problem.params)
    assert_close_rel(problem.gradient(), torch.cat([g.reshape(-1) for g in grads]), 1e-12, "gradient")


def test_learning_rate_is_inverse_top_eigenvalue(spectra_problem):
    G = cl.GGN(spectra_problem)
    lambda_max = torch.linalg.eigvalsh(reference.ggn(spectra_problem))[-1].item()
    assert cl.learning_rate(G, progress=False) == pytest.approx(1 / lambda_max, rel=1e-8)


def test_exact_spectra_of_plain_tensors_and_small_ranks():
    D = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.equal(cl.eigvalsh(D), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert cl.condition_number(D).value == pytest.approx(3.0)
    single = torch.tensor([[4.0]], dtype=torch.float64)
    assert cl.condition_number(single).value == 1.0  # one positive eigenvalue: κ = 1
    rank_one = torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 4.0)).double()
    result = cl.condition_number(rank_one)
    assert result.rank == 1 and result.value == pytest.approx(1.0)
    assert math.isinf(cl.condition_number(torch.zeros(3, 3, dtype=torch.float64)).value)
