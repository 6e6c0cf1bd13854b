"""The one seam for fast paths: every consumer takes them through ``curvlab.passes.fast``.

A fast path registered in ``FAST_PATHS`` is found by the exact operators (forms,
products, gradient) and by KFAC, EKFAC and the exact diagonal (statistics), chosen
once per object, with no other change: what adding a family (a plain CNN, say) needs.
"""

import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.passes import fast
from curvlab.passes.fast.mlp import PlainMLP
from tests.helpers import assert_close_rel


class Recording(PlainMLP):
    """The plain-MLP fast path, counting what each consumer asks of it."""

    calls: list[str] = []

    def quadratic_forms(self, *args):
        Recording.calls.append("forms")
        return super().quadratic_forms(*args)

    def products(self, *args):
        Recording.calls.append("products")
        return super().products(*args)

    def gradient(self, *args):
        Recording.calls.append("gradient")
        return super().gradient(*args)

    def statistics(self, *args, **kwargs):
        Recording.calls.append("statistics")
        return super().statistics(*args, **kwargs)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    return cl.Problem(model, nn.MSELoss(), (X, y))


def _every_consumer(problem, v) -> dict:
    return {
        "H v": cl.Hessian(problem) @ v,
        "G forms": cl.GGN(problem).quadratic_forms(v),
        "gradient": cl.Hessian(problem).gradient(),
        "KFAC": cl.KFAC(problem).to_dense(),
        "EKFAC": cl.EKFAC(problem).to_dense(),
        "diagonal": cl.Diagonal(cl.GGN(problem)).diagonal,
    }


def test_a_registered_fast_path_serves_every_consumer(monkeypatch):
    problem = _problem()
    v = torch.randn(problem.num_params, 2, dtype=torch.float64)
    with fast.disabled():
        general = _every_consumer(problem, v)
    monkeypatch.setattr(fast, "FAST_PATHS", [Recording])
    Recording.calls = []
    by_fast_path = _every_consumer(problem, v)
    assert Recording.calls == [
        "products",
        "forms",
        "gradient",
        *["statistics"] * 4,
    ]  # EKFAC: KFAC's, then its own
    for name, value in general.items():
        assert_close_rel(by_fast_path[name], value, 1e-12, name)


def test_the_fast_path_is_chosen_once_and_dropped_when_the_model_changes():
    """A hook added after the operator was built: the fast path no longer applies (checked each use)."""
    problem = _problem()
    H = cl.Hessian(problem)
    assert isinstance(H._fast, PlainMLP) and H._fast_route() is not None
    handle = problem.model[0].register_forward_hook(lambda module, args, output: 2 * output)
    try:
        assert H._fast_route() is None
        v = torch.randn(problem.num_params, dtype=torch.float64)
        expected = reference.hessian_matrix(problem) @ v
        assert_close_rel(H @ v, expected, 1e-10, "the general route, with the hook")
    finally:
        handle.remove()
