"""EKFAC against the exact block in its eigenbasis and against curvlinops; ACP against the thesis."""

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel
from tests.test_kfac import _as_conv2d_problem, _problem

F64 = torch.float64


def _kron_order(d_out, d_in, bias):
    """Flat parameter index of each entry (i, j) of M = [W b], row-major over (i, j)."""
    order = []
    for i in range(d_out):
        order += [i * d_in + j for j in range(d_in)]
        if bias:
            order.append(d_out * d_in + i)
    return torch.tensor(order)


def _exact_blocks(problem, operator, fisher_type):
    dense = {"type-2": reference.ggn, "empirical": reference.empirical_fisher}[fisher_type](problem)
    offsets = operator.block_offsets()
    for indices, block in zip(operator.block_indices, operator.blocks()):
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
        yield block, dense[index][:, index]


CASES = [("mlp", "ce"), ("conv2d", "mse"), ("mlp", "bce"), ("conv1d", "ce")]


@pytest.mark.parametrize("model_name, loss_name", CASES)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("separate", [False, True], ids=["folded_bias", "separate_bias"])
def test_ekfac_diagonal_is_exact_in_kfac_eigenbasis(model_name, loss_name, approx, fisher_type, separate):
    problem = _problem(model_name, loss_name)
    options = {"fisher_type": fisher_type, "kfac_approx": approx, "separate_weight_and_bias": separate}
    ekfac = cl.EKFAC(problem, **options)
    kfac = cl.KFAC(problem, **options)
    for (block, exact), kfac_block in zip(_exact_blocks(problem, ekfac, fisher_type), kfac.blocks()):
        d_out, d_A = block.D.shape
        weight_numel = block.param_shapes[0].numel()
        order = _kron_order(d_out, weight_numel // d_out, len(block.param_shapes) == 2)
        in_kron_order = exact[order][:, order]
        basis = torch.kron(block.Q_G, block.Q_A)
        expected = torch.diagonal(basis.T @ in_kron_order @ basis).reshape(d_out, d_A)
        assert_close_rel(block.D, expected, 1e-10, "EKFAC diagonal")
        ekfac_error = (block.to_dense() - exact).norm()
        kfac_error = (kfac_block.to_dense() - exact).norm()
        roundoff = 1e-12 * exact.norm()  # both can be exact (e.g. a last layer under MSE)
        assert ekfac_error <= kfac_error + roundoff, f"EKFAC {ekfac_error:.3e} > KFAC {kfac_error:.3e}"


def _curvlinops_ekfac(problem, **options):
    curvlinops = pytest.importorskip("curvlinops")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = curvlinops.EKFACLinearOperator(
            problem.model, problem.loss_fn, problem.params, problem.data, check_deterministic=False, **options
        )
        return theirs @ torch.eye(problem.num_params, dtype=F64)


@pytest.mark.parametrize("model_name, loss_name", CASES)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("separate", [False, True], ids=["folded_bias", "separate_bias"])
def test_ekfac_expand_matches_curvlinops(model_name, loss_name, fisher_type, separate):
    problem = _problem(model_name, loss_name)
    options = {"fisher_type": fisher_type, "kfac_approx": "expand", "separate_weight_and_bias": separate}
    peer = _as_conv2d_problem(problem) if model_name == "conv1d" else problem  # curvlinops: no Conv1d
    expected = _curvlinops_ekfac(peer, **options)
    assert_close_rel(cl.EKFAC(problem, **options).to_dense(), expected, 1e-10, "EKFAC vs curvlinops")


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_reduce_matches_curvlinops_where_the_eigenbasis_is_unique(fisher_type):
    """Reduce, with every factor eigenvalue simple: the two libraries must agree.

    With reduce, a factor can have repeated eigenvalues (rank-deficient mean patches, low-rank
    output gradients); inside such an eigenspace any basis is KFAC's, and EKFAC's refit depends on
    which one eigh returns, so libraries may differ there.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5)).double()
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(40, 2, 4, 4, generator=generator, dtype=F64),
            torch.randint(0, 5, (40,), generator=generator),
        )
    ]
    problem = cl.Problem(model, nn.CrossEntropyLoss(), data)
    options = {"fisher_type": fisher_type, "kfac_approx": "reduce", "separate_weight_and_bias": False}
    ours = cl.EKFAC(problem, **options)
    for block in cl.KFAC(problem, **options).blocks():
        for factor in (block.A, block.G):
            values = torch.linalg.eigvalsh(factor)
            assert torch.diff(values).min() > 1e-6 * values.max(), "precondition: simple eigenvalues"
    assert_close_rel(
        ours.to_dense(), _curvlinops_ekfac(problem, **options), 1e-9, "EKFAC reduce vs curvlinops"
    )


def test_ekfac_solve_and_eigenvalues():
    ekfac = cl.EKFAC(_problem("conv2d", "ce"))
    dense = ekfac.to_dense()
    eye = torch.eye(len(dense), dtype=F64)
    assert_close_rel(cl.eigvalsh(ekfac), torch.linalg.eigvalsh(dense), 1e-10, "eigenvalues")
    b = torch.randn(len(dense), dtype=F64)
    assert_close_rel(ekfac.solve(b, damping=0.2), torch.linalg.solve(dense + 0.2 * eye, b), 1e-10, "solve")


def _one_layer(loss=None):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    X = torch.randn(9, 4, dtype=F64) + 0.5
    y = torch.randint(0, 3, (9,))
    return cl.Problem(layer, loss or nn.CrossEntropyLoss(), (X, y)), layer, X, y


def test_acp_solve_is_thesis_update():
    """(αI ⊗ A)⁻¹ ∇R equals eq. 6.3.3–6.3.4 with the centered covariance."""
    problem, layer, X, y = _one_layer()
    alpha = 0.7
    acp = cl.ACP(problem, alpha=alpha)
    output = layer(X)
    per_example = torch.autograd.grad(nn.functional.cross_entropy(output, y, reduction="sum"), output)[
        0
    ]  # ∇_{a_j} ℓ
    n = X.shape[0]
    h_bar = X.mean(0)
    centered = X - h_bar
    C = centered.T @ centered / n
    dW = (1 / alpha) * (per_example.T @ centered / n) @ torch.linalg.inv(C)
    db = (1 / alpha) * per_example.mean(0) - dW @ h_bar
    gradient = [
        g.detach()
        for g in torch.autograd.grad(nn.functional.cross_entropy(layer(X), y), [layer.weight, layer.bias])
    ]
    update = acp.solve(gradient, damping=0.0)
    assert_close_rel(update[0], dW.detach(), 1e-10, "ΔW (6.3.3)")
    assert_close_rel(update[1], db.detach(), 1e-10, "Δb (6.3.4)")


def test_acp_heuristic_alpha():
    problem, layer, X, y = _one_layer()
    output = layer(X)
    per_example = torch.autograd.grad(nn.functional.cross_entropy(output, y, reduction="sum"), output)[0]
    acp = cl.ACP(problem)
    assert acp.alphas[""] == pytest.approx(per_example.pow(2).max().item(), rel=1e-12)
    block = acp.blocks()[0]
    assert_close_rel(block.G, acp.alphas[""] * torch.eye(3, dtype=F64), 1e-15, "G = αI")


@pytest.mark.parametrize("alpha", [0, -1.0, "max"])
def test_acp_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        cl.ACP(_one_layer()[0], alpha=alpha)
