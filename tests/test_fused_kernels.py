"""Models whose fused torch kernels lack the derivatives curvature needs: attention, recurrent.

``F.scaled_dot_product_attention`` runs fused kernels (no forward-mode derivative, no double
backward) and ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` in eval mode take a fused
fast path (no forward-mode derivative); every curvature product needs one or the other. The
model's curvature mode computes attention from its differentiable parts instead. On CUDA, cuDNN's
RNN kernels have neither a backward in eval mode nor a double backward: cuDNN is off for models
with recurrent modules (the CUDA half of that is in ``test_gpu.py``).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel, finite_difference_hessian, takes_fast_path

F64 = torch.float64
EXACT = {
    "GGN": (cl.GGN, reference.ggn),
    "Fisher": (cl.Fisher, reference.fisher),
    "EmpiricalFisher": (cl.EmpiricalFisher, reference.empirical_fisher),
    "Hessian": (cl.Hessian, reference.hessian_matrix),
}


class CausalBlock(nn.Module):
    """Embedding, layer norm, one causal attention head and an MLP; logits (N, C, T)."""

    def __init__(self, vocabulary=5, width=4, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.norm = nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(width, 5), nn.GELU(), nn.Linear(5, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        h = self.embedding(tokens)
        z = self.norm(h)
        h = h + F.scaled_dot_product_attention(self.query(z), self.key(z), self.value(z), is_causal=True)
        h = h + self.mlp(h)
        return self.head(h).transpose(1, 2)


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` or ``nn.MultiheadAttention`` between two Linear layers."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(3, 4)
        if kind == "encoder_layer":
            self.attention = nn.TransformerEncoderLayer(
                4, 2, dim_feedforward=4, dropout=0.0, batch_first=True
            )
        else:
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.embed(x)
        if self.kind == "encoder_layer":
            h = self.attention(h)
        else:
            h, _ = self.attention(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class LastStep(nn.Module):
    """An LSTM read out at its last step."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _recurrent_problem() -> cl.Problem:
    torch.manual_seed(0)
    model = LastStep().to(F64).eval()
    X, y = torch.randn(4, 5, 3, dtype=F64), torch.randint(0, 2, (4,))
    return cl.Problem(model, nn.CrossEntropyLoss(), (X, y))


def _causal_problem(**kwargs) -> cl.Problem:
    torch.manual_seed(0)
    model = CausalBlock().to(F64)
    tokens, labels = torch.randint(0, 5, (3, 4)), torch.randint(0, 3, (3, 4))
    return cl.Problem(model, nn.CrossEntropyLoss(), (tokens, labels), **kwargs)


