"""Cross-entropy targets equal to ``ignore_index`` have no loss term, as in torch.

They add nothing to the loss, its gradient or any curvature, and ``"mean"`` divides
by the number of the other targets. Checked three independent ways: against the
same problem with those examples dropped, against the dense references (which use
torch's own loss object), and by changing the ignored examples' inputs.
"""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(ignore_index, seed=1):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(9, 4, generator=generator, dtype=F64)
    y = torch.tensor([0, 2, ignore_index, 0, 2, ignore_index, 2, 0, ignore_index])  # class 1 never a label
    return X, y


CURVATURES = {
    "hessian": lambda p: cl.Hessian(p),
    "ggn": lambda p: cl.GGN(p),
    "fisher": lambda p: cl.Fisher(p),
    "empirical-fisher": lambda p: cl.EmpiricalFisher(p),
    "kfac-type-2": lambda p: cl.KFAC(p),
    "kfac-empirical": lambda p: cl.KFAC(p, fisher_type="empirical"),
    "ekfac": lambda p: cl.EKFAC(p),
    "acp": lambda p: cl.ACP(p),
    "diagonal-ggn": lambda p: cl.Diagonal(cl.GGN(p)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 1], ids=["default", "a-class"])
@pytest.mark.parametrize("kind", list(CURVATURES))
def test_ignored_examples_are_as_if_dropped(kind, ignore_index, reduction):
    model = _mlp()
    X, y = _data(ignore_index)
    kept = y != ignore_index
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)
    with_ignored = cl.Problem(model, loss, [(X[:4], y[:4]), (X[4:], y[4:])])
    dropped = cl.Problem(model, loss, (X[kept], y[kept]))
    assert with_ignored.num_terms == dropped.num_terms == int(kept.sum())
    assert torch.allclose(with_ignored.loss(), dropped.loss(), rtol=1e-14)
    expected = CURVATURES[kind](dropped).to_dense()
    assert_close_rel(CURVATURES[kind](with_ignored).to_dense(), expected, 1e-12, kind)


def test_gradient_and_quadratic_forms_as_if_dropped():
    """The gradient, and vᵀHv / vᵀGv by forward propagation (trace estimates), ignore them too."""
    model = _mlp()
    X, y = _data(-100)
    kept = y != -100
    problems = [cl.Problem(model, nn.CrossEntropyLoss(), data) for data in ((X, y), (X[kept], y[kept]))]
    gradients = [cl.GGN(p).gradient() for p in problems]
    assert_close_rel(gradients[0], gradients[1], 1e-13, "gradient")
    for operator in (cl.Hessian, cl.GGN):
        traces = [cl.trace(operator(p), num_matvecs=8, seed=3, progress=False).value for p in problems]
        assert traces[0] == pytest.approx(traces[1], rel=1e-12)


@pytest.mark.parametrize("kind", ["fisher-mc", "kfac-mc"])
def test_monte_carlo_ignores_the_inputs_of_ignored_examples(kind):
    """MC labels are drawn for every entry; those of ignored examples must add nothing.

    (Monte-Carlo draws depend on the batch shapes, so dropping examples is no check
    here; mc_samples > 1 takes KFAC through the MLP pass.)
    """
    model = _mlp()
    X, y = _data(-100)
    changed = X.clone()
    changed[y == -100] = 5.0
    build = {
        "fisher-mc": lambda p: cl.Fisher(p, mc_samples=3, seed=2),
        "kfac-mc": lambda p: cl.KFAC(p, fisher_type="mc", mc_samples=3, seed=2),
    }[kind]
    results = [build(cl.Problem(model, nn.CrossEntropyLoss(), (x, y))).to_dense() for x in (X, changed)]
    assert_close_rel(results[0], results[1], 1e-12, kind)


@pytest.mark.parametrize("kind", ["fisher-mc", "kfac-mc"])
def test_a_sampled_class_equal_to_ignore_index_counts(kind):
    """ignore_index marks data only: with no data target equal to it, it changes nothing."""
    model = _mlp()
    X, y = _data(0)
    y = torch.where(y == 0, 2, y)  # no target is 0 or 1
    build = {
        "fisher-mc": lambda p: cl.Fisher(p, mc_samples=5, seed=4),
        "kfac-mc": lambda p: cl.KFAC(p, fisher_type="mc", mc_samples=5, seed=4),
    }[kind]
    results = [
        build(cl.Problem(model, nn.CrossEntropyLoss(ignore_index=index), (X, y))).to_dense()
        for index in (-100, 1)
    ]
    assert_close_rel(results[0], results[1], 1e-14, kind)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_positions_against_dense_references(reduction):
    """(N, C, L) outputs with some positions ignored (padding): exact operators vs torch's own loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).double()
    X = torch.randn(3, 2, 5, dtype=F64)
    y = torch.randint(0, 4, (3, 5))
    y[0, 3:] = -100
    y[2, 4] = -100
    problem = cl.Problem(model, nn.CrossEntropyLoss(reduction=reduction), [(X[:2], y[:2]), (X[2:], y[2:])])
    ggn = reference.ggn(problem)
    assert_close_rel(cl.Hessian(problem).to_dense(), reference.hessian_matrix(problem), 1e-11, "Hessian")
    assert_close_rel(cl.GGN(problem).to_dense(), ggn, 1e-11, "GGN")
    assert_close_rel(cl.Fisher(problem).to_dense(), ggn, 1e-11, "Fisher = GGN")
    assert_close_rel(cl.EmpiricalFisher(problem).to_dense(), reference.empirical_fisher(problem), 1e-11, "EF")
    # The GGN of the ignored positions alone is not zero: the check above can fail.
    unmasked = cl.Problem(model, nn.CrossEntropyLoss(reduction="sum"), (X, torch.where(y < 0, 0, y)))
    assert (
        cl.GGN(unmasked).to_dense() - ggn * (1 if reduction == "sum" else problem.num_terms)
    ).abs().max() > 1e-3


def test_mc_kfac_draws_the_labels_of_the_mc_fisher():
    """Ignored examples between counted ones do not shift the MC labels of the others.

    One Linear layer and one counted example: KFAC's G ⊗ aaᵀ is the example's MC
    Fisher block exactly, so equal labels give equal matrices.
    """
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    X = torch.randn(3, 4, dtype=F64)
    y = torch.tensor([-100, 2, -100])
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    fisher = cl.Fisher(problem, mc_samples=4, seed=5).to_dense()
    kfac = cl.KFAC(problem, fisher_type="mc", mc_samples=4, seed=5).to_dense()
    assert_close_rel(kfac, fisher, 1e-12, "MC KFAC vs MC Fisher")
