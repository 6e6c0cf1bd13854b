"""Cross-entropy with label smoothing and with probability targets.

The smoothed targets t = (1 − ε) e_y + ε/C sum to 1, so the loss' Hessian in the
logits is unchanged (GGN, type-2 KFAC), the gradient becomes p − t (empirical
Fisher, empirical KFAC), and the Fisher stays the model's own (labels drawn from
p, the likelihood's score). Probability targets t give ∇ = s p − t and
∇² = s (diag(p) − ppᵀ), s = Σ_c t_c. The exact operators are checked against the
dense references on shared cases (``tests/cases.py``); these tests check the rest.
"""

import copy

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import Wrapped, assert_close_rel, assert_same_model_fisher

F64 = torch.float64


def _problem(label_smoothing, batch_sizes=(5, 3), seed=0, model=None):
    torch.manual_seed(seed)
    if model is None:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(n, 4, generator=generator, dtype=F64), torch.randint(0, 3, (n,), generator=generator))
        for n in batch_sizes
    ]
    return cl.Problem(model, nn.CrossEntropyLoss(label_smoothing=label_smoothing), data)


def test_the_loss_and_its_gradient_are_torchs():
    problem = _problem(0.3)
    X = torch.cat([X for X, _ in problem.data])
    y = torch.cat([y for _, y in problem.data])
    params = list(problem.model.parameters())
    expected = nn.CrossEntropyLoss(label_smoothing=0.3)(problem.model(X), y)
    assert torch.allclose(problem.loss(), expected, rtol=1e-13, atol=0)
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(expected, params)])
    assert_close_rel(problem.gradient(), gradient, 1e-12, "gradient")
    output = problem.model(X)
    rule = problem.loss_rule
    by_autograd = torch.func.grad(lambda f: rule.sum_loss(f, y))(output)
    assert_close_rel(rule.output_gradient(output, y), by_autograd, 1e-13, "output gradient p − t")


UNCHANGED = {
    "GGN": lambda p: cl.GGN(p).to_dense(),
    "Fisher": lambda p: cl.Fisher(p).to_dense(),
    "MC Fisher": lambda p: cl.Fisher(p, mc_samples=4, seed=1).to_dense(),  # labels from the model, its score
    "type-2 KFAC": lambda p: cl.KFAC(p, fisher_type="type-2").to_dense(),
    "MC KFAC": lambda p: cl.KFAC(p, fisher_type="mc").to_dense(),
}


@pytest.mark.parametrize("what", list(UNCHANGED))
def test_ggn_fisher_and_type2_kfac_do_not_change(what):
    smoothed, plain = _problem(0.3), _problem(0.0)
    assert_close_rel(UNCHANGED[what](smoothed), UNCHANGED[what](plain), 1e-13, what)


@pytest.mark.parametrize("kind", [cl.Hessian, cl.EmpiricalFisher], ids=lambda k: k.__name__)
def test_hessian_and_empirical_fisher_change(kind):
    smoothed, plain = _problem(0.3), _problem(0.0)
    a, b = kind(smoothed).to_dense(), kind(plain).to_dense()
    assert (a - b).norm() > 1e-3 * b.norm()


@pytest.mark.parametrize("separate", [False, True], ids=["folded_bias", "separate_bias"])
def test_single_example_empirical_kfac_equals_the_empirical_fisher_blocks(separate):
    """One example, no weight sharing: g aᵀ per layer, so (a aᵀ) ⊗ (g gᵀ) is the exact EF block."""
    problem = _problem(0.3, batch_sizes=(1,))
    kfac = cl.KFAC(problem, fisher_type="empirical", separate_weight_and_bias=separate)
    ef = reference.empirical_fisher(problem)
    by = "parameter" if separate else "layer"
    start = 0
    for block in kfac.blocks(by=by):
        size = block.shape[0]
        expected = ef[start : start + size, start : start + size]
        assert_close_rel(block.to_dense(), expected, 1e-12, "empirical KFAC block vs reference EF")
        start += size


