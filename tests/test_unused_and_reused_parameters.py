"""Parameters the forward pass never reads, or reads outside their module.

Exact operators give an unused parameter zero rows and columns (its true
curvature); the layerwise approximations refuse such layers with a clear error
naming the module, or give them the ``other_structure``, like any other layer
without a Kronecker structure. A parameter read outside its module (a decoder
reusing an encoder's weight transposed) used to be silently left out of KFAC's
statistics; it is now found from the forward pass' autograd graph.
"""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.problem import uses_in_graph
from tests.helpers import assert_close_rel

F64 = torch.float64


class _WithSpare(nn.Module):
    """A model with a layer its forward pass never calls (e.g. an unused head)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.spare = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class _TiedAutoencoder(nn.Module):
    """The decoder reads the encoder's weight, transposed, outside the encoder module."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.encoder(x)), self.encoder.weight.T)


class _SkipsSmallBatches(nn.Module):
    """Calls its second layer only on batches of more than 3 examples."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = torch.tanh(self.first(x))
        return self.second(x) if x.shape[0] > 3 else x


def _data(batch_sizes=(3, 2), inputs=4, outputs=3, loss="mse", seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for n in batch_sizes:
        X = torch.randn(n, inputs, generator=generator, dtype=F64)
        if loss == "ce":
            y = torch.randint(0, outputs, (n,), generator=generator)
        else:
            y = torch.randn(n, outputs, generator=generator, dtype=F64)
        batches.append((X, y))
    return batches


def _problem(model_class, loss="mse", **data_options):
    torch.manual_seed(0)
    model = model_class().double()
    loss_fn = nn.CrossEntropyLoss(reduction="sum") if loss == "ce" else nn.MSELoss()
    data_options.setdefault("outputs", 4 if model_class is _TiedAutoencoder else 3)
    return cl.Problem(model, loss_fn, _data(loss=loss, **data_options))


def _rows_of(problem, name):
    start = 0
    for param_name, p in zip(problem.param_names, problem.params):
        if param_name == name:
            return torch.arange(start, start + p.numel())
        start += p.numel()
    raise KeyError(name)


def test_parameter_uses_are_counted_in_the_graph():
    assert _problem(_WithSpare).param_uses == {
        "body.weight": 1,
        "body.bias": 1,
        "spare.weight": 0,
        "spare.bias": 0,
        "head.weight": 1,
        "head.bias": 1,
    }
    assert _problem(_TiedAutoencoder).param_uses == {
        "encoder.weight": 2,
        "encoder.bias": 1,
    }
    # A shared subexpression (a diamond in the graph) counts once.
    w = torch.randn(3, requires_grad=True)
    h = w.tanh()
    assert uses_in_graph(h.sin() + h.cos() * h, [w]) == [1]


EXACT = {
    "Hessian": (cl.Hessian, reference.hessian_matrix),
    "GGN": (cl.GGN, reference.ggn),
    "Fisher": (cl.Fisher, reference.fisher),
    "EmpiricalFisher": (cl.EmpiricalFisher, reference.empirical_fisher),
}


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", list(EXACT))
def test_exact_operators_give_an_unused_parameter_zero_curvature(name, loss):
    problem = _problem(_WithSpare, loss)
    kind, dense_reference = EXACT[name]
    operator = kind(problem)
    expected = dense_reference(problem)
    spare = torch.cat([_rows_of(problem, "spare.weight"), _rows_of(problem, "spare.bias")])
    assert expected[spare].abs().max() == 0  # the reference agrees: no curvature there
    assert_close_rel(operator.to_dense(), expected, 1e-10, f"{name} to_dense")
    V = torch.randn(problem.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert_close_rel(operator @ V, expected @ V, 1e-10, f"{name} matmat")
    assert_close_rel(operator @ V[:, 0], expected @ V[:, 0], 1e-10, f"{name} matvec")
    exact_trace = cl.trace(operator, method="exact").value
    assert abs(float(exact_trace) - expected.trace().item()) <= 1e-10 * expected.trace().abs().item()
    top = cl.top_eigen(operator, 2, progress=False)
    assert top.converged
    assert_close_rel(top.values, torch.linalg.eigvalsh(expected).flip(0)[:2], 1e-8, f"{name} top-2")


def test_monte_carlo_fisher_and_diagonal_with_an_unused_parameter():
    problem = _problem(_WithSpare, "ce")
    mc = cl.Fisher(problem, mc_samples=3, seed=2).to_dense()
    spare = torch.cat([_rows_of(problem, "spare.weight"), _rows_of(problem, "spare.bias")])
    assert mc[spare].abs().max() == 0 and mc[:, spare].abs().max() == 0
    diagonal = cl.Diagonal(cl.GGN(problem))
    assert diagonal.method_used == "per-example"  # the layerwise pass refuses the unused layer
    assert_close_rel(diagonal.diagonal, torch.diagonal(reference.ggn(problem)), 1e-12, "diagonal")


@pytest.mark.parametrize("kind", [cl.KFAC, cl.EKFAC, cl.ACP])
def test_layerwise_approximations_refuse_an_unused_layer(kind):
    problem = _problem(_WithSpare)
    with pytest.raises(cl.UnsupportedError, match=r"module 'spare' \(Linear\) takes no part"):
        kind(problem)
    assert all(not m._forward_hooks for m in problem.model.modules())


def test_an_unused_layer_takes_the_other_structure():
    problem = _problem(_WithSpare)
    approx = cl.KFAC(problem, other_structure="exact").to_dense()
    spare = torch.cat([_rows_of(problem, "spare.weight"), _rows_of(problem, "spare.bias")])
    assert approx[spare].abs().max() == 0 and approx[:, spare].abs().max() == 0
    # The other layers' blocks are those of KFAC on the problem without the spare layer.
    used = [p for name, p in zip(problem.param_names, problem.params) if not name.startswith("spare")]
    rows = torch.cat(
        [_rows_of(problem, name) for name in problem.param_names if not name.startswith("spare")]
    )
    without = cl.KFAC(problem.restrict(used)).to_dense()
    assert_close_rel(approx[rows][:, rows], without, 1e-12, "KFAC of the used layers")


@pytest.mark.parametrize("kind", [cl.KFAC, cl.EKFAC, cl.ACP])
def test_a_weight_read_outside_its_module_is_a_clear_error(kind):
    problem = _problem(_TiedAutoencoder)
    with pytest.raises(
        cl.UnsupportedError, match=r"module 'encoder' \(Linear\) has a parameter read 2 times"
    ):
        kind(problem)


def test_a_weight_read_outside_its_module_takes_the_other_structure():
    problem = _problem(_TiedAutoencoder)
    approx = cl.KFAC(problem, other_structure="exact")
    ggn = reference.ggn(problem)
    rows = torch.cat([_rows_of(problem, "encoder.weight"), _rows_of(problem, "encoder.bias")])
    blocks = dict(zip(map(tuple, approx.block_indices), approx.block_operators))
    assert_close_rel(blocks[0, 1].to_dense(), ggn[rows][:, rows], 1e-12, "exact block of the encoder")
    # Before: KFAC's statistics saw only the encoder's own use of its weight and
    # returned factors far from this block, without a word.
    diagonal = cl.Diagonal(cl.GGN(problem))
    assert diagonal.method_used == "products"
    assert_close_rel(diagonal.diagonal, torch.diagonal(ggn), 1e-12, "diagonal")


def test_a_layer_missing_from_a_later_batch_is_a_clear_error():
    torch.manual_seed(0)
    model, loss_fn = _SkipsSmallBatches().double(), nn.MSELoss(reduction="sum")
    data = _data(batch_sizes=(5, 2), outputs=4)
    problem = cl.Problem(model, loss_fn, data)
    with pytest.raises(
        cl.UnsupportedError, match=r"module 'second' \(Linear\) is not called in the forward pass of batch 1"
    ):
        cl.KFAC(problem)
    # The exact operators follow each batch's own graph: batch 1 adds nothing for 'second'.
    expected = sum(reference.ggn(cl.Problem(model, loss_fn, batch)) for batch in data)
    assert_close_rel(cl.GGN(problem).to_dense(), expected, 1e-10, "GGN")


def test_the_model_itself_with_parameters_is_named_as_such():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.layer(x) * self.scale

    problem = cl.Problem(Scaled().double(), nn.MSELoss(), _data()[0])
    with pytest.raises(
        cl.UnsupportedError, match=r"the model itself \(Scaled\) has parameters but no Kronecker rule"
    ):
        cl.KFAC(problem)
