"""The plain-MLP fast path's statistics (manual backpropagation, compression) equal the autograd pass.

Its forms and products are checked against the dense references and the general
routes in ``test_quadratic_forms.py``.
"""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.passes import fast, statistics
from curvlab.passes.autograd import autograd_statistics
from curvlab.passes.fast import mlp
from curvlab.passes.fast.mlp import PlainMLP
from curvlab.passes.layers import find_layers
from curvlab.passes.vectors import LocatedVectors
from tests.helpers import assert_close_rel

LOSSES = {
    "mse": (nn.MSELoss(), lambda N, C: torch.randn(N, C, dtype=torch.float64)),
    "bce": (nn.BCEWithLogitsLoss(reduction="sum"), lambda N, C: torch.rand(N, C, dtype=torch.float64)),
    "ce": (nn.CrossEntropyLoss(), lambda N, C: torch.randint(0, C, (N,))),
}


def _bottleneck_problem(loss_name: str, outputs: int = 24, final_tanh: bool = True):
    """A bottlenecked MLP (5-40-3-6-outputs): compression triggers at widths 3 and 6.

    The third linear layer is frozen (not in the problem) and the first layer's bias
    too, an in-place ReLU sits in the middle, and a Tanh follows the last layer
    (without it, MSE's constant output Hessian takes the triangular-factor path).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 40),
        nn.Sigmoid(),
        nn.Linear(40, 3),
        nn.ReLU(inplace=True),
        nn.Linear(3, 6, bias=False),
        nn.ELU(),
        nn.Linear(6, outputs),
        nn.Tanh() if final_tanh else nn.Identity(),
    ).double()
    loss_fn, target = LOSSES[loss_name]
    X = torch.randn(13, 5, dtype=torch.float64)
    y = target(13, outputs)
    params = [p for name, p in model.named_parameters() if name not in ("4.weight", "0.bias")]
    return cl.Problem(model, loss_fn, [(X[:7], y[:7]), (X[7:], y[7:])], params=params)


def _sums(stream, layers):
    """Per layer: Σ g gᵀ, the squared-gradient moments and Σ g gᵀ from ``tensor()``."""
    gram, moments, from_tensor = {}, {}, {}
    for batch in stream:
        for chunk in batch.chunks:
            for layer in layers:
                g, a = chunk.gradients[layer.name], batch.inputs[layer.name][chunk.examples]
                flat = g.tensor().reshape(-1, g.tensor().shape[-1])
                gram[layer.name] = gram.get(layer.name, 0) + g.gram()
                moments[layer.name] = moments.get(layer.name, 0) + g.squared_moments(a)
                from_tensor[layer.name] = from_tensor.get(layer.name, 0) + flat.T @ flat
    return gram, moments, from_tensor


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize(
    "outputs, final_tanh", [(24, True), (24, False), (4, False)], ids=["tanh", "linear", "linear-narrow"]
)
def test_mlp_pass_equals_autograd_pass(loss_name, fisher_type, outputs, final_tanh):
    problem = _bottleneck_problem(loss_name, outputs, final_tanh)
    layers = find_layers(problem)
    route = PlainMLP.compile(problem)
    assert route.covers(layers)
    expected = _sums(autograd_statistics(problem, layers, fisher_type, mc_samples=3, seed=1), layers)
    actual = _sums(route.statistics(layers, fisher_type, mc_samples=3, seed=1), layers)
    for what, exp, act in zip(("gram", "moments", "tensor gram"), expected, actual):
        for name in exp:
            assert_close_rel(act[name], exp[name], 1e-12, f"{what} of layer {name}")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_chunks_reuse_buffers_and_sum_to_the_autograd_pass(loss_name, fisher_type, monkeypatch):
    """Chunks of 2 examples (batches of 7 and 6: a last chunk of 1) write into the same buffers.

    Each chunk's vectors are read before the next chunk overwrites them, and the
    sums still equal the autograd pass (type-2: the triangular-factor and
    compressed paths; MC: dense vectors in reused buffers).
    """
    problem = _bottleneck_problem(loss_name, outputs=24, final_tanh=False)
    layers = find_layers(problem)
    V = 24 if fisher_type == "type-2" else 3
    monkeypatch.setattr(mlp, "block_budget", lambda device: 2 * V * 40 * 8)
    expected = _sums(autograd_statistics(problem, layers, fisher_type, mc_samples=3, seed=1), layers)
    pointers, sizes = {}, []
    stream = PlainMLP.compile(problem).statistics(layers, fisher_type, mc_samples=3, seed=1)

    def recording(stream):
        for batch in stream:
            yield type(batch)(batch.index, batch.inputs, recorded(batch))

    def recorded(batch):
        for chunk in batch.chunks:
            sizes.append(next(iter(batch.inputs.values()))[chunk.examples].shape[0])
            for name, g in chunk.gradients.items():
                if isinstance(g, mlp.DenseVectors) and g.B.shape[1] == V:  # not compressed (QR)
                    pointers.setdefault(name, set()).add(g.B.data_ptr())
            yield chunk

    actual = _sums(recording(stream), layers)
    assert sizes == [2, 2, 2, 1, 2, 2, 2]
    if fisher_type == "mc":  # 3 vectors per example, never compressed: one buffer per pulled-back layer
        reused = {name for name, p in pointers.items() if len(p) == 1}
        assert reused == {"0", "2"}, pointers  # "6", the last, reads the sampled vectors themselves
    for what, exp, act in zip(("gram", "moments", "tensor gram"), expected, actual):
        for name in exp:
            assert_close_rel(act[name], exp[name], 1e-12, f"{what} of layer {name}")


def test_compression_really_happens(monkeypatch):
    """The 24 vectors per example reach the 3-wide layer as 3 (QR), not 24."""
    problem = _bottleneck_problem("mse")
    layers = find_layers(problem)
    batch = next(iter(PlainMLP.compile(problem).statistics(layers, "type-2")))
    seen = next(iter(batch.chunks)).gradients
    assert isinstance(seen["6"], mlp.ScaledRows)  # next to the output: kept factored
    assert seen["2"].tensor().shape[0] == 3  # compressed at the bottleneck


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("final_tanh", [True, False], ids=["tanh", "linear"])
@pytest.mark.parametrize("chunks", ["whole batches", "2 examples"])
def test_structured_objects_agree_with_the_autograd_pass(loss_name, final_tanh, chunks, monkeypatch):
    """KFAC, EKFAC and the exact diagonal: same numbers with the MLP pass switched off.

    In chunks of 2 examples, KFAC joins the chunks' factored gradients next to the
    output into one Gram per batch (MSE without the final tanh: one constant s) or
    adds the chunks' Grams (s varies).
    """
    problem = _bottleneck_problem(loss_name, final_tanh=final_tanh)
    if chunks == "2 examples":
        monkeypatch.setattr(mlp, "block_budget", lambda device: 2 * 24 * 40 * 8)
    by_fast_path = {
        "kfac": cl.KFAC(problem).to_dense(),
        "ekfac": cl.EKFAC(problem).to_dense(),
        "diagonal": cl.Diagonal(cl.GGN(problem)).to_dense(),
        "mc kfac": cl.KFAC(problem, fisher_type="mc", mc_samples=4, seed=3).to_dense(),
    }
    monkeypatch.setattr(fast, "FAST_PATHS", [])
    slow = {
        "kfac": cl.KFAC(problem).to_dense(),
        "ekfac": cl.EKFAC(problem).to_dense(),
        "diagonal": cl.Diagonal(cl.GGN(problem)).to_dense(),
        "mc kfac": cl.KFAC(problem, fisher_type="mc", mc_samples=4, seed=3).to_dense(),
    }
    for name in by_fast_path:
        assert_close_rel(by_fast_path[name], slow[name], 1e-12, name)
    exact = cl.GGN(problem).to_dense()
    assert_close_rel(by_fast_path["diagonal"].diagonal(), exact.diagonal(), 1e-12, "diagonal vs dense GGN")


def test_kfac_takes_one_gram_per_batch_of_the_factored_gradients(monkeypatch):
    """MSE, linear output, chunks of 2 examples: the last layer's G is one Gram per batch, not per chunk."""
    problem = _bottleneck_problem("mse", final_tanh=False)
    monkeypatch.setattr(mlp, "block_budget", lambda device: 2 * 24 * 40 * 8)
    calls = []
    gram = mlp.ScaledRows.gram
    monkeypatch.setattr(
        mlp.ScaledRows, "gram", lambda self, reduce=False: calls.append(self.s.shape[0]) or gram(self)
    )
    cl.KFAC(problem)
    assert calls == [7, 6]  # the batches' examples, joined


