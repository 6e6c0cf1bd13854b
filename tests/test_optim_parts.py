"""The optimizer's parts alone (schedules, damping, safety, estimate); every optimizer's round trip."""

import copy
import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim
from curvlab.errors import CurvlabError
from curvlab.optim.damping import ConstantDamping, LevenbergMarquardt, reduction_ratio
from curvlab.optim.estimate import CurvatureEstimate
from curvlab.optim.safety import Safety, SkipStep
from curvlab.optim.schedule import Schedule


def test_schedules_fire_on_their_steps():
    assert [s for s in range(12) if Schedule(1).due(s)] == list(range(12))
    assert [s for s in range(12) if Schedule(5).due(s)] == [0, 5, 10]
    schedule = Schedule(4)
    copy_of = Schedule(1)
    copy_of.load_state_dict(schedule.state_dict())
    assert copy_of.every == 4
    with pytest.raises(ValueError, match="inverse_every"):
        Schedule(0, "inverse_every")


def test_levenberg_marquardt_against_hand_computed_dampings():
    policy = LevenbergMarquardt(1.0, factor=0.5, minimum=0.3, every=2)
    assert [policy.due(s) for s in range(5)] == [True, False, True, False, True]
    policy.adapt(0.9)  # ρ > 3/4: λ ω
    assert policy.value == 0.5
    policy.adapt(0.9)  # clamped at the minimum
    assert policy.value == 0.3
    policy.adapt(0.5)  # between: unchanged
    assert policy.value == 0.3
    policy.adapt(0.1)  # ρ < 1/4: λ / ω
    assert policy.value == 0.6
    policy.adapt(reduction_ratio(actual=-1.0, predicted=0.5))  # no predicted decrease: ρ = −∞
    assert policy.value == 1.2 and policy.last_rho == -math.inf
    policy.increase()
    assert policy.value == 12.0
    policy.rejected = 4
    restored = LevenbergMarquardt(7.0)
    restored.load_state_dict(policy.state_dict())
    assert restored.value == 12.0 and restored.schedule.every == 2 and restored.rejected == 4
    constant = ConstantDamping(0.0)
    constant.adapt(0.99)
    assert constant.value == 0.0 and not any(constant.due(s) for s in range(3))
    constant.increase()
    assert constant.value == 1e-8  # a failure raises a zero damping to a floor, then tenfold
    with pytest.raises(ValueError, match="damping_factor"):
        LevenbergMarquardt(1.0, factor=1.5)


def test_safety_counts_warns_undoes_exactly_and_gives_up():
    safety = Safety("Test", max_in_row=2)
    damping = ConstantDamping(1e-3)
    p = torch.tensor([1.0, 2.0], dtype=torch.float64)
    state = {p: {}}
    safety.keep([p], state)
    p.add_(torch.tensor([1e300, 0.0], dtype=torch.float64))  # θ + u − u would lose θ
    assert safety.undo([p], state) and torch.equal(p, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert not safety.undo([p], state)  # nothing kept any more
    with pytest.warns(RuntimeWarning, match="model is unchanged"):
        safety.skip("bad data", damping, bad_weights=False)
    assert damping.value == 1e-3
    with pytest.warns(RuntimeWarning, match="damping raised to 1.0e-02"):
        safety.skip("bad weights", damping)
    with pytest.raises(CurvlabError, match="3 steps in a row"):
        safety.skip("again", damping)
    assert safety.state_dict() == {"skipped_in_row": 3, "skipped": 3}
    safety.succeeded()
    assert safety.skipped_in_row == 0


def test_robust_inverse_retries_in_float64_with_more_damping():
    safety = Safety("Test")
    calls = []

    def make(C, damping):
        calls.append((C.dtype, damping))
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("not yet")
        return C.inverse(damping)

    model, problem = _linear_problem()
    C = cl.KFAC(cl.Problem(model.float(), nn.MSELoss(), problem.data[0]))  # float32 factors
    inverse, used = safety.robust_inverse(make, C, 1e-3)
    assert calls == [(torch.float32, 1e-3), (torch.float64, 1e-2), (torch.float64, 1e-1)]
    assert used == pytest.approx(1e-1) and inverse.dtype == torch.float32


def _linear_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).double()
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    return model, cl.Problem(
        model, nn.MSELoss(), (X, torch.randn(10, 2, generator=generator, dtype=torch.float64))
    )