def _encoder_problem(kind: str) -> cl.Problem:
    torch.manual_seed(0)
    model = Encoder(kind).to(F64)
    X, y = torch.randn(4, 3, 3, dtype=F64), torch.randint(0, 2, (4,))
    return cl.Problem(model, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize("name", list(EXACT))
def test_scaled_dot_product_attention(name):
    problem = _causal_problem()
    operator, dense_reference = EXACT[name]
    assert_close_rel(operator(problem).to_dense(), dense_reference(problem), 1e-10, name)


@pytest.mark.parametrize("kind", ["encoder_layer", "multihead_attention"])
@pytest.mark.parametrize("name", list(EXACT))
def test_fast_path_modules_in_eval_mode(kind, name):
    problem = _encoder_problem(kind)
    operator, dense_reference = EXACT[name]
    assert_close_rel(operator(problem).to_dense(), dense_reference(problem), 1e-10, name)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


@pytest.mark.parametrize("name", list(EXACT))
def test_lstm(name):
    problem = _recurrent_problem()
    operator, dense_reference = EXACT[name]
    assert_close_rel(operator(problem).to_dense(), dense_reference(problem), 1e-10, name)
    assert torch.backends.cudnn.enabled  # restored


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_of_the_linear_layers_around_attention_matches_curvlinops(approx):
    """Empirical KFAC of the Linear layers; embedding and layer norm get exact blocks.

    (Type-2 differs from curvlinops' for models that mix positions: see test_kfac_weight_sharing.)
    """
    curvlinops = pytest.importorskip("curvlinops")
    problem = _causal_problem()
    kfac = cl.KFAC(problem, fisher_type="empirical", kfac_approx=approx, other_structure="exact")
    exact = cl.EmpiricalFisher(problem).to_dense()
    dense = kfac.to_dense()
    offsets = [0]
    for p in problem.params:
        offsets.append(offsets[-1] + p.numel())
    for module, (start, stop) in [("embedding", offsets[0:2]), ("norm", (offsets[1], offsets[3]))]:
        block = slice(start, stop)
        assert_close_rel(dense[block, block], exact[block, block], 1e-12, f"exact block of {module}")
    linear = [p for name, p in problem.model.named_parameters() if not name.startswith(("embedding", "norm"))]
    restricted = problem.restrict(linear)
    ours = cl.KFAC(restricted, fisher_type="empirical", kfac_approx=approx).to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = curvlinops.KFACLinearOperator(
            problem.model,
            problem.loss_fn,
            linear,
            problem.data,
            fisher_type="empirical",
            kfac_approx=approx,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
    assert_close_rel(ours, theirs @ torch.eye(restricted.num_params, dtype=F64), 1e-10, "KFAC")


def test_attention_dropout_is_off_in_training_mode():
    """Dropout modules and multi-head attention's own dropout, in a layer left in training mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=4, dropout=0.3, batch_first=True).to(F64)
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Flatten(), nn.Linear(12, 2)).to(F64).train()
    X, y = torch.randn(5, 3, 3, dtype=F64), torch.randint(0, 2, (5,))
    training = cl.Problem(model, nn.CrossEntropyLoss(), (X, y), eval_mode=False)
    evaluated = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    assert_close_rel(cl.GGN(training).to_dense(), cl.GGN(evaluated).to_dense(), 1e-12, "GGN")
    assert_close_rel(cl.Hessian(training).to_dense(), cl.Hessian(evaluated).to_dense(), 1e-12, "Hessian")
    assert all(m.training for m in model.modules())


class Cube(torch.autograd.Function):
    """An old-style autograd.Function (no jvp, no setup_context): torch.func cannot differentiate it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class WithFunction(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.custom, self.first, self.second = custom, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.first(x)
        return self.second(Cube.apply(h) if self.custom else h**3)


@pytest.mark.parametrize("name", list(EXACT))
def test_operations_without_forward_mode_derivative_use_reverse_mode(name):
    """GGN, Fisher and EF products fall back to reverse mode (J v by double backward)."""
    torch.manual_seed(0)
    custom = WithFunction(custom=True).to(F64)
    plain = WithFunction(custom=False).to(F64)
    plain.load_state_dict(custom.state_dict())
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    operator, dense_reference = EXACT[name]
    ours = operator(cl.Problem(custom, nn.CrossEntropyLoss(), (X, y)))
    expected = dense_reference(cl.Problem(plain, nn.CrossEntropyLoss(), (X, y)))
    assert_close_rel(ours.to_dense(), expected, 1e-10, name)
    v = torch.randn(ours.shape[0], dtype=F64)
    assert_close_rel(ours @ v, expected @ v, 1e-10, f"{name} matvec")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: nn.utils.parametrizations.weight_norm(m),
        lambda m: nn.utils.parametrizations.weight_norm(m, dim=None),
        lambda m: nn.utils.weight_norm(m),  # the older hook-based form
    ],
    ids=["parametrization", "parametrization_whole_tensor", "hook"],
)
def test_weight_norm(wrap):
    """The fused weight norm kernel has no forward-mode derivative and a wrong double backward."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook form is deprecated
        model = nn.Sequential(wrap(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    assert_close_rel(cl.Hessian(problem).to_dense(), finite_difference_hessian(problem), 1e-7, "Hessian")
    for name, (operator, dense_reference) in EXACT.items():
        assert_close_rel(operator(problem).to_dense(), dense_reference(problem), 1e-10, name)
    assert torch._weight_norm.__name__ == "_weight_norm"  # torch's own again
    # The weight is computed from g and v: not a plain MLP for the closed forms
    # (they took the hook form's weight as fixed: traces missed g and v).
    assert not takes_fast_path(problem)
    V = torch.randn(problem.num_params, 3, dtype=F64)
    for operator, matrix in ((cl.Hessian, reference.hessian_matrix), (cl.GGN, reference.ggn)):
        expected = (V * (matrix(problem) @ V)).sum(0)
        assert_close_rel(operator(problem).quadratic_forms(V), expected, 1e-10, f"{operator.__name__} forms")