@pytest.mark.parametrize("flavour", ["empirical", "type-2"])
def test_empirical_kfac_by_the_mlp_pass_and_by_autograd_agree(flavour):
    """The plain-MLP pass and the autograd pass (a non-Sequential wrapper) give the same factors."""
    mlp = _problem(0.2)
    wrapped = _problem(0.2, model=Wrapped(copy.deepcopy(mlp.model)))
    a = cl.KFAC(mlp, fisher_type=flavour).to_dense()
    b = cl.KFAC(wrapped, fisher_type=flavour).to_dense()
    assert_close_rel(a, b, 1e-12, f"{flavour}: MLP pass vs autograd pass")


def test_label_smoothing_with_ignore_index():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=F64), torch.tensor([0, 2, -100, 1, -100, 2])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.25)
    problem = cl.Problem(model, loss_fn, (X, y))
    assert torch.allclose(problem.loss(), loss_fn(model(X), y), rtol=1e-13, atol=0)
    assert_close_rel(cl.EmpiricalFisher(problem).to_dense(), reference.empirical_fisher(problem), 1e-12, "EF")
    assert_close_rel(cl.Hessian(problem).to_dense(), reference.hessian_matrix(problem), 1e-12, "Hessian")


def _soft_problem(batch_sizes=(1,), label_smoothing=0.0, model=None, seed=0):
    """Probability targets that do not sum to 1 (s ≠ 1 exercises the Hessian's scale)."""
    torch.manual_seed(seed)
    if model is None:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    data = [
        (
            torch.randn(n, 4, generator=generator, dtype=F64),
            2 * torch.rand(n, 3, generator=generator, dtype=F64),
        )
        for n in batch_sizes
    ]
    return cl.Problem(model, nn.CrossEntropyLoss(label_smoothing=label_smoothing), data)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_probability_targets_loss_and_output_gradient_are_torchs(label_smoothing):
    problem = _soft_problem((5, 3), label_smoothing)
    X = torch.cat([X for X, _ in problem.data])
    y = torch.cat([y for _, y in problem.data])
    expected = nn.CrossEntropyLoss(label_smoothing=label_smoothing)(problem.model(X), y)
    assert torch.allclose(problem.loss(), expected, rtol=1e-13, atol=0)
    output = problem.model(X).detach()
    rule = problem.loss_rule
    by_autograd = torch.func.grad(lambda f: rule.sum_loss(f, y))(output)
    assert_close_rel(rule.output_gradient(output, y), by_autograd, 1e-13, "output gradient s p − t")
    hessian = torch.func.hessian(lambda f: rule.sum_loss(f[None], y[:1]))(output[0])
    u = torch.randn(3, dtype=F64)
    scaled = rule.hessian_vp(output[:1], u[None], y[:1])
    assert_close_rel(scaled[0], hessian @ u, 1e-13, "s Λ u")


@pytest.mark.parametrize("wrapped", [False, True], ids=["mlp_pass", "autograd_pass"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_single_example_kfac_with_probability_targets_equals_exact_blocks(
    wrapped, label_smoothing, fisher_type
):
    problem = _soft_problem((1,), label_smoothing)
    if wrapped:
        problem = cl.Problem(Wrapped(problem.model), problem.loss_fn, problem.data)
    expected = {"type-2": reference.ggn, "empirical": reference.empirical_fisher}[fisher_type](problem)
    start = 0
    for block in cl.KFAC(problem, fisher_type=fisher_type).blocks(by="layer"):
        size = block.shape[0]
        rows = slice(start, start + size)
        assert_close_rel(block.to_dense(), expected[rows, rows], 1e-12, f"{fisher_type} block")
        start += size


def test_monte_carlo_fisher_is_the_models_whatever_the_targets():
    soft = _soft_problem((5, 3))
    hard_data = [(X, y.argmax(1)) for X, y in soft.data]
    hard = cl.Problem(soft.model, nn.CrossEntropyLoss(), hard_data)
    assert_same_model_fisher(soft, hard)


@pytest.mark.parametrize(
    "target, message",
    [
        (-torch.rand(4, 3, dtype=F64), "non-negative"),
        (torch.rand(4, 2, dtype=F64), "must have the output's shape"),
    ],
    ids=["negative", "shape"],
)
def test_bad_probability_targets_are_a_data_error(target, message):
    model = nn.Linear(4, 3).double()
    with pytest.raises(cl.DataError, match=message):
        cl.Problem(model, nn.CrossEntropyLoss(), (torch.randn(4, 4, dtype=F64), target))