def test_float32_pass_matches_float64():
    problem = _bottleneck_problem("mse")
    K64 = cl.KFAC(problem).to_dense()
    model32 = problem.model.float()
    params = [p for name, p in model32.named_parameters() if name not in ("4.weight", "0.bias")]
    data = [(X.float(), y.float()) for X, y in problem.data]
    K32 = cl.KFAC(cl.Problem(model32, problem.loss_fn, data, params=params)).to_dense()
    assert K32.dtype == torch.float32
    assert_close_rel(K32.double(), K64, 1e-5, "float32 KFAC")


def test_other_models_use_the_autograd_pass():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 3))
    problem = cl.Problem(conv, nn.MSELoss(), (torch.randn(4, 1, 10), torch.randn(4, 3)))
    assert fast.compile(problem) is None
    dropout = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    problem = cl.Problem(dropout, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
    assert fast.compile(problem) is None
    sequence = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # (N, T, d) inputs
    problem = cl.Problem(sequence, nn.MSELoss(), (torch.randn(4, 5, 3), torch.randn(4, 5, 2)))
    assert fast.compile(problem) is None
    batch = next(iter(statistics(problem, find_layers(problem), "type-2", fast_path=fast.compile(problem))))
    assert all(isinstance(g, LocatedVectors) for g in next(iter(batch.chunks)).gradients.values())


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_in_place_activations_single_example_kfac_is_exact(model_kind, monkeypatch):
    """Regression: an in-place ReLU after a layer must not change its output gradients.

    On one example with one output, type-2 KFAC equals the exact GGN block of each
    layer; both passes (the CNN and the switched-off MLP pass use autograd hooks).
    """
    torch.manual_seed(1)
    if model_kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)).double()
        X = torch.randn(1, 3, dtype=torch.float64)
        monkeypatch.setattr(fast, "FAST_PATHS", [])
    else:
        model = nn.Sequential(
            nn.Conv1d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6, 1)
        ).double()
        X = torch.randn(1, 1, 5, dtype=torch.float64)
    first = model[0]
    params = [first.weight, first.bias]
    problem = cl.Problem(model, nn.MSELoss(), (X, torch.randn(1, 1, dtype=torch.float64)), params=params)
    expected = cl.GGN(problem).to_dense()
    actual = cl.KFAC(problem, kfac_approx="reduce" if model_kind == "cnn" else "expand").to_dense()
    if model_kind == "mlp":
        assert_close_rel(actual, expected, 1e-12, "KFAC vs GGN behind an in-place ReLU")
    else:
        # Conv weight sharing: KFAC is not exact, but the output gradients enter only
        # through G; compare with the pass on the same model without in-place ReLU.
        model[1] = nn.ReLU()
        reference = cl.KFAC(problem, kfac_approx="reduce").to_dense()
        assert_close_rel(actual, reference, 1e-12, "in-place vs out-of-place ReLU")
