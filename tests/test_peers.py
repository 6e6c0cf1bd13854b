"""Cross-checks against BackPACK and curvlinops on the quantities they share."""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
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


@pytest.mark.parametrize("kind", list(CURVLINOPS))
def test_dense_matches_curvlinops(case, kind):
    curvlinops = pytest.importorskip("curvlinops")
    problem = case.build(torch.float64)
    theirs = getattr(curvlinops, CURVLINOPS[kind])(
        problem.model, problem.loss_fn, problem.params, problem.data, check_deterministic=False
    )
    expected = theirs @ torch.eye(problem.num_params, dtype=torch.float64)
    ours = {"hessian": cl.Hessian, "ggn": cl.GGN, "ef": cl.EmpiricalFisher}[kind](problem)
    assert_close_rel(ours.to_dense(), expected, 1e-10, f"{kind} vs curvlinops")
