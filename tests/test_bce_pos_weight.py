"""BCE-with-logits with ``pos_weight``: s = 1 + (w − 1) y scales the output Hessian.

∇_f ℓ = s σ − w y and ∇²_f ℓ = s σ(1 − σ): the GGN, the Hessian, the empirical
Fisher and KFAC follow the weights, the Fisher stays the model's Bernoulli one.
The exact operators are checked against the dense references and curvlinops on
shared cases (``tests/cases.py``); these tests check the structured side.
"""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import Wrapped, assert_close_rel, assert_same_model_fisher

F64 = torch.float64
POS_WEIGHT = torch.tensor([0.5, 3.0, 1.5])


def _problem(batch_sizes=(1,), pos_weight=POS_WEIGHT, wrapped=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(n, 4, generator=generator, dtype=F64), torch.rand(n, 3, generator=generator, dtype=F64))
        for n in batch_sizes
    ]
    return cl.Problem(Wrapped(model) if wrapped else model, nn.BCEWithLogitsLoss(pos_weight=pos_weight), data)


def test_loss_and_output_gradient_are_torchs():
    problem = _problem((5, 3))
    X = torch.cat([X for X, _ in problem.data])
    y = torch.cat([y for _, y in problem.data])
    expected = nn.BCEWithLogitsLoss(pos_weight=POS_WEIGHT.double())(problem.model(X), y)
    assert torch.allclose(problem.loss(), expected, rtol=1e-13, atol=0)
    output = problem.model(X).detach()
    rule = problem.loss_rule
    by_autograd = torch.func.grad(lambda f: rule.sum_loss(f, y))(output)
    assert_close_rel(rule.output_gradient(output, y), by_autograd, 1e-13, "s σ − w y")
    scaled = rule.hessian_vp(output, torch.ones_like(output), y)
    for n in range(output.shape[0]):
        hessian = torch.func.hessian(lambda f, n=n: rule.sum_loss(f[None], y[n : n + 1]))(output[n])
        assert_close_rel(torch.diag(scaled[n]), hessian, 1e-13, "s σ(1 − σ), diagonal")


@pytest.mark.parametrize("wrapped", [False, True], ids=["mlp_pass", "autograd_pass"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_single_example_kfac_equals_exact_blocks(wrapped, fisher_type):
    problem = _problem((1,), wrapped=wrapped)
    expected = {"type-2": reference.ggn, "empirical": reference.empirical_fisher}[fisher_type](problem)
    start = 0
    for block in cl.KFAC(problem, fisher_type=fisher_type).blocks(by="layer"):
        rows = slice(start, start + block.shape[0])
        assert_close_rel(block.to_dense(), expected[rows, rows], 1e-12, f"{fisher_type} block")
        start += block.shape[0]


@pytest.mark.parametrize("wrapped", [False, True], ids=["mlp_pass", "autograd_pass"])
def test_single_example_diagonal_is_layerwise_and_exact(wrapped):
    problem = _problem((1,), wrapped=wrapped)
    diagonal = cl.Diagonal(cl.GGN(problem))
    assert diagonal.method_used == "layerwise"
    assert_close_rel(diagonal.diagonal, torch.diagonal(reference.ggn(problem)), 1e-12, "diagonal")


def test_the_fisher_is_the_models_whatever_the_weights():
    assert_same_model_fisher(_problem((5, 3)), _problem((5, 3), pos_weight=None))


@pytest.mark.parametrize("kind", [cl.GGN, cl.Hessian, cl.EmpiricalFisher], ids=lambda k: k.__name__)
def test_the_other_matrices_follow_the_weights(kind):
    weighted, plain = _problem((5, 3)), _problem((5, 3), pos_weight=None)
    assert (kind(weighted).to_dense() - kind(plain).to_dense()).norm() > 1e-3
