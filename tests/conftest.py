"""Fixtures that expand the case table over operators, dtypes and devices."""

import pytest
import torch

import curvlab as cl
from curvlab import reference
from tests.cases import CASES, LINEAR_CASES

OPERATORS = {
    "hessian": (cl.Hessian, reference.hessian_matrix),
    "ggn": (cl.GGN, reference.ggn),
    "fisher": (cl.Fisher, reference.fisher),
    "ef": (cl.EmpiricalFisher, reference.empirical_fisher),
}


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


@pytest.fixture(params=LINEAR_CASES, ids=lambda c: c.name)
def linear_case(request):
    return request.param


SPECTRA_CASES = [
    c for c in CASES if c.name in ("mlp_tanh_mse_mean", "mlp_relu_ce_mean_3batches", "conv2d_ce_mean")
]


@pytest.fixture(params=SPECTRA_CASES, ids=lambda c: c.name)
def spectra_problem(request):
    """Problems the spectra are tested on: two MLPs (one over three batches) and a CNN."""
    return request.param.build(torch.float64)


@pytest.fixture(params=list(OPERATORS), ids=str)
def operator_name(request):
    return request.param


@pytest.fixture
def problem64(case):
    return case.build(torch.float64)


@pytest.fixture
def operator_and_reference(problem64, operator_name):
    operator_class, reference_fn = OPERATORS[operator_name]
    return operator_class(problem64), reference_fn(problem64)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
