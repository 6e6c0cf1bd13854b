"""Optimizers: exactness where provable, thesis formulas by hand, amortisation, safety, state."""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim, reference
from curvlab.errors import CurvlabError
from tests.helpers import assert_close_rel


def _regression(n=40, d=3, out=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    Y = torch.randn(n, out, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(d, out).double(), nn.MSELoss(), (X, Y)


def _least_squares(model, X, Y):
    design = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    solution = torch.linalg.lstsq(design, Y).solution  # (d + 1, out)
    return solution[:-1].T, solution[-1]


def _closure(model, loss_fn, batch, optimizer):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_newton_and_natural_gradient_solve_least_squares_in_one_step(curvature):
    model, loss_fn, batch = _regression()
    opt = optim.Newton(model, loss_fn, curvature=curvature, lr=1.0, damping=0.0)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    weight, bias = _least_squares(model, *batch)
    torch.testing.assert_close(model.weight.detach(), weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.bias.detach(), bias, rtol=1e-10, atol=1e-10)


def test_kfac_on_one_linear_layer_with_mse_is_the_exact_natural_gradient():
    model, loss_fn, batch = _regression()
    reference = copy.deepcopy(model)
    kfac = optim.KFAC(model, loss_fn, fisher_type="type-2", lr=0.5, damping=1e-3, ema_decay=0.0)
    kfac.step(_closure(model, loss_fn, batch, kfac), batch=batch)
    natural = optim.Newton(reference, loss_fn, curvature="fisher", lr=0.5, damping=1e-3)
    natural.step(_closure(reference, loss_fn, batch, natural), batch=batch)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def _mlp_problem(seed=0, n=32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return model, nn.CrossEntropyLoss(), (X, y)


def _hooks(model, loss_fn, batch):
    """Per-layer inputs h_n and δ_n = ∂(Σ ℓ)/∂a_n by plain autograd (independent of curvlab)."""
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0], output

        return hook

    handles = [
        m.register_forward_hook(record(k)) for k, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")
    for handle in handles:
        handle.remove()
    deltas = torch.autograd.grad(loss, [outputs[k] for k in outputs])
    return inputs, dict(zip(outputs, deltas))


def test_acp_update_matches_equations_6_3_3_and_6_3_4():
    model, loss_fn, batch = _mlp_problem()
    alpha, damping, lr = 0.7, 1e-3, 0.1
    before = copy.deepcopy(model)
    inputs, deltas = _hooks(before, loss_fn, batch)
    n = batch[0].shape[0]
    opt = optim.ACP(model, loss_fn, alpha=alpha, lr=lr, damping=damping)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    for name in ("0", "2"):
        h, delta = inputs[name], deltas[name]
        mean = h.mean(0)
        # The ACP block αI ⊗ A with A the uncentered second moment of [h; 1]: by the Schur complement its
        # inverse gives eq. 6.3.3-6.3.4 with C the covariance; Tikhonov λ acts on the whole A (§6.4.2).
        augmented = torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1)
        A = augmented.T @ augmented / n
        gradient = torch.cat([delta.T @ h, delta.sum(0, keepdim=True).T], 1) / n  # c Σ δ ãᵀ
        step = gradient @ torch.linalg.inv(alpha * A + damping * torch.eye(A.shape[0], dtype=A.dtype))
        layer, old = dict(model.named_modules())[name], dict(before.named_modules())[name]
        torch.testing.assert_close(layer.weight - old.weight, -lr * step[:, :-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias - old.bias, -lr * step[:, -1], rtol=1e-9, atol=1e-12)
        # Without damping this is exactly the thesis' centered form:
        covariance = (h - mean).T @ (h - mean) / n
        dW = (delta.T @ (h - mean) / n) @ torch.linalg.inv(covariance) / alpha
        db = delta.sum(0) / n / alpha - dW @ mean
        exact = torch.linalg.inv(alpha * A)
        torch.testing.assert_close(gradient @ exact, torch.cat([dW, db[:, None]], 1), rtol=1e-8, atol=1e-10)


def test_centered_sgd_matches_algorithm_2():
    model, loss_fn, batch = _mlp_problem()
    before = copy.deepcopy(model)
    inputs, deltas = _hooks(before, loss_fn, batch)
    n, lr = batch[0].shape[0], 0.3
    opt = optim.CenteredSGD(model, loss_fn, lr=lr)
    opt.step(batch=batch)
    for name in ("0", "2"):
        h, delta = inputs[name], deltas[name]
        layer, old = dict(model.named_modules())[name], dict(before.named_modules())[name]
        expected_W = old.weight - lr * delta.T @ (h - h.mean(0)) / n
        expected_b = old.bias - lr * delta.sum(0) / n
        torch.testing.assert_close(layer.weight, expected_W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias, expected_b, rtol=1e-10, atol=1e-12)


def test_amortisation_counts():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.KFAC(model, loss_fn, lr=0.1, curvature_every=3, inverse_every=2)
    for _ in range(7):
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert opt.counts["curvature"] == 3  # steps 0, 3, 6
    # inverses at every 2nd step only (0, 2, 4, 6): a new curvature waits for the next refresh
    assert opt.counts["inverse"] == 4
    assert opt._inverse_curvature is opt.curvature  # step 6 refreshed both
    assert isinstance(opt.curvature, cl.BlockDiagonalOperator)


def test_curvature_is_a_regular_curvature_object():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.KFAC(model, loss_fn, fisher_type="type-2", lr=0.1, ema_decay=0.0)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    problem = cl.Problem(model, loss_fn, batch)
    report = cl.compare(opt.curvature, cl.GGN(problem), k=2)
    assert 0 <= report.overall["rel_frobenius"] < 1
    assert cl.top_eigen(opt.curvature, 1, progress=False).values[0] > 0


@pytest.mark.parametrize("train", [True, False], ids=["training_mode", "eval_mode"])
def test_curvature_is_of_the_function_being_trained(train):
    """A model trained in training mode: batch norm's batch statistics, dropout off; in eval mode, eval."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 2))
    model = model.double().train(train)
    with torch.no_grad():
        model[1].running_mean.normal_()  # far from the batch statistics
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.KFAC(model, loss_fn, fisher_type="type-2", lr=0.1, ema_decay=0.0, other_structure="exact")
    before_step = copy.deepcopy(model)
    opt.step(lambda: loss_fn(model(X), y), batch=(X, y))
    expected = cl.KFAC(cl.Problem(before_step, loss_fn, (X, y), eval_mode=not train), other_structure="exact")
    assert_close_rel(opt.curvature.to_dense(), expected.to_dense(), 1e-12, "optimizer curvature")
    if train:  # not the eval-mode curvature
        other = cl.KFAC(cl.Problem(before_step, loss_fn, (X, y)), other_structure="exact").to_dense()
        assert (other - expected.to_dense()).norm() > 1e-3 * other.norm()
    # Only the closure's forward pass counted as a training batch; the curvature passes did not.
    assert model[1].num_batches_tracked.item() == (1 if train else 0)


def test_parameter_groups_have_their_own_learning_rates():
    model, loss_fn, batch = _mlp_problem()
    twin = copy.deepcopy(model)
    groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = optim.DiagonalGGN(model, loss_fn, groups, lr=1.0, damping=1e-2)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert torch.equal(model[0].weight, twin[0].weight)
    assert not torch.equal(model[2].weight, twin[2].weight)


def test_step_returns_the_closure_loss_and_requires_a_batch():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.EKFAC(model, loss_fn, lr=0.1)
    loss = opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert loss.item() == pytest.approx(
        nn.functional.cross_entropy(copy.deepcopy(model)(batch[0]), batch[1]).item(), rel=0.5
    )
    with pytest.raises(ValueError, match="batch"):
        opt.step(_closure(model, loss_fn, batch, opt))


@pytest.mark.parametrize("part", [0, 1], ids=["inputs", "targets"])
def test_a_batch_with_nan_is_skipped_and_changes_nothing(part):
    """Bad data is not bad weights: the previous good update stays, the damping too."""
    model, loss_fn, batch = _regression()
    opt = optim.KFAC(model, loss_fn, lr=0.1, damping=1e-3, momentum=0.9)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)  # a good update to keep
    before = [p.clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    bad = [batch[0].clone(), batch[1].clone()]
    bad[part].view(-1)[0] = float("nan")
    with pytest.warns(
        RuntimeWarning, match=f"skipped \\(the {['inputs', 'targets'][part]} of the batch .*unchanged"
    ):
        opt.step(_closure(model, loss_fn, bad, opt), batch=tuple(bad))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert opt.damping == 1e-3 and opt.counts["skipped"] == 1
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)  # goes on normally
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_loss_on_finite_data_raises_damping():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.KFAC(model, loss_fn, lr=0.1, damping=1e-3)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # bad weights
    with pytest.warns(RuntimeWarning, match="skipped .*damping raised to 1.0e-02"):
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert opt.damping == pytest.approx(1e-2)


def test_failed_inverse_is_retried_with_more_damping():
    model, loss_fn, batch = _regression()
    opt = optim.Newton(model, loss_fn, curvature="hessian", damping=0.0)
    model.weight.data.zero_()
    batch = (torch.zeros_like(batch[0]), batch[1])  # H is singular: the undamped inverse fails
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert opt.damping > 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_unrecoverable_inverse_is_a_clear_error():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.Newton(model, loss_fn, curvature="hessian", damping=0.0)
    opt.make_inverse = lambda C, damping: (_ for _ in ()).throw(torch.linalg.LinAlgError("boom"))
    with pytest.raises(CurvlabError, match="could not be inverted"):
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)


@pytest.mark.parametrize(
    "name", ["KFAC", "EKFAC", "ACP", "DiagonalGGN", "HessianFree", "KFAC rescaled", "KFAC stale-inverse"]
)
def test_state_dict_round_trip_is_bit_identical(name):
    options = {"lr": 0.1, "momentum": 0.9, "curvature_every": 2, "damping_policy": "levenberg-marquardt"}
    if name.endswith("rescaled"):  # the previous update δ₀ is part of the state
        name, options = name.split()[0], {**options, "momentum": 0.0, "rescale": "ggn"}
    if name.endswith("stale-inverse"):  # resumed between a curvature refresh and an inverse refresh
        name, options = name.split()[0], {**options, "curvature_every": 1, "inverse_every": 4}
    model, loss_fn, batch = _mlp_problem()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (batch[0] + 0.1 * torch.randn(batch[0].shape, generator=generator, dtype=torch.float64), batch[1])
        for _ in range(6)
    ]

    def run(model, opt, chunk):
        for b in chunk:
            opt.step(_closure(model, loss_fn, b, opt), batch=b)

    straight = getattr(optim, name)(model, loss_fn, **options)
    resumed_model = copy.deepcopy(model)
    run(model, straight, batches)
    first = getattr(optim, name)(resumed_model, loss_fn, **options)
    run(resumed_model, first, batches[:3])
    saved_model = copy.deepcopy(resumed_model.state_dict())
    saved = copy.deepcopy(first.state_dict())
    assert ("inverse_curvature" in saved["curvlab"]["estimate"]) == (options.get("inverse_every", 2) > 2)
    fresh_model = copy.deepcopy(resumed_model)
    fresh_model.load_state_dict(saved_model)
    second = getattr(optim, name)(fresh_model, loss_fn, **options)
    second.load_state_dict(saved)
    run(fresh_model, second, batches[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), name
    assert second.damping == straight.damping


@pytest.mark.parametrize("other", ["exact", "diagonal"])
def test_kfac_optimizer_with_other_structure_trains_and_resumes_bit_identically(other):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    _, loss_fn, batch = _mlp_problem()
    options = {"lr": 0.2, "momentum": 0.5, "damping": 0.1, "curvature_every": 2, "other_structure": other}
    with pytest.raises(cl.UnsupportedError, match="LayerNorm"):
        optim.KFAC(model, loss_fn, lr=0.1).step(lambda: None, batch=batch)
    straight_model, resumed_model = copy.deepcopy(model), copy.deepcopy(model)
    straight = optim.KFAC(straight_model, loss_fn, **options)
    losses = [
        straight.step(_closure(straight_model, loss_fn, batch, straight), batch=batch) for _ in range(6)
    ]
    assert losses[-1] < 0.9 * losses[0]
    first = optim.KFAC(resumed_model, loss_fn, **options)
    for _ in range(3):
        first.step(_closure(resumed_model, loss_fn, batch, first), batch=batch)
    second = optim.KFAC(resumed_model, loss_fn, **options)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for _ in range(3):
        second.step(_closure(resumed_model, loss_fn, batch, second), batch=batch)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_momentum_buffers_are_in_the_state_dict():
    model, loss_fn, batch = _mlp_problem()
    opt = optim.KFAC(model, loss_fn, lr=0.1, momentum=0.9)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    state = opt.state_dict()
    assert len(state["state"]) == 4 and "momentum_buffer" in state["state"][0]
    assert state["curvlab"]["estimate"]["curvature"]["type"] == "BlockDiagonal"
    assert set(state["state"][0]) == {"momentum_buffer", "previous_value"}  # no scratch tensors


def test_curvature_learning_rate_is_inverse_top_hessian_eigenvalue():
    model, loss_fn, batch = _mlp_problem()
    lr = optim.curvature_learning_rate(model, loss_fn, batch)
    H = cl.Hessian(cl.Problem(model, loss_fn, batch)).to_dense()
    assert lr == pytest.approx(1 / torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)


# ------------------------------------------------------------ second order beats tuned SGD
def _ill_conditioned_regression(seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 2, 6, dtype=torch.float64)  # input scales 1 … 100: κ(H) ~ 10⁴
    X = torch.randn(64, 6, generator=generator, dtype=torch.float64) * scales
    W = torch.randn(2, 6, generator=generator, dtype=torch.float64) / scales
    Y = X @ W.T + 0.01 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 2)).double()
    return model, nn.MSELoss(), (X, Y)


def _steps_to_target(make_opt, target, max_steps=300, second_order=True):
    model, loss_fn, batch = _ill_conditioned_regression()
    opt = make_opt(model, loss_fn)
    for step in range(1, max_steps + 1):
        closure = _closure(model, loss_fn, batch, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if second_order:
                opt.step(closure, batch=batch)
            else:
                opt.step(closure)
        with torch.no_grad():
            loss = loss_fn(model(batch[0]), batch[1]).item()
        if loss <= target:
            return step
    return max_steps + 1


def test_second_order_optimizers_beat_tuned_sgd_on_an_ill_conditioned_problem():
    target = 2e-4  # noise floor ≈ 1e-4
    sgd_steps = min(
        _steps_to_target(
            lambda m, lf, lr=lr: torch.optim.SGD(m.parameters(), lr=lr), target, second_order=False
        )
        for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    )
    factories = {
        "Newton": lambda m, lf, lr: optim.Newton(m, lf, lr=lr),
        "HessianFree": lambda m, lf, lr: optim.HessianFree(m, lf, lr=lr, damping=1e-4, cg_iterations=20),
        "KFAC": lambda m, lf, lr: optim.KFAC(m, lf, fisher_type="type-2", lr=lr, damping=1e-4, ema_decay=0.0),
        "EKFAC": lambda m, lf, lr: optim.EKFAC(
            m, lf, fisher_type="type-2", lr=lr, damping=1e-4, ema_decay=0.0
        ),
        "ACP": lambda m, lf, lr: optim.ACP(m, lf, alpha=1.0, lr=lr, damping=1e-4),
    }
    for name, factory in factories.items():
        steps = min(
            _steps_to_target(lambda m, lf, lr=lr, factory=factory: factory(m, lf, lr), target)
            for lr in (0.1, 0.3, 1.0)
        )
        assert steps < sgd_steps, f"{name}: {steps} steps, tuned SGD {sgd_steps}"


def test_optimizer_curvature_can_be_stored(tmp_path):
    model, loss_fn, batch = _mlp_problem()
    opt = optim.KFAC(model, loss_fn, lr=0.1, ema_decay=0.5)
    for _ in range(2):
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    store = cl.Store(tmp_path / "run.h5")
    store.save("optimizer KFAC", opt.curvature, step=2)
    store.save("optimizer KFAC", cl.eigvalsh(opt.curvature), step=2)
    factors = store.records(kind="kfac_factors")[0].data
    assert set(factors) == {"0", "2"}  # the running average is a KFAC: keyed by layer, as cl.KFAC's
    assert factors["0"]["A"].shape == (5, 5)


def test_finiteness_check_is_exact():
    """The sum-first check: overflowing finite sums are finite, any NaN/Inf entry is not."""
    from curvlab.optim.base import all_finite

    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries, the sum overflows
    assert all_finite([big, torch.zeros(3)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[2] = bad
        assert not all_finite([torch.zeros(2), t])
    mixed = torch.tensor([float("inf"), -float("inf")])  # sum NaN
    assert not all_finite([mixed])


def test_a_diverging_update_is_undone_and_endless_skipping_is_an_error():
    """A finite update that blows the loss up is taken back at the next step."""
    model, loss_fn, batch = _regression()
    opt = optim.KFAC(model, loss_fn, lr=1.0, damping=1e-3, momentum=0.9)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    good = [p.clone() for p in model.parameters()]
    with torch.no_grad():  # simulate an update that overflowed the loss
        for p in model.parameters():
            opt.state[p]["previous_value"] = p.clone()
            p.add_(1e300)  # float64: the squared error overflows
    with pytest.warns(RuntimeWarning, match="undone"):
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), good))
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    bad = (torch.full_like(batch[0], float("nan")), batch[1])
    with pytest.raises(cl.CurvlabError, match="in a row"):
        with pytest.warns(RuntimeWarning):
            for _ in range(20):
                opt.step(_closure(model, loss_fn, bad, opt), batch=bad)


def test_levenberg_marquardt_takes_back_a_step_that_makes_the_loss_non_finite():
    model, loss_fn, batch = _regression()
    opt = optim.KFAC(model, loss_fn, lr=1e300, damping=1e-3, damping_policy="levenberg-marquardt")
    before = [p.clone() for p in model.parameters()]
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.damping == pytest.approx(1e-2)


def test_levenberg_marquardt_rejects_an_uphill_step_exactly_when_asked():
    """reject_uphill: a step that raises the minibatch loss is taken back bit-exactly, λ grows."""
    options = {"fisher_type": "type-2", "damping": 1e-3, "damping_policy": "levenberg-marquardt"}
    outcomes = {}
    for lr, reject in [(5.0, True), (5.0, False), (0.5, True)]:
        model, loss_fn, batch = _regression()
        opt = optim.KFAC(model, loss_fn, lr=lr, momentum=0.9, reject_uphill=reject, **options)
        before = [p.clone() for p in model.parameters()]
        loss = opt.step(_closure(model, loss_fn, batch, opt), batch=batch).item()
        after = loss_fn(model(batch[0]), batch[1]).item()
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        momentum = any("momentum_buffer" in opt.state[p] for p in model.parameters())
        outcomes[lr, reject] = (unchanged, opt.counts["rejected"], opt.damping, after <= loss, momentum)
    # Five Newton steps on a quadratic overshoot: uphill; taken back and λ ← λ/ω.
    assert outcomes[5.0, True] == (True, 1, pytest.approx(1e-3 * 1.5), True, False)
    assert outcomes[5.0, False] == (False, 0, pytest.approx(1e-3 * 1.5), False, True)  # kept
    assert outcomes[0.5, True] == (False, 0, pytest.approx(1e-3 / 1.5), True, True)  # downhill: kept
    model, loss_fn, _ = _regression()
    with pytest.raises(ValueError, match="levenberg-marquardt"):
        optim.KFAC(model, loss_fn, reject_uphill=True)


def _flatten(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _quadratic_model_minimum(E, g, columns, damping):
    """The x minimising m(x) = gᵀVx + ½ xᵀVᵀ(E + λI)Vx, and m(x), by dense float64 algebra."""
    V = torch.stack(columns, dim=1)
    A = V.T @ (E + damping * torch.eye(E.shape[0], dtype=E.dtype)) @ V
    x = torch.linalg.solve(A, -(V.T @ g))
    return x, (g @ V @ x + 0.5 * x @ A @ x).item()


def test_rescaled_step_minimises_the_exact_quadratic_model_over_direction_and_previous_update():
    model, loss_fn, batch = _mlp_problem()
    damping = 1e-2
    opt = optim.KFAC(model, loss_fn, fisher_type="mc", damping=damping, rescale="ggn", lr=1.0)
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        previous = [opt.state[p].get("last_update") for p in model.parameters()]
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
        update = _flatten([p.detach() - b for p, b in zip(model.parameters(), before)])
        # Recompute everything densely at the parameters before the step.
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, b in zip(probe.parameters(), before):
                p.copy_(b)
        E = reference.ggn(cl.Problem(probe, loss_fn, batch))
        params = list(probe.parameters())
        g = torch.autograd.grad(loss_fn(probe(batch[0]), batch[1]), params)
        delta = -_flatten(opt.curvature.inverse(damping) @ list(g))  # KFAC's direction, as the step used
        columns = [delta] if step == 0 else [delta, _flatten(previous)]
        x, _ = _quadratic_model_minimum(E, _flatten(g), columns, damping)
        torch.testing.assert_close(update, torch.stack(columns, dim=1) @ x, rtol=1e-7, atol=1e-10)
        assert opt.last_rescale[0] == pytest.approx(x[0].item(), rel=1e-7)
        assert len(opt.last_rescale) == len(columns)


def test_rescaled_kfac_takes_the_exact_newton_step_where_kfac_is_exact():
    # One linear layer with MSE: KFAC is the exact GGN, so α = 1 and the step is the least-squares solution.
    model, loss_fn, batch = _regression()
    opt = optim.KFAC(model, loss_fn, fisher_type="type-2", damping=0.0, rescale="ggn", min_damping=0.0)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert opt.last_rescale[0] == pytest.approx(1.0, rel=1e-9)
    weight, bias = _least_squares(model, *batch)
    torch.testing.assert_close(model.weight.detach(), weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model.bias.detach(), bias, rtol=1e-9, atol=1e-10)


def test_rescale_options_are_checked():
    model, loss_fn, _ = _regression()
    with pytest.raises(ValueError, match="momentum=0"):
        optim.KFAC(model, loss_fn, rescale="ggn", momentum=0.9)
    with pytest.raises(ValueError, match="rescale must be"):
        optim.KFAC(model, loss_fn, rescale="newton")
    with pytest.raises(ValueError, match="damping_factor"):
        optim.KFAC(model, loss_fn, damping_factor=1.5)


@pytest.mark.parametrize("name", ["KFAC", "HessianFree"])
def test_a_curvature_batch_with_nan_skips_the_step(name):
    model, loss_fn, batch = _mlp_problem()
    bad = (batch[0].clone(), batch[1])
    bad[0][3, 1] = float("nan")
    opt = getattr(optim, name)(model, loss_fn, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="step skipped .the inputs of the batch have NaN"):
        opt.step(_closure(model, loss_fn, batch, opt), batch=bad)  # the gradient is fine, the curvature not
    assert opt.counts["skipped"] == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)  # and training goes on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _other_shapes():
    """Two models with as many tensors of other shapes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)
    )


@pytest.mark.parametrize("steps", [0, 1])
@pytest.mark.parametrize("name", ["KFAC", "HessianFree", "CenteredSGD"])
def test_loading_the_state_of_another_model_is_refused(name, steps):
    small, large = _other_shapes()
    loss_fn = nn.MSELoss()
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    options = {"momentum": 0.9} if name == "CenteredSGD" else {}
    first = getattr(optim, name)(small, loss_fn, lr=0.1, **options)
    for _ in range(steps):
        first.step(_closure(small, loss_fn, batch, first), batch=batch)
    second = getattr(optim, name)(large, loss_fn, lr=0.1, **options)
    if steps == 0 and name == "CenteredSGD":
        second.load_state_dict(first.state_dict())  # no tensor state to tell the shapes by
        return
    with pytest.raises(ValueError, match=r"state is of another model: parameter 0 has shape \(4, 3\)"):
        second.load_state_dict(first.state_dict())


@pytest.mark.parametrize("other", ["exact", "diagonal"])
def test_pi_damping_with_other_structure(other):
    """π-damping factors the Kronecker blocks; a LayerNorm's block (exact or diagonal) is damped exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn, batch = (
        nn.MSELoss(),
        (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)),
    )
    K = cl.KFAC(cl.Problem(model, loss_fn, batch), other_structure=other)
    damping = 0.1
    inverse = K.inverse(damping, pi_damping=True)
    for block, inverted in zip(K.blocks(), inverse.blocks()):
        if isinstance(block, cl.KroneckerBlock):
            continue
        dense = block.to_dense()
        expected = torch.linalg.inv(dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype))
        assert_close_rel(inverted.to_dense(), expected, 1e-10, f"{other} block")
    v = torch.randn(K.shape[0], dtype=torch.float64)
    assert_close_rel(K.solve(v, damping, pi_damping=True), inverse @ v, 1e-14)
    opt = optim.KFAC(model, loss_fn, lr=0.1, damping=damping, pi_damping=True, other_structure=other)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_running_average_of_kfac_is_a_kfac_comparable_with_the_exact_ggn(tmp_path):
    """ema_decay averages A and G layer by layer; the average stays a ``cl.KFAC`` at every step."""
    model, loss_fn, batch = _mlp_problem()
    generator = torch.Generator().manual_seed(2)
    batches = [
        (batch[0] + 0.3 * torch.randn(batch[0].shape, generator=generator, dtype=torch.float64), batch[1])
        for _ in range(3)
    ]
    decay = 0.7
    opt = optim.KFAC(model, loss_fn, fisher_type="type-2", lr=0.05, ema_decay=decay)
    expected = None
    for b in batches:
        fresh = cl.KFAC(cl.Problem(model, loss_fn, b), fisher_type="type-2")  # before the step moves θ
        opt.step(_closure(model, loss_fn, b, opt), batch=b)
        if expected is None:
            expected = {name: factors for name, factors in fresh.factors.items()}
        else:
            expected = {
                name: tuple(decay * old + (1 - decay) * new for old, new in zip(expected[name], factors))
                for name, factors in fresh.factors.items()
            }
        assert type(opt.curvature) is cl.KFAC
        for name, (A, G) in opt.curvature.factors.items():
            assert_close_rel(A, expected[name][0], 1e-12, f"A of {name}")
            assert_close_rel(G, expected[name][1], 1e-12, f"G of {name}")
        exact = cl.GGN(cl.Problem(model, loss_fn, b))
        report = cl.compare(opt.curvature, exact, k=2)
        assert 0 < report.overall["rel_frobenius"] < 2
    store = cl.Store(tmp_path / "run.h5")
    store.save("averaged kfac", opt.curvature)  # stored as factors, as any KFAC
    (record,) = store.records(name="averaged kfac")
    assert_close_rel(record.result().to_dense(), opt.curvature.to_dense(), 1e-14)


def test_a_problem_on_the_next_batch_skips_only_the_model_check_it_has_made():
    """``Problem.on_batch``: counts anew, the forward check only when the batch's shapes change."""
    model, loss_fn, batch = _mlp_problem()
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    problem = cl.Problem(model, loss_fn, batch)
    assert len(calls) == 1  # the constructor's check
    other = (batch[0] * 2, batch[1].flip(0))
    again = problem.on_batch(other)
    assert len(calls) == 1  # same shapes: no forward pass
    fresh = cl.Problem(model, loss_fn, other)
    v = torch.randn(fresh.num_params, dtype=torch.float64)
    assert torch.equal(cl.GGN(again) @ v, cl.GGN(fresh) @ v)
    assert (again.num_terms, again.reduction_factor) == (fresh.num_terms, fresh.reduction_factor)
    calls.clear()
    smaller = problem.on_batch((batch[0][:5], batch[1][:5]))
    assert len(calls) == 1 and smaller.num_examples == 5  # other shapes: checked again
    with pytest.raises(cl.DataError):
        problem.on_batch((batch[0], batch[1][:5]))  # the constructor's data checks still apply
    hook.remove()


def test_rescaled_step_on_a_subsample_minimises_the_subsample_quadratic_model():
    """rescale_examples=m: E of the first m examples, the gradient of the whole batch."""
    model, loss_fn, batch = _mlp_problem()
    damping = 1e-2
    opt = optim.KFAC(
        model,
        loss_fn,
        fisher_type="type-2",
        damping=damping,
        rescale="ggn",
        rescale_examples=8,
        ema_decay=0.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
    update = _flatten([p.detach() - b for p, b in zip(model.parameters(), before)])
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, b in zip(probe.parameters(), before):
            p.copy_(b)
    E = reference.ggn(cl.Problem(probe, loss_fn, (batch[0][:8], batch[1][:8])))
    g = torch.autograd.grad(loss_fn(probe(batch[0]), batch[1]), list(probe.parameters()))
    delta = -_flatten(opt.curvature.inverse(damping) @ list(g))
    x, _ = _quadratic_model_minimum(E, _flatten(g), [delta], damping)
    torch.testing.assert_close(update, delta * x[0], rtol=1e-7, atol=1e-10)


def test_curvature_on_a_subsample_and_damping_adapted_every_few_steps():
    model, loss_fn, batch = _mlp_problem()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    opt = optim.KFAC(
        model,
        loss_fn,
        fisher_type="type-2",
        lr=0.1,
        ema_decay=0.0,
        curvature_examples=10,
        damping_policy="levenberg-marquardt",
        damping_every=3,
    )
    head = cl.Problem(copy.deepcopy(model), loss_fn, (batch[0][:10], batch[1][:10]))
    expected = cl.KFAC(head, fisher_type="type-2").to_dense()
    opt.step(closure, batch=batch)
    assert_close_rel(opt.curvature.to_dense(), expected, 1e-12, "curvature of the first 10 examples")
    for _ in range(6):
        opt.step(closure, batch=batch)
    assert len(calls) == 7 + 3  # one closure per step, one more at the adapting steps 0, 3, 6
    with pytest.raises(ValueError, match="rescale_examples"):
        optim.KFAC(model, loss_fn, rescale_examples=4)
    with pytest.raises(ValueError, match="damping_every"):
        optim.KFAC(model, loss_fn, damping_every=0)
