"""Identities that must hold: Fisher = GGN, GGN = Hessian for linear models, MC Fisher statistics."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.cases import CASES
from tests.helpers import assert_close_rel


def _with_unit_hessian_scale(problem):
    """The problem with the loss options that scale ∇²ℓ = s Λ taken out (s = 1), else None.

    BCE's ``pos_weight`` (s = 1 + (w − 1) y) is dropped; cross-entropy's probability
    targets (s = Σ_c t_c) are normalised to distributions. The Fisher, the model's
    own, is the same for both problems.
    """
    loss_fn = problem.loss_fn
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and loss_fn.pos_weight is not None:
        plain = nn.BCEWithLogitsLoss(reduction=loss_fn.reduction)
        return cl.Problem(problem.model, plain, problem.data, params=problem.params)
    if isinstance(loss_fn, nn.CrossEntropyLoss) and any(y.is_floating_point() for _, y in problem.data):
        data = [(X, y / y.sum(1, keepdim=True)) for X, y in problem.data]
        return cl.Problem(problem.model, loss_fn, data, params=problem.params)
    return None


def test_exact_fisher_equals_ggn(problem64):
    problem = problem64
    unit = _with_unit_hessian_scale(problem)
    if unit is not None:
        assert_close_rel(cl.Fisher(problem).to_dense(), cl.Fisher(unit).to_dense(), 1e-13, "F")
        assert (cl.GGN(problem).to_dense() - cl.GGN(unit).to_dense()).norm() > 1e-3
        problem = unit
    assert_close_rel(cl.Fisher(problem).to_dense(), cl.GGN(problem).to_dense(), 1e-12, "F vs G")


def test_ggn_equals_hessian_for_linear_model(linear_case):
    problem = linear_case.build(torch.float64)
    assert_close_rel(cl.GGN(problem).to_dense(), cl.Hessian(problem).to_dense(), 1e-12, "G vs H")


def test_linear_mse_closed_form():
    """Linear model y = W x with MSE(sum): H = 2 I_out ⊗ XᵀX (row-major vec of W)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    problem = cl.Problem(model, nn.MSELoss(reduction="sum"), (X, y))
    expected = 2 * torch.kron(torch.eye(2, dtype=torch.float64), X.T @ X)
    assert_close_rel(cl.Hessian(problem).to_dense(), expected, 1e-13, "closed form")
    mean = cl.Problem(model, nn.MSELoss(), (X, y))  # mean divides by N·C = 10
    assert_close_rel(cl.Hessian(mean).to_dense(), expected / 10, 1e-13, "closed form, mean")


def test_unequal_batches_equal_one_batch():
    """The risk over batches of unequal size equals the risk over one concatenated batch."""
    case = next(c for c in CASES if c.name == "mlp_relu_ce_mean_3batches")
    split = case.build(torch.float64)
    X = torch.cat([x for x, _ in split.data])
    y = torch.cat([t for _, t in split.data])
    whole = cl.Problem(split.model, split.loss_fn, (X, y))
    for operator in (cl.Hessian, cl.GGN, cl.EmpiricalFisher):
        assert_close_rel(operator(split).to_dense(), operator(whole).to_dense(), 1e-12, operator.__name__)


MC_CASES = [c for c in CASES if c.name in ("mlp_tanh_mse_mean", "mlp_sigmoid_ce_sum", "mlp_gelu_bce_mean")]


@pytest.fixture(params=MC_CASES, ids=lambda c: c.name)
def mc_problem(request):
    return request.param.build(torch.float64)


def _relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def test_mc_fisher_is_reproducible_and_symmetric(mc_problem):
    first = cl.Fisher(mc_problem, mc_samples=3, seed=11).to_dense()
    again = cl.Fisher(mc_problem, mc_samples=3, seed=11).to_dense()
    other = cl.Fisher(mc_problem, mc_samples=3, seed=12).to_dense()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert_close_rel(first, first.T, 1e-13, "symmetry (same samples in every product)")


def test_mc_fisher_error_shrinks_like_inverse_sqrt_samples(mc_problem):
    """E‖F_S − F‖² = σ²/S: the RMS error over seeds drops 4× from S=4 to S=64."""
    exact = reference.fisher(mc_problem)

    def rms_error(samples):
        errors = [
            _relative_error(cl.Fisher(mc_problem, mc_samples=samples, seed=seed).to_dense(), exact)
            for seed in range(12)
        ]
        return torch.tensor(errors).pow(2).mean().sqrt().item()

    ratio = rms_error(4) / rms_error(64)
    assert 2.5 < ratio < 6.4, f"error ratio {ratio:.2f}, expected about 4 = sqrt(64/4)"


def test_mc_fisher_is_unbiased(mc_problem):
    """With S = 40,000 labels the error is ~1/200 of a one-sample estimate's (no bias left)."""
    exact = reference.fisher(mc_problem)
    one_sample = torch.tensor(
        [_relative_error(cl.Fisher(mc_problem, mc_samples=1, seed=s).to_dense(), exact) for s in range(12)]
    )
    many = _relative_error(cl.Fisher(mc_problem, mc_samples=40_000, seed=99).to_dense(), exact)
    rms_one = one_sample.pow(2).mean().sqrt().item()
    assert many < 4 * rms_one / 200, f"error {many:.2e} vs expected ~{rms_one / 200:.2e}"
