"""Batch norm in eval mode, or in training mode without side effects; dropout off, other noise refused.

With ``eval_mode=False`` a batch norm in training normalizes by the batch's own
statistics, so the examples of a batch are coupled: every curvature matrix is
that of the batch function, f_n = F(θ, X)_n. The dense references take their
derivatives through the whole batch too, so the two must agree on one batch.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel, finite_difference_hessian

F64 = torch.float64
EXACT = {
    "GGN": (cl.GGN, reference.ggn),
    "Fisher": (cl.Fisher, reference.fisher),
    "EmpiricalFisher": (cl.EmpiricalFisher, reference.empirical_fisher),
    "Hessian": (cl.Hessian, reference.hessian_matrix),
}


def _model(norm: type = nn.BatchNorm1d, train: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), norm(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():  # away from the defaults (scale 1, shift 0, statistics 0 and 1)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        if model[1].running_mean is not None:
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
    return model.train(train)


def _problem(model: nn.Module, loss: str = "ce", eval_mode: bool = False, n: int = 7) -> cl.Problem:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, 4, generator=generator, dtype=F64)
    if loss == "ce":
        return cl.Problem(
            model,
            nn.CrossEntropyLoss(),
            (X, torch.randint(0, 3, (n,), generator=generator)),
            eval_mode=eval_mode,
        )
    y = torch.randn(n, 3, generator=generator, dtype=F64)
    return cl.Problem(model, nn.MSELoss(reduction="sum"), (X, y), eval_mode=eval_mode)


def _state(model: nn.Module) -> dict:
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", list(EXACT))
def test_training_mode_equals_the_batch_function_references(name, loss):
    model = _model()
    problem = _problem(model, loss)
    operator, dense_reference = EXACT[name]
    assert_close_rel(operator(problem).to_dense(), dense_reference(problem), 1e-10, name)


def test_training_mode_hessian_equals_finite_differences():
    """Independent of autodiff's second derivatives, which torch gets wrong in forward-over-reverse."""
    model = _model()
    problem = _problem(model)
    finite_differences = finite_difference_hessian(problem)
    assert_close_rel(cl.Hessian(problem).to_dense(), finite_differences, 1e-7, "Hessian")


KFAC_FLAVOURS = ["KFAC type-2", "KFAC mc", "KFAC empirical"]


def _curvature(what: str, problem) -> torch.Tensor:
    """The dense matrix of an exact operator (``EXACT``) or of a KFAC flavour."""
    if what in EXACT:
        return EXACT[what][0](problem).to_dense()
    return cl.KFAC(problem, fisher_type=what.removeprefix("KFAC "), other_structure="exact").to_dense()


@pytest.mark.parametrize("what", [*EXACT, *KFAC_FLAVOURS])
def test_training_mode_equals_a_batch_norm_without_buffers(what):
    """The same function written with F.batch_norm on batch statistics (no running statistics at all)."""

    class BatchStatisticsNorm(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)

    model = _model()
    plain = nn.Sequential(model[0], BatchStatisticsNorm(model[1]), model[2], model[3])
    first, second = _problem(model), _problem(plain)
    assert_close_rel(_curvature(what, first), _curvature(what, second), 1e-13, what)


def _use(use: str, problem) -> None:
    """Products, a top eigenvalue and a trace of an exact operator, or build an approximation."""
    if use in EXACT:
        C = EXACT[use][0](problem)
        C.to_dense()
        cl.top_eigen(C, 2)
        cl.trace(C, num_matvecs=6)
    elif use in KFAC_FLAVOURS:
        cl.KFAC(problem, fisher_type=use.removeprefix("KFAC "), other_structure="exact")
    elif use == "EKFAC":
        cl.EKFAC(problem, other_structure="diagonal")
    else:
        cl.Diagonal(cl.GGN(problem))


@pytest.mark.parametrize("use", [*EXACT, *KFAC_FLAVOURS, "EKFAC", "diagonal"])
def test_curvature_leaves_running_statistics_and_modes_alone(use):
    model = _model()
    before = _state(model)
    _use(use, _problem(model))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model[1].training and model[1].track_running_stats
    assert all(m.training for m in model.modules())


def test_eval_mode_uses_running_statistics_and_leaves_the_model_in_training():
    model = _model()
    before = _state(model)
    problem = _problem(model, eval_mode=True)
    frozen = _model(train=False)  # the same weights and statistics, in eval mode
    assert_close_rel(cl.GGN(problem).to_dense(), cl.GGN(_problem(frozen, eval_mode=False)).to_dense(), 1e-14)
    assert_close_rel(cl.Hessian(problem).to_dense(), reference.hessian_matrix(problem), 1e-10, "Hessian")
    assert all(m.training for m in model.modules())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


class CountingModule(nn.Module):
    """Writes a buffer in its forward pass, as a running statistic would."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_a_forward_pass_that_writes_a_buffer_is_refused_and_undone():
    model = CountingModule().to(F64)
    X = torch.randn(5, 4, dtype=F64)
    with pytest.raises(cl.UnsupportedError, match="writes its buffer 'calls' in place"):
        cl.Problem(model, nn.MSELoss(), (X, torch.randn(5, 3, dtype=F64)))
    assert model.calls.item() == 0


def test_dropout_is_off_in_training_mode_and_other_noise_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).to(F64).train()
    X, y = torch.randn(8, 4, dtype=F64), torch.randn(8, 3, dtype=F64)
    problem = cl.Problem(model, nn.MSELoss(), (X, y), eval_mode=False)
    without = nn.Sequential(model[0], model[2], model[3])  # the same function with no dropout at all
    assert_close_rel(
        cl.GGN(problem).to_dense(), reference.ggn(cl.Problem(without, nn.MSELoss(), (X, y))), 1e-10
    )
    assert_close_rel(cl.Hessian(problem).to_dense(), reference.hessian_matrix(problem), 1e-10)
    assert model[1].training

    class Noise(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x) if self.training else x

    noisy = nn.Sequential(nn.Linear(4, 6), Noise(), nn.Linear(6, 3)).to(F64).train()
    with pytest.raises(cl.UnsupportedError, match="different outputs for the same batch"):
        cl.Problem(noisy, nn.MSELoss(), (X, y), eval_mode=False)
    cl.Problem(noisy, nn.MSELoss(), (X, y))  # eval mode: deterministic
