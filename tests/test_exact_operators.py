"""Each exact operator against the independent dense float64 reference, in every format."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.operators.base import CurvatureOperator
from curvlab.operators.dense import DenseOperator
from tests.helpers import assert_close_rel

RTOL = 1e-10


def _random(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_shape_dtype_device(operator_and_reference, problem64):
    operator, reference = operator_and_reference
    n = problem64.num_params
    assert operator.shape == (n, n) == tuple(reference.shape)
    assert operator.dtype == torch.float64
    assert operator.device == torch.device("cpu")


def test_to_dense(operator_and_reference):
    operator, reference = operator_and_reference
    assert_close_rel(operator.to_dense(), reference, RTOL, "to_dense")


def test_matvec(operator_and_reference):
    operator, reference = operator_and_reference
    v = _random(operator.shape[0])
    result = operator @ v
    assert result.shape == v.shape
    assert_close_rel(result, reference @ v, RTOL, "matvec")


def test_matmat(operator_and_reference):
    operator, reference = operator_and_reference
    V = _random((operator.shape[0], 3))
    assert_close_rel(operator @ V, reference @ V, RTOL, "matmat")


def test_matmat_in_chunks(operator_and_reference):
    operator, reference = operator_and_reference
    operator.max_columns = 2
    V = _random((operator.shape[0], 5), seed=3)
    assert_close_rel(operator @ V, reference @ V, RTOL, "chunked matmat")


def test_columns_per_chunk_shrinks_for_long_columns():
    """max_columns for short columns; within block_budget (16 MiB on the CPU) for long ones."""
    short = DenseOperator(torch.eye(10, dtype=torch.float64), [(10,)])
    assert short.columns_per_chunk() == short.max_columns
    long = CurvatureOperator([(3_000_000,)], torch.float32, "cpu")
    assert long.columns_per_chunk() == 1  # 12 MB per column
    medium = CurvatureOperator([(500_000,)], torch.float32, "cpu")
    assert medium.columns_per_chunk() == 2**24 // (500_000 * 4)


def test_list_format(operator_and_reference, problem64):
    operator, reference = operator_and_reference
    vs = [_random(p.shape, seed=i) for i, p in enumerate(problem64.params)]
    result = operator @ vs
    assert isinstance(result, list)
    assert [r.shape for r in result] == [p.shape for p in problem64.params]
    flat = torch.cat([r.flatten() for r in result])
    expected = reference @ torch.cat([v.flatten() for v in vs])
    assert_close_rel(flat, expected, RTOL, "list format")


def test_scipy_adapter(operator_and_reference):
    operator, reference = operator_and_reference
    linear_operator = operator.to_scipy()
    assert linear_operator.shape == operator.shape
    v = np.random.default_rng(0).standard_normal(operator.shape[0])
    V = np.random.default_rng(1).standard_normal((operator.shape[0], 2))
    assert isinstance(linear_operator @ v, np.ndarray)
    assert_close_rel(
        torch.from_numpy(linear_operator @ v), reference @ torch.from_numpy(v), RTOL, "scipy matvec"
    )
    assert_close_rel(
        torch.from_numpy(linear_operator @ V), reference @ torch.from_numpy(V), RTOL, "scipy matmat"
    )


@pytest.mark.parametrize("by", ["parameter", "layer"])
def test_blocks(operator_and_reference, by):
    operator, reference = operator_and_reference
    offsets = operator.block_offsets()
    groups = operator._layer_groups() if by == "layer" else [[i] for i in range(len(offsets) - 1)]
    blocks = operator.blocks(by=by)
    assert len(blocks) == len(groups)
    for block, group in zip(blocks, groups):
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in group])
        assert type(block) is type(operator)
        assert_close_rel(block.to_dense(), reference[index][:, index], RTOL, f"block {group}")


def test_solve_with_damping(operator_and_reference):
    operator, reference = operator_and_reference
    eigenvalues = torch.linalg.eigvalsh(reference)
    damping = max(0.1, -eigenvalues[0].item() + 0.1)  # makes the Hessian PD too
    b = _random(operator.shape[0], seed=7)
    expected = torch.linalg.solve(reference + damping * torch.eye(len(b), dtype=b.dtype), b)
    solution = operator.solve(b, damping=damping, tol=1e-13)
    assert_close_rel(solution, expected, 1e-9, "CG solve")
    B = torch.stack([b, 2 * b + 1], dim=1)
    assert_close_rel(
        operator.solve(B, damping=damping, tol=1e-13)[:, 1],
        2 * expected
        + (torch.linalg.solve(reference + damping * torch.eye(len(b), dtype=b.dtype), torch.ones_like(b))),
        1e-9,
        "batched CG solve",
    )


def test_float32_agrees_with_float64_reference(case, operator_name):
    from tests.conftest import OPERATORS

    operator_class, reference_fn = OPERATORS[operator_name]
    problem32 = case.build(torch.float32)
    dense32 = operator_class(problem32).to_dense()
    assert dense32.dtype == torch.float32
    assert_close_rel(dense32.double(), reference_fn(case.build(torch.float64)), 1e-5, "float32")


def test_a_submodule_used_twice_keeps_its_parameters_and_gets_the_right_hessian():
    # torch.func.functional_call can replace a shared submodule's parameter objects
    # (pytorch/pytorch#164759); the model must still hold the user's tensors.
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared).double()
    X, y = _random((5, 3), seed=1), _random((5, 3), seed=2)
    before = [shared.weight, shared.bias]
    problem = cl.Problem(model, nn.MSELoss(), (X, y))
    H = cl.Hessian(problem).to_dense()
    problem.gradient()
    assert shared.weight is before[0] and shared.bias is before[1]
    assert [p for p in model.parameters()] == before

    def loss(weight, bias):  # written out by hand: the same layer twice
        out = torch.tanh(X @ weight.T + bias) @ weight.T + bias
        return ((out - y) ** 2).mean()

    blocks = torch.func.hessian(loss, argnums=(0, 1))(*[p.detach() for p in before])
    dense = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(before[i].numel(), before[j].numel()) for j in range(2)], 1)
            for i in range(2)
        ]
    )
    assert_close_rel(H, dense, RTOL, "shared-module Hessian")


@pytest.mark.parametrize(
    "kind", [cl.GGN, cl.Hessian, cl.Fisher, cl.EmpiricalFisher], ids=lambda k: k.__name__
)
def test_products_over_some_parameters_carry_no_graph_to_the_others(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    problem = cl.Problem(model, nn.MSELoss(), (_random((6, 3), seed=1), _random((6, 2), seed=2)))
    block = problem.restrict(list(model[2].parameters()))
    v = _random((block.num_params,), seed=3)
    with torch.enable_grad():  # as inside an optimizer step
        product = kind(block) @ v
    assert product.grad_fn is None and not product.requires_grad


WORKFLOW = """
import torch
from torch import nn
import curvlab as cl
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
problem = cl.Problem(model, nn.CrossEntropyLoss(), (torch.randn(8, 4), torch.randint(0, 3, (8,))))
operators = [cl.GGN(problem), cl.Fisher(problem, mc_samples=2), cl.EmpiricalFisher(problem)]
operators.append(cl.Hessian(problem))
for C in operators:
    C.to_dense()
    cl.top_eigen(C, 2)
"""


def test_products_warn_nothing_in_a_fresh_process():
    """The first forward-mode product in a process raises torch's FutureWarning; users never see it."""
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-c", WORKFLOW], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