def test_curvature_estimate_refreshes_averages_and_inverts_on_its_schedules():
    model, problem = _linear_problem()
    built = []

    def build(problem, step):
        built.append(step)
        return cl.KFAC(problem, fisher_type="type-2")

    def invert(C, damping):
        return C.inverse(damping)

    estimate = CurvatureEstimate(Schedule(2), Schedule(3), 0.5)
    safety = Safety("Test")
    inverted = []
    for step in range(7):
        estimate.refresh(step, build, lambda batch: problem, problem.data[0])
        if estimate.inverse_due(step):
            estimate.refresh_inverse(invert, 0.1, safety)
            inverted.append(step)
    assert built == [0, 2, 4, 6] and inverted == [0, 3, 6]
    assert type(estimate.curvature) is cl.KFAC  # the running average of KFACs is a KFAC
    fresh = cl.KFAC(problem, fisher_type="type-2")
    torch.testing.assert_close(estimate.curvature.to_dense(), fresh.to_dense())  # same batch each time
    state = copy.deepcopy(estimate.state_dict())
    again = CurvatureEstimate(Schedule(1), Schedule(1), 0.5)
    like = (estimate.curvature.param_shapes, estimate.curvature.param_names, torch.float64, "cpu")
    again.load_state_dict(state, build, invert, lambda batch: problem, like, safety)
    assert again.statistics.every == 2 and again.inverses.every == 3 and again.counts == estimate.counts
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert torch.equal(again.inverse @ v, estimate.inverse @ v)


def test_a_non_finite_estimate_is_skipped_and_changes_nothing():
    model, problem = _linear_problem()
    nan = torch.full((8,), float("nan"), dtype=torch.float64)
    bad = cl.Diagonal.from_tensor(nan, [torch.Size((2, 3)), torch.Size((2,))], None)
    estimate = CurvatureEstimate(Schedule(1), Schedule(1), 0.0)
    with pytest.raises(SkipStep, match="not finite"):
        estimate.refresh(0, lambda p, s: bad, lambda batch: problem, problem.data[0])
    assert estimate.curvature is None


def _data(seed):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    return X, torch.randint(0, 3, (16,), generator=generator)


OPTIMIZERS = {
    "KFAC": lambda m, lf: optim.KFAC(m, lf, lr=0.1, momentum=0.5, curvature_every=3, inverse_every=2),
    "KFAC rescaled": lambda m, lf: optim.KFAC(
        m, lf, rescale="ggn", damping_policy="levenberg-marquardt", damping_every=2, rescale_examples=8
    ),
    "KFAC rejecting uphill": lambda m, lf: optim.KFAC(
        m, lf, lr=3.0, pi_damping=True, damping_policy="levenberg-marquardt", reject_uphill=True
    ),
    "EKFAC": lambda m, lf: optim.EKFAC(m, lf, lr=0.1, curvature_every=2),
    "ACP": lambda m, lf: optim.ACP(m, lf, lr=0.1, momentum=0.9, curvature_every=4, ema_decay=0.5),
    "DiagonalGGN": lambda m, lf: optim.DiagonalGGN(m, lf, lr=0.1, damping=0.1),
    "Newton": lambda m, lf: optim.Newton(m, lf, curvature="ggn", lr=0.5, damping=0.1),
    "HessianFree": lambda m, lf: optim.HessianFree(m, lf, lr=0.5, cg_tol=1e-10),
    "CenteredSGD": lambda m, lf: optim.CenteredSGD(m, lf, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_bit_identically_for_20_steps(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data(seed) for seed in range(25)]

    def run(model, opt, chunk):
        for batch in chunk:

            def closure(batch=batch):
                opt.zero_grad()
                loss = loss_fn(model(batch[0]), batch[1])
                loss.backward()
                return loss

            opt.step(closure, batch=batch)

    straight_model = copy.deepcopy(model)
    run(straight_model, OPTIMIZERS[name](straight_model, loss_fn), batches)
    first = OPTIMIZERS[name](model, loss_fn)
    run(model, first, batches[:5])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(first.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(saved_model)
    second = OPTIMIZERS[name](resumed_model, loss_fn)
    second.load_state_dict(saved)
    run(resumed_model, second, batches[5:])
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_dropped_optimizer_is_freed_at_once(name):
    """No reference cycle through the parts: the optimizer (and what it holds) goes with its last name."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = OPTIMIZERS[name](model, loss_fn)
    batch = _data(0)

    def closure():
        model.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    opt.step(closure, batch=batch)
    alive = weakref.ref(opt)
    del opt
    gc.disable()
    try:
        assert alive() is None  # by reference counting, before any cycle collection
    finally:
        gc.enable()
    assert all(not m._forward_hooks for m in model.modules())
