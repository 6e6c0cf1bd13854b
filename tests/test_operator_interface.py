"""The one operator interface: general defaults, structured overrides, sums and multiples."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.operators.combined import ScaledOperator, SumOperator
from tests.cases import CASES
from tests.helpers import assert_close_rel

F64 = torch.float64


def _conv_problem():
    return next(c for c in CASES if c.name == "conv2d_mse_mean_2batches").build(F64)


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(9, 3, dtype=F64), torch.randint(0, 2, (9,))
    return cl.Problem(model, nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])])


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
def test_matrix_free_defaults_are_exact(kind):
    """diag, trace, Frobenius norm, eigenvalues and log det of a matrix-free operator, from products."""
    problem = _conv_problem()
    operator = {"hessian": cl.Hessian, "ggn": cl.GGN, "ef": cl.EmpiricalFisher}[kind](problem)
    dense = {"hessian": reference.hessian_matrix, "ggn": reference.ggn, "ef": reference.empirical_fisher}[
        kind
    ](problem)
    assert_close_rel(operator.diag(), dense.diagonal(), 1e-10, "diag")
    assert operator.trace().item() == pytest.approx(dense.trace().item(), rel=1e-10)
    assert operator.frobenius_norm().item() == pytest.approx(dense.norm().item(), rel=1e-10)
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert_close_rel(operator.eigvalsh(), eigenvalues, 1e-10, "eigvalsh")
    damping = 1.0 - min(eigenvalues.min().item(), 0.0)
    expected = torch.log(eigenvalues + damping).sum().item()
    assert operator.logdet(damping).item() == pytest.approx(expected, rel=1e-10)
    if eigenvalues.min() < 0:
        with pytest.raises(ValueError, match="log det.*undefined"):
            operator.logdet(0.0)
    assert not operator.has_inverse
    with pytest.raises(cl.UnsupportedError, match="matrix-free and has no explicit inverse"):
        operator.inverse(1.0)


def _structured_objects(problem):
    G = cl.GGN(problem)
    K = cl.KFAC(problem)
    return {
        "KFAC": K,
        "EKFAC": cl.EKFAC(problem),
        "KFAC (separate bias)": cl.KFAC(problem, separate_weight_and_bias=True),
        "ACP": cl.ACP(problem),
        "block diagonal": cl.BlockDiagonal(G),
        "diagonal": cl.Diagonal(G),
        "dense": cl.DenseOperator(G.to_dense(), G.param_shapes, G.param_names),
        "Kronecker block": K.blocks()[0],
        "eigenbasis block": K.blocks()[0].eigenbasis_form(),
    }


@pytest.mark.parametrize("name", list(_structured_objects(_mlp_problem())))
def test_structured_objects_read_their_matrix_functions_off_the_structure(name):
    C = _structured_objects(_mlp_problem())[name]
    dense = C.to_dense()
    assert C.structured_eigvalsh and C.has_inverse
    assert_close_rel(C.diag(), dense.diagonal(), 1e-12, "diag")
    assert C.trace().item() == pytest.approx(dense.trace().item(), rel=1e-12)
    assert C.frobenius_norm().item() == pytest.approx(dense.norm().item(), rel=1e-12)
    assert_close_rel(C.eigvalsh(), torch.linalg.eigvalsh(dense), 1e-9, "eigvalsh")
    expected = torch.logdet(dense + 0.1 * torch.eye(dense.shape[0], dtype=F64)).item()
    assert C.logdet(0.1).item() == pytest.approx(expected, rel=1e-10)
    v = torch.randn(C.shape[0], dtype=F64)
    assert_close_rel(C.solve(v, 0.1), torch.linalg.solve(dense + 0.1 * torch.eye(len(v), dtype=F64), v), 1e-9)


def test_sums_and_multiples_keep_the_structure_where_there_is_one():
    problem = _mlp_problem()
    objects = _structured_objects(problem)
    K, dense, diagonal = objects["KFAC"], objects["dense"], objects["diagonal"]
    scaled = 2.5 * K
    assert type(scaled) is cl.BlockDiagonalOperator
    assert all(isinstance(b, cl.KroneckerBlock) for b in scaled.blocks())
    assert_close_rel(scaled.to_dense(), 2.5 * K.to_dense(), 1e-14, "2.5 K")
    assert_close_rel((K / 4).to_dense(), K.to_dense() / 4, 1e-14, "K / 4")
    twice = K + objects["KFAC"]
    assert type(twice) is cl.BlockDiagonalOperator
    assert_close_rel(twice.to_dense(), 2 * K.to_dense(), 1e-14, "K + K")
    assert type(dense + dense) is cl.DenseOperator and type(diagonal + diagonal) is cl.Diagonal
    assert type(-dense) is cl.DenseOperator
    assert_close_rel((dense - diagonal).to_dense(), dense.to_dense() - diagonal.to_dense(), 1e-14, "D - d")
    ekfac = objects["EKFAC"]
    assert_close_rel((3 * ekfac).to_dense(), 3 * ekfac.to_dense(), 1e-13, "3 EKFAC")


def test_general_sums_and_multiples_of_matrix_free_operators():
    problem = _conv_problem()
    H, G = cl.Hessian(problem), cl.GGN(problem)
    H_dense, G_dense = reference.hessian_matrix(problem), reference.ggn(problem)
    total = H + 0.5 * G
    assert isinstance(total, SumOperator)
    v = torch.randn(H.shape[0], 3, dtype=F64)
    assert_close_rel(total @ v, (H_dense + 0.5 * G_dense) @ v, 1e-10, "H + G/2")
    assert total.trace().item() == pytest.approx((H_dense + 0.5 * G_dense).trace().item(), rel=1e-10)
    block = total.blocks(by="layer")[0]
    size = block.shape[0]
    assert_close_rel(block.to_dense(), (H_dense + 0.5 * G_dense)[:size, :size], 1e-10, "a block of the sum")
    average = sum([G, G, G]) / 3
    assert_close_rel(average.to_dense(), G_dense, 1e-10, "sum() of operators")
    assert isinstance(2 * G, ScaledOperator)
    spectrum = cl.top_eigen(2 * G, 1, tol=1e-8).values[0].item()
    assert spectrum == pytest.approx(2 * torch.linalg.eigvalsh(G_dense)[-1].item(), rel=1e-6)
    b = torch.randn(H.shape[0], dtype=F64)
    solved = (2 * G).solve(b, damping=0.3, tol=1e-12)  # CG on the scaled operator
    expected = torch.linalg.solve(2 * G_dense + 0.3 * torch.eye(len(b), dtype=F64), b)
    assert_close_rel(solved, expected, 1e-8, "CG on 2 G")


def test_scaled_structured_inverse_and_bad_combinations():
    problem = _mlp_problem()
    K = cl.KFAC(problem)
    scaled = ScaledOperator(2.0, K)  # the general class, on a structured operator
    assert scaled.has_inverse
    dense = 2 * K.to_dense()
    expected = torch.linalg.inv(dense + 0.2 * torch.eye(dense.shape[0], dtype=F64))
    assert_close_rel(scaled.inverse(0.2).to_dense(), expected, 1e-10, "(2K + λ)⁻¹")
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.zeros(5).long()
    with pytest.raises(cl.DataError, match="cannot add a torch.float64 operator on cpu and a torch.float32"):
        K + cl.KFAC(cl.Problem(other, nn.CrossEntropyLoss(), (X, y)))
    wider = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with pytest.raises(cl.DataError, match="over different parameters"):
        K + cl.GGN(cl.Problem(wider, nn.CrossEntropyLoss(), (X.double(), y)))
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        K * float("nan")
    with pytest.raises(ValueError, match="cannot divide an operator by 0"):
        K / 0


INTERFACE = ("inverse", "solve", "trace", "eigvalsh", "logdet", "frobenius_norm", "diag", "blocks")


def test_no_probing_for_the_interface_outside_the_base_class():
    """The base class declares the interface: nothing asks an object whether it has it."""
    root = Path(cl.__file__).parent
    pattern = re.compile(r"hasattr\([^)]*[\"'](" + "|".join(INTERFACE) + r")[\"']")
    offenders = [str(path) for path in root.rglob("*.py") if pattern.search(path.read_text())]
    assert not offenders
