"""Diagonal, BlockDiagonal and compare against dense linear algebra."""

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.compare import frobenius_estimate, optimal_kronecker_rel_frobenius, relative_frobenius_estimate
from tests.helpers import assert_close_rel
from tests.test_kfac import LOSSES, MODELS, _problem

F64 = torch.float64
OPERATORS = {
    "ggn": (cl.GGN, reference.ggn),
    "fisher": (cl.Fisher, reference.fisher),
    "ef": (cl.EmpiricalFisher, reference.empirical_fisher),
    "hessian": (cl.Hessian, reference.hessian_matrix),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_exact_diagonal(model_name, loss_name, kind):
    problem = _problem(model_name, loss_name)
    operator_class, reference_fn = OPERATORS[kind]
    diagonal = cl.Diagonal(operator_class(problem))
    assert diagonal.method_used == ("products" if kind == "hessian" else "layerwise")
    assert_close_rel(diagonal.diagonal, torch.diagonal(reference_fn(problem)), 1e-10, "diagonal")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["ggn", "mc fisher", "ef"])
def test_diagonal_of_parameters_without_layerwise_statistics_is_exact_per_example(mode, kind):
    """BatchNorm and LayerNorm have no Kronecker rule: the diagonal takes one pass per (example, vector).

    In train mode BatchNorm couples the examples; the per-example Jacobians include it.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(144, 5),
        nn.LayerNorm(5),
    ).double()
    getattr(model, mode)()
    generator = torch.Generator().manual_seed(1)
    X, y = (
        torch.randn(6, 3, 6, 6, dtype=F64, generator=generator),
        torch.randint(0, 5, (6,), generator=generator),
    )
    problem = cl.Problem(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    operator = {
        "ggn": cl.GGN,
        "mc fisher": lambda p: cl.Fisher(p, mc_samples=2, seed=3),
        "ef": cl.EmpiricalFisher,
    }[kind](problem)
    diagonal = cl.Diagonal(operator)
    assert diagonal.method_used == "per-example"
    expected = {"ggn": reference.ggn, "ef": reference.empirical_fisher}.get(
        kind, lambda p: operator.to_dense()
    )
    assert_close_rel(diagonal.diagonal, torch.diagonal(expected(problem)), 1e-10, f"{kind} {mode}")
    kfac = cl.KFAC(problem, other_structure="diagonal")  # its BatchNorm/LayerNorm block: this diagonal
    index = torch.cat(
        [torch.arange(o, o + problem.params[i].numel()) for i, o in _offsets(problem, kfac.unsupported)]
    )
    assert_close_rel(
        torch.diagonal(kfac.to_dense())[index], torch.diagonal(reference.ggn(problem))[index], 1e-10
    )


def _offsets(problem, indices):
    starts = [0]
    for p in problem.params:
        starts.append(starts[-1] + p.numel())
    return [(i, starts[i]) for i in indices]


def test_mc_fisher_diagonal_uses_the_same_samples():
    problem = _problem("conv2d", "ce")
    fisher = cl.Fisher(problem, mc_samples=3, seed=4)
    assert_close_rel(cl.Diagonal(fisher).diagonal, torch.diagonal(fisher.to_dense()), 1e-10, "MC diagonal")


def test_diagonal_ggn_matches_backpack():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    problem = _problem("mlp", "ce", batch_sizes=(6,))
    ours = cl.Diagonal(cl.GGN(problem)).diagonal
    model = backpack.extend(copy.deepcopy(problem.model))  # BackPACK leaves hooks on what it extends
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())
    X, y = problem.data[0]
    with backpack.backpack(DiagGGNExact()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss_fn(model(X), y).backward()
    theirs = torch.cat([p.diag_ggn_exact.flatten() for p in model.parameters()])
    assert_close_rel(ours, theirs, 1e-10, "vs BackPACK DiagGGNExact")


def test_hutchinson_diagonal_is_unbiased_with_honest_errors():
    problem = _problem("mlp", "mse")
    ggn = cl.GGN(problem)
    exact = torch.diagonal(reference.ggn(problem))
    estimate = cl.Diagonal(ggn, method="hutchinson", num_probes=400, seed=0)
    z = (estimate.diagonal - exact) / estimate.standard_error.clamp_min(1e-300)
    assert z.abs().max() < 5, f"largest standardized error {z.abs().max():.2f}"
    more = cl.Diagonal(ggn, method="hutchinson", num_probes=1600, seed=1)
    assert more.standard_error.mean() < 0.6 * estimate.standard_error.mean()


def test_diagonal_inverse_and_solve():
    diagonal = cl.Diagonal(cl.GGN(_problem("mlp", "bce")))
    b = torch.randn(diagonal.shape[0], dtype=F64)
    assert_close_rel(diagonal.solve(b, damping=0.1), b / (diagonal.diagonal + 0.1), 1e-13, "solve")
    assert_close_rel(cl.eigvalsh(diagonal), diagonal.diagonal.sort().values, 0, "eigenvalues")


@pytest.mark.parametrize("by", ["layer", "parameter"])
def test_block_diagonal_of_exact_operators(by):
    problem = _problem("conv2d", "mse")
    hessian = cl.Hessian(problem)
    block_diagonal = cl.BlockDiagonal(hessian, by=by)
    dense = reference.hessian_matrix(problem)
    offsets = hessian.block_offsets()
    expected = torch.zeros_like(dense)
    for indices in block_diagonal.block_indices:
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
        expected[index.unsqueeze(1), index] = dense[index][:, index]
    assert_close_rel(block_diagonal.to_dense(), expected, 1e-10, "block diagonal")
    shift = -torch.linalg.eigvalsh(expected)[0].item() + 0.5
    inverse = block_diagonal.inverse(shift)
    eye = torch.eye(len(dense), dtype=F64)
    assert_close_rel(inverse.to_dense(), torch.linalg.inv(expected + shift * eye), 1e-9, "inverse per block")


def test_compare_metrics_by_hand():
    problem = _problem("mlp", "ce")
    ggn, ef = cl.GGN(problem), cl.EmpiricalFisher(problem)
    report = cl.compare(ef, ggn, k=3)
    A, E = ef.to_dense(), ggn.to_dense()
    assert report.overall["rel_frobenius"] == pytest.approx(((A - E).norm() / E.norm()).item(), rel=1e-10)
    spectral = torch.linalg.eigvalsh(A - E).abs().max() / torch.linalg.eigvalsh(E).abs().max()
    assert report.overall["rel_spectral"] == pytest.approx(spectral.item(), rel=1e-10)
    eig_A, eig_E = torch.linalg.eigvalsh(A).flip(0)[:3], torch.linalg.eigvalsh(E).flip(0)[:3]
    assert report.overall["topk_eigenvalue_rel_error"] == pytest.approx(
        ((eig_A - eig_E).abs() / eig_E).tolist()
    )
    U_A, U_E = torch.linalg.eigh(A)[1].flip(1)[:, :3], torch.linalg.eigh(E)[1].flip(1)[:, :3]
    overlap = (U_A.T @ U_E).pow(2).sum() / 3
    assert report.overall["topk_subspace_overlap"] == pytest.approx(overlap.item(), rel=1e-10)
    assert len(report.blocks) == 2
    assert set(report.to_dict()) == {"approx", "exact", "overall", "blocks"}
    assert "rel_frob" in str(report)


def _rotated(values: list[float], seed: int) -> torch.Tensor:
    Q = torch.linalg.qr(
        torch.randn(len(values), len(values), dtype=F64, generator=torch.Generator().manual_seed(seed))
    )[0]
    return Q @ torch.diag(torch.tensor(values, dtype=F64)) @ Q.T


def test_subspace_overlap_of_tied_eigenvalues_does_not_depend_on_the_basis():
    """A tie at λ_k leaves the top-k subspace open: the overlap is that of the average projector."""
    shapes = [torch.Size([6])]
    exact = cl.DenseOperator(torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=F64)), shapes)
    identity = cl.DenseOperator(torch.eye(6, dtype=F64) * 1.3, shapes)
    # every 2-dimensional subspace is a top-2 subspace of 1.3·I: on average it holds 2/6 of each axis
    assert cl.compare(identity, exact, k=2).overall["topk_subspace_overlap"] == pytest.approx(
        1 / 3, rel=1e-12
    )
    # λ₁ = 9 sure, λ₂ = λ₃ = 7 tied: P̄ = e₁e₁ᵀ + ½ (the 7-cluster), whichever basis of it eigh returns
    tied = torch.diag(torch.tensor([9.0, 7, 7, 1, 1, 1], dtype=F64))
    overlaps = set()
    for seed in range(4):
        Q = torch.eye(6, dtype=F64)
        Q[1:3, 1:3] = torch.linalg.qr(
            torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
        )[0]
        approx = cl.DenseOperator(Q @ tied @ Q.T + 1e-17 * _rotated([1.0] * 6, seed), shapes)
        overlaps.add(round(cl.compare(approx, exact, k=2).overall["topk_subspace_overlap"], 12))
    assert overlaps == {0.75}  # (1·1 + ½·1) / 2 against the exact top-2 axes e₁, e₂


def test_compare_single_example_kfac_is_exact_per_block():
    problem = _problem("mlp", "mse", batch_sizes=(1,))
    report = cl.compare(cl.KFAC(problem), cl.GGN(problem))
    for row in report.blocks:
        assert row["rel_frobenius"] < 1e-12
        assert row["topk_subspace_overlap"] > 1 - 1e-8 or row["size"] > 10


@pytest.mark.parametrize("model_name", ["mlp", "conv2d"])
def test_optimal_kronecker_bound_is_below_kfac(model_name):
    problem = _problem(model_name, "ce")
    report = cl.compare(cl.KFAC(problem), cl.GGN(problem))
    for row in report.blocks:
        assert row["optimal_kronecker_rel_frobenius"] <= row["rel_frobenius"] + 1e-12


def test_optimal_kronecker_bound_is_zero_for_a_kronecker_product():
    X, Y = torch.randn(3, 3, dtype=F64), torch.randn(4, 4, dtype=F64)
    assert optimal_kronecker_rel_frobenius(torch.kron(X @ X.T, Y @ Y.T), 3, 4) < 1e-14
    kfac = cl.KFAC(_problem("mlp", "bce"))
    report = cl.compare(kfac, cl.BlockDiagonal(kfac))  # exact = KFAC's own Kronecker blocks, held densely
    for row in report.blocks:
        assert row["optimal_kronecker_rel_frobenius"] < 1e-7
        assert row["rel_frobenius"] < 1e-12


def test_matrix_free_frobenius_estimate():
    problem = _problem("mlp", "ce")
    ggn, ef = cl.GGN(problem), cl.EmpiricalFisher(problem)
    exact = (ef.to_dense() - ggn.to_dense()).norm().item()
    value, error = frobenius_estimate(ef, ggn, num_probes=400, seed=0)
    assert abs(value - exact) < 4 * error + 1e-12, f"{value} ± {error} vs {exact}"


def test_matrix_free_relative_frobenius_estimate():
    problem = _problem("mlp", "ce")
    ggn, ef = cl.GGN(problem), cl.EmpiricalFisher(problem)
    exact = ((ef.to_dense() - ggn.to_dense()).norm() / ggn.to_dense().norm()).item()
    value, error = relative_frobenius_estimate(ef, ggn, num_probes=400, seed=0)
    assert 0 < error < 0.1 * exact
    assert abs(value - exact) < 4 * error, f"{value} ± {error} vs {exact}"


def test_compare_of_matrices_that_do_not_fit_estimates_the_relative_error(monkeypatch, tmp_path):
    compare_module = importlib.import_module("curvlab.compare")
    problem = _problem("conv2d", "ce")
    kfac, ggn = cl.KFAC(problem), cl.GGN(problem)
    dense = cl.compare(kfac, ggn)
    monkeypatch.setattr(compare_module, "_fits", lambda n, dtype, device: False)
    estimated = cl.compare(kfac, ggn, num_probes=400)
    for row, dense_row in zip([*estimated.blocks, estimated.overall], [*dense.blocks, dense.overall]):
        assert "rel_spectral" not in row
        assert (
            abs(row["rel_frobenius"] - dense_row["rel_frobenius"]) < 4 * row["rel_frobenius_stderr"] + 1e-12
        )
        assert row["rel_frobenius_stderr"] < 0.2 * dense_row["rel_frobenius"] + 1e-12
    overall_line = str(estimated).splitlines()[-1]
    assert f"{estimated.overall['rel_frobenius']:.4g}" in overall_line  # the table shows the estimate
    store = cl.Store(tmp_path / "estimated.h5")
    store.save("kfac_vs_ggn", estimated)
    (record,) = store.records()
    assert record.data["overall"]["rel_frobenius"] == estimated.overall["rel_frobenius"]
    assert record.data["overall"]["rel_frobenius_stderr"] == estimated.overall["rel_frobenius_stderr"]


def test_compare_rejects_different_parameters():
    problem = _problem("mlp", "ce")
    other = cl.Problem(problem.model, problem.loss_fn, problem.data, params=problem.params[:2])
    with pytest.raises(ValueError, match="different parameters"):
        cl.compare(cl.GGN(other), cl.GGN(problem))


def test_partial_eigensolver_agrees_with_full(monkeypatch):
    compare_module = importlib.import_module("curvlab.compare")  # the name curvlab.compare is the function

    problem = _problem("conv2d", "ce")
    kfac, ggn = cl.KFAC(problem), cl.GGN(problem)
    full = cl.compare(kfac, ggn, k=4)
    monkeypatch.setattr(compare_module, "FULL_EIGH_LIMIT", 5)
    partial = cl.compare(kfac, ggn, k=4)
    for key in ("rel_spectral", "topk_subspace_overlap"):
        assert partial.overall[key] == pytest.approx(full.overall[key], rel=1e-8)
    assert partial.overall["topk_eigenvalues_exact"] == pytest.approx(
        full.overall["topk_eigenvalues_exact"], rel=1e-10
    )


def test_scaled_error_ignores_a_global_scale():
    problem = _problem("mlp", "ce")
    ggn = cl.GGN(problem)
    scaled = cl.DenseOperator(3.0 * ggn.to_dense(), ggn.param_shapes, ggn.param_names)
    report = cl.compare(scaled, ggn, k=2)
    assert report.overall["rel_frobenius"] == pytest.approx(2.0, rel=1e-10)
    assert report.overall["rel_frobenius_scaled"] == pytest.approx(0.0, abs=1e-6)
    ef = cl.compare(cl.EmpiricalFisher(problem), ggn, k=2).overall
    assert ef["rel_frobenius_scaled"] <= ef["rel_frobenius"] + 1e-12


def test_compare_rejects_what_it_cannot_compare():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    problem = cl.Problem(model, nn.MSELoss(), (torch.randn(6, 3).double(), torch.randn(6, 2).double()))
    kfac, ggn = cl.KFAC(problem), cl.GGN(problem)
    with pytest.raises(TypeError, match="exact must be a curvlab curvature object, got Tensor"):
        cl.compare(kfac, ggn.to_dense())
    with pytest.raises(ValueError, match="k must be an integer ≥ 1, got 0"):
        cl.compare(kfac, ggn, k=0)
    with pytest.raises(
        ValueError, match=r"num_probes \(for a standard error\) must be an integer ≥ 2, got 1"
    ):
        cl.compare(kfac, ggn, num_probes=1)
    single = cl.Problem(model.float(), nn.MSELoss(), (torch.randn(6, 3), torch.randn(6, 2)))
    with pytest.raises(cl.DataError, match="approx is torch.float32 on cpu but exact is torch.float64"):
        cl.compare(cl.KFAC(single), ggn)
    model.double()
    reordered = cl.Problem(model, nn.MSELoss(), problem.data, params=list(model.parameters())[::-1])
    with pytest.raises(ValueError, match="over different parameters"):
        cl.compare(cl.KFAC(reordered), ggn)
