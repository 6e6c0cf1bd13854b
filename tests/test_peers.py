"""Cross-checks against BackPACK and curvlinops on the quantities they share."""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.cases import CASES
from tests.helpers import assert_close_rel

SEQUENTIAL_MLP_CASES = [
    c for c in CASES if c.name.startswith("mlp_") and "softplus" not in c.name and "gelu" not in c.name
]


@pytest.fixture(params=SEQUENTIAL_MLP_CASES, ids=lambda c: c.name)
def mlp_problem(request):
    return request.param.build(torch.float64)


def _backpack_quantity(problem, extension, attribute):
    backpack = pytest.importorskip("backpack")
    # BackPACK leaves hooks on the modules it extends: give it a copy of the model.
    model = backpack.extend(copy.deepcopy(problem.model))
    named = dict(model.named_parameters())
    params = [named[name] for name in problem.param_names]
    loss_fn = backpack.extend(type(problem.loss_fn)(reduction=problem.loss_fn.reduction))
    if problem.num_batches != 1:
        pytest.skip("BackPACK works on one batch")
    X, y = next(iter(problem.batches()))
    model.zero_grad()
    with backpack.backpack(extension), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss_fn(model(X), y).backward()
    return torch.cat([getattr(p, attribute).flatten() for p in params])


def test_diagonal_ggn_matches_backpack_diag_ggn_exact(mlp_problem):
    from backpack.extensions import DiagGGNExact

    expected = _backpack_quantity(mlp_problem, DiagGGNExact(), "diag_ggn_exact")
    assert_close_rel(torch.diagonal(cl.GGN(mlp_problem).to_dense()), expected, 1e-10, "diag GGN")


def test_diagonal_hessian_matches_backpack_diag_hessian(mlp_problem):
    from backpack.extensions import DiagHessian

    if any(isinstance(m, nn.ELU) for m in mlp_problem.model.modules()):
        pytest.skip("BackPACK's DiagHessian has no ELU rule")
    expected = _backpack_quantity(mlp_problem, DiagHessian(), "diag_h")
    assert_close_rel(torch.diagonal(cl.Hessian(mlp_problem).to_dense()), expected, 1e-10, "diag Hessian")


CURVLINOPS = {"hessian": "HessianLinearOperator", "ggn": "GGNLinearOperator", "ef": "EFLinearOperator"}


def _terms_per_example(case):
    classes_first = case.loss in ("ce", "ce_soft")
    return torch.Size(case.output_shape[1:] if classes_first else case.output_shape[:-1]).numel()


@pytest.mark.parametrize("kind", list(CURVLINOPS))
def test_dense_matches_curvlinops(case, kind):
    curvlinops = pytest.importorskip("curvlinops")
    if kind == "ef" and _terms_per_example(case) > 1:
        pytest.skip("EF conventions differ with several loss terms per example: see the test below")
    if kind == "ef" and case.output_shape == ():
        pytest.skip("curvlinops 3.0.1's EF fails on (N,) outputs (its einops pattern needs a class dim)")
    if kind == "ef" and case.loss == "ce_soft":
        pytest.skip(
            "curvlinops 3.0.1's EF reshapes cross-entropy targets as class indices (no probabilities)"
        )
    problem = case.build(torch.float64)
    theirs = getattr(curvlinops, CURVLINOPS[kind])(
        problem.model, problem.loss_fn, problem.params, problem.data, check_deterministic=False
    )
    expected = theirs @ torch.eye(problem.num_params, dtype=torch.float64)
    ours = {"hessian": cl.Hessian, "ggn": cl.GGN, "ef": cl.EmpiricalFisher}[kind](problem)
    assert_close_rel(ours.to_dense(), expected, 1e-10, f"{kind} vs curvlinops")


def test_empirical_fisher_per_example_and_curvlinops_per_position():
    """EF with a loss term per position: per example here, per position in curvlinops.

    curvlab sums outer products of per-example gradients (an example is a row of the batch, all
    its loss terms together); curvlinops 3.0.1 takes each position's gradient on its own. For a
    model applied position-wise the two coincide once every position is an example.
    """
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    loss = nn.MSELoss(reduction="sum")
    sequences = cl.Problem(model, loss, (X, y))
    positions = cl.Problem(model, loss, (X.reshape(15, 3), y.reshape(15, 2)))
    theirs = curvlinops.EFLinearOperator(
        model, loss, sequences.params, sequences.data, check_deterministic=False
    )
    theirs = theirs @ torch.eye(sequences.num_params, dtype=torch.float64)
    assert_close_rel(cl.EmpiricalFisher(positions).to_dense(), theirs, 1e-10, "EF per position")
    ours = cl.EmpiricalFisher(sequences).to_dense()
    assert_close_rel(ours, reference.empirical_fisher(sequences), 1e-10, "EF per example")
    assert (ours - theirs).norm() > 0.1 * theirs.norm()  # the two conventions really differ here
