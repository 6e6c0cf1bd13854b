"""Kronecker preconditioning from the gradient's factors: same result as the ordinary route, or not taken."""

import copy

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim
from curvlab.errors import UnsupportedError
from curvlab.structured.kronecker import KroneckerBlock


def _spd(d, generator):
    M = torch.randn(d, d + 3, generator=generator, dtype=torch.float64)
    return M @ M.T / d


@pytest.mark.parametrize("kind", ["kronecker", "scaled identity", "eigenbasis"])
def test_outer_sum_product_is_the_block_applied_to_the_formed_matrix(kind):
    generator = torch.Generator().manual_seed(0)
    d_out, d_A, n = 12, 15, 3
    G, A = _spd(d_out, generator), _spd(d_A, generator)
    if kind == "scaled identity":
        G = 0.7 * torch.eye(d_out, dtype=torch.float64)
    block = KroneckerBlock(G, A, [(d_out, d_A - 1), (d_out,)], True)
    if kind == "eigenbasis":
        block = block.eigenbasis_form().inverse(0.3)
    U = torch.randn(n, d_out, generator=generator, dtype=torch.float64)
    X = torch.randn(n, d_A, generator=generator, dtype=torch.float64)
    expected = block._apply_matrix((U.T @ X).unsqueeze(0))[0]
    torch.testing.assert_close(block.outer_sum_product(U, X), expected, rtol=1e-12, atol=1e-12)
    assert block.prefers_factors(n)
    assert not block.prefers_factors(200)  # n above the widths: forming M is cheaper
    with pytest.raises(ValueError, match=r"expected U \(n, 12\) and X \(n, 15\)"):
        block.outer_sum_product(U, X[:, :-1])


def _wide_mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(30, 40, bias=bias), nn.Tanh(), nn.Linear(40, 50), nn.Sigmoid(), nn.Linear(50, 20)
    ).double()


def _batch(n=6, d_in=30, d_out=20, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d_in, generator=generator, dtype=torch.float64),
        torch.randn(n, d_out, generator=generator, dtype=torch.float64),
    )


OPTIMIZERS = {
    "ACP": lambda m, lf, **kw: optim.ACP(m, lf, lr=0.1, alpha=1.0, damping=0.1, **kw),
    "ACP heuristic": lambda m, lf, **kw: optim.ACP(m, lf, lr=0.1, damping=0.1, **kw),
    "KFAC": lambda m, lf, **kw: optim.KFAC(m, lf, lr=0.1, damping=0.1, **kw),
    "KFAC pi": lambda m, lf, **kw: optim.KFAC(m, lf, lr=0.1, damping=0.1, pi_damping=True, **kw),
    "EKFAC": lambda m, lf, **kw: optim.EKFAC(m, lf, lr=0.1, damping=0.1, curvature_every=2, **kw),
}


def _run(make, model, loss_fn, batches, factored, closure_extra=None, zero_grad=True, **options):
    opt = make(model, loss_fn, **options)
    opt.factored_gradients = factored
    used = []
    for batch in batches:

        def closure(batch=batch):
            if zero_grad:
                opt.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            if closure_extra is not None:
                closure_extra(model)
            return loss

        opt.step(closure, batch=batch)
        used.append(opt.last_factored_blocks)
    return opt, used


def _same_training(make, model, batches, **kwargs):
    """Train copies with and without the factored route; their parameters and the blocks it served."""
    loss_fn = nn.MSELoss()
    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    _, used = _run(make, fast, loss_fn, batches, True, **kwargs)
    _, unused = _run(make, slow, loss_fn, batches, False, **kwargs)
    assert unused == [0] * len(batches)
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return used


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_factored_preconditioning_gives_the_ordinary_steps(name):
    batches = [_batch(seed=s) for s in range(4)]
    used = _same_training(OPTIMIZERS[name], _wide_mlp(), batches)
    assert used == [3] * 4  # every Linear block, every step


def test_layers_without_bias_or_with_a_frozen_bias_use_the_factors_too():
    model = _wide_mlp(bias=False)
    model[2].bias.requires_grad_(False)

    def make(m, lf, **kw):
        return optim.KFAC(m, lf, [p for p in m.parameters() if p.requires_grad], lr=0.1, damping=0.1)

    used = _same_training(make, model, [_batch(seed=2)] * 2)
    assert used == [3, 3]


def _clip(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


@pytest.mark.parametrize(
    "options",
    [
        {"closure_extra": _clip},  # the gradient was changed after backward
        {"weight_decay": 1e-2},  # the preconditioned gradient is not the minibatch gradient
        {"zero_grad": False},  # gradients accumulated over steps
    ],
    ids=["clipped", "weight decay", "accumulated"],
)
def test_a_gradient_that_is_not_the_factors_product_takes_the_ordinary_route(options):
    batches = [_batch(seed=s) for s in range(3)]
    used = _same_training(OPTIMIZERS["KFAC"], _wide_mlp(), batches, **options)
    assert used[1:] == [0, 0]  # (the first accumulated step still holds one gradient)


def test_a_layer_used_twice_takes_the_ordinary_route():
    torch.manual_seed(0)
    shared = nn.Linear(20, 20).double()
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), shared, nn.Tanh(), shared).double()
    make = OPTIMIZERS["KFAC"]
    with pytest.raises(UnsupportedError, match="used 2 times"):
        _same_training(make, model, [_batch(seed=3)])
    used = _same_training(
        lambda m, lf, **kw: make(m, lf, other_structure="exact", **kw), model, [_batch(seed=3)] * 2
    )
    assert used == [1, 1]  # only the first layer: the shared one has an exact block


def test_conv_layers_take_the_ordinary_route():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 60), nn.Tanh(), nn.Linear(60, 20)
    )
    model = model.double()
    generator = torch.Generator().manual_seed(4)
    batch = (
        torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64),
        torch.randn(3, 20, generator=generator, dtype=torch.float64),
    )
    used = _same_training(OPTIMIZERS["KFAC"], model, [batch] * 2)
    assert used == [2, 2]


def test_recording_hooks_are_removed_even_when_the_closure_fails():
    model = _wide_mlp()
    opt = OPTIMIZERS["KFAC"](model, nn.MSELoss())

    def failing():
        model(_batch()[0])
        raise RuntimeError("boom")

    def only_the_optimizers_own_hooks():
        # the optimizer's one observing hook per Linear layer (for steps after the user's own
        # backward; removed by close()), nothing of the closure's recording
        return all(
            len(m._forward_hooks) == isinstance(m, nn.Linear)
            and all(getattr(h, "observes_only", False) for h in m._forward_hooks.values())
            for m in model.modules()
        )

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing, batch=_batch())
    assert only_the_optimizers_own_hooks()
    loss = opt.step(lambda: nn.MSELoss()(model(_batch()[0]), _batch()[1]), batch=_batch())
    assert torch.isfinite(loss)
    assert only_the_optimizers_own_hooks()
    assert opt._records is None  # the recorded activations are not kept past the step
    assert all(not record.inputs for record in opt._persistent.values())
    opt.close()
    assert all(not m._forward_hooks for m in model.modules())


def _centered_runs(model, batches, closure_extra=None, with_closure=True, lr=0.3):
    """Params after CenteredSGD steps centered from the closure, and from the batch pass."""
    loss_fn = nn.MSELoss()
    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    fast_opt = optim.CenteredSGD(fast, loss_fn, lr=lr, momentum=0.9)
    slow_opt = optim.CenteredSGD(slow, loss_fn, lr=lr, momentum=0.9)
    used = []
    for batch in batches:

        def closure(batch=batch):
            fast_opt.zero_grad()
            loss = loss_fn(fast(batch[0]), batch[1])
            loss.backward()
            if closure_extra is not None:
                closure_extra(fast)
            return loss

        fast_opt.step(closure if with_closure else None, batch=batch)
        used.append(fast_opt.last_from_closure)
        slow_opt.step(batch=batch)
        assert not slow_opt.last_from_closure
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return used


def test_centered_sgd_centers_the_closure_gradient_like_the_batch_pass():
    assert _centered_runs(_wide_mlp(), [_batch(seed=s) for s in range(3)]) == [True] * 3
    model = _wide_mlp(bias=False)  # no bias: the centering term still uses c Σ δ
    assert _centered_runs(model, [_batch(seed=s) for s in range(2)]) == [True] * 2


def test_centered_sgd_needs_no_batch_for_a_closure_it_can_center():
    model, loss_fn = _wide_mlp(), nn.MSELoss()
    reference = copy.deepcopy(model)
    X, y = _batch()
    opt = optim.CenteredSGD(model, loss_fn, lr=0.3)
    opt.step(lambda: loss_fn(model(X), y).backward())
    ref_opt = optim.CenteredSGD(reference, loss_fn, lr=0.3)
    ref_opt.step(batch=(X, y))
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_centered_sgd_falls_back_to_the_batch_pass():
    batches = [_batch(seed=s) for s in range(2)]
    assert _centered_runs(_wide_mlp(), batches, closure_extra=_clip) == [False, False]
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 36, 20)).double()
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    assert _centered_runs(conv, [(images, targets)]) == [False]
    opt = optim.CenteredSGD(conv, nn.MSELoss(), lr=0.1)
    with pytest.raises(ValueError, match="could not center the closure's gradient"):
        opt.step(lambda: nn.MSELoss()(conv(images), targets).backward())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_after_the_users_own_backward_equals_a_step_with_a_closure(name):
    """``loss.backward(); opt.step(batch=...)``: the hooks' record of that pass, as the closure's."""
    loss_fn = nn.MSELoss()
    with_closure, own_loop = _wide_mlp(), _wide_mlp()
    first = OPTIMIZERS[name](with_closure, loss_fn, fisher_type="type-2") if "KFAC" in name else None
    first = first or OPTIMIZERS[name](with_closure, loss_fn)
    second = OPTIMIZERS[name](own_loop, loss_fn, fisher_type="type-2") if "KFAC" in name else None
    second = second or OPTIMIZERS[name](own_loop, loss_fn)
    for step in range(4):
        batch = _batch(seed=step)

        def closure(batch=batch):
            first.zero_grad()
            loss = loss_fn(with_closure(batch[0]), batch[1])
            loss.backward()
            return loss

        first.step(closure, batch=batch)
        second.zero_grad()
        loss_fn(own_loop(batch[0]), batch[1]).backward()
        with torch.no_grad():
            own_loop(batch[0])  # an evaluation between backward and step: not recorded
        second.step(batch=batch)
        assert second.last_factored_blocks == first.last_factored_blocks > 0
    for p, q in zip(with_closure.parameters(), own_loop.parameters()):
        assert torch.equal(p, q), name
    second.close()
    assert all(not m._forward_hooks for m in own_loop.modules())
    second.zero_grad()
    loss_fn(own_loop(_batch()[0]), _batch()[1]).backward()
    second.step(batch=_batch())  # after close(): the ordinary route
    assert second.last_factored_blocks == 0


def test_hooks_go_with_the_optimizer():
    import gc

    model = _wide_mlp()
    opt = OPTIMIZERS["KFAC"](model, nn.MSELoss())
    assert any(m._forward_hooks for m in model.modules())
    del opt
    gc.collect()
    assert all(not m._forward_hooks for m in model.modules())


def test_mixed_precision_inputs_keep_the_curvature_in_float32():
    """Autocast (bfloat16 matmuls) in the user's pass: curvature and step in the model's float32."""
    model = _wide_mlp().float()
    loss_fn = nn.MSELoss()
    opt = optim.KFAC(model, loss_fn, lr=0.1, damping=0.1)
    X, Y = (t.float() for t in _batch())
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(X).float(), Y)
        loss.backward()
        opt.step(batch=(X, Y))
    assert opt.curvature.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_a_clear_error(dtype):
    model = _wide_mlp().to(dtype)
    with pytest.raises(UnsupportedError, match="float32 copy"):
        optim.KFAC(model, nn.MSELoss(), lr=0.1)


def _closure(model, loss_fn, batch, opt):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "name, loss_fn",
    [
        ("KFAC empirical", nn.MSELoss()),
        ("KFAC empirical", nn.MSELoss(reduction="sum")),
        ("ACP", nn.MSELoss()),
        ("ACP heuristic", nn.MSELoss()),
    ],
)
@pytest.mark.parametrize("own_loop", [False, True], ids=["closure", "own_loop"])
def test_statistics_from_the_steps_own_pass_equal_a_separate_pass(name, loss_fn, own_loop):
    """Empirical KFAC and ACP refresh from the training pass itself: the same curvature, no extra pass."""
    model = _wide_mlp()
    if name == "KFAC empirical":
        opt = optim.KFAC(model, loss_fn, lr=0.1, damping=0.1, fisher_type="empirical", ema_decay=0.0)
    else:
        opt = OPTIMIZERS[name](model, loss_fn)
    for step in range(3):
        batch = _batch(seed=step)
        separate = copy.deepcopy(model)
        problem = cl.Problem(separate, loss_fn, batch)
        if name == "KFAC empirical":
            expected = cl.KFAC(problem, fisher_type="empirical")
        else:
            expected = cl.ACP(problem, alpha=opt.alpha)
        if own_loop:
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step(batch=batch)
        else:
            opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
        assert opt.last_statistics == "own pass"
        torch.testing.assert_close(opt.curvature.to_dense(), expected.to_dense(), rtol=1e-10, atol=1e-14)


def test_statistics_need_a_pass_of_their_own_where_the_pass_cannot_give_them():
    model, loss_fn = _wide_mlp(), nn.MSELoss()
    for opt in (
        optim.KFAC(model, loss_fn, lr=0.1, fisher_type="mc"),  # sampled labels: not the pass' gradients
        optim.KFAC(model, loss_fn, lr=0.1, fisher_type="empirical", curvature_examples=3),  # a subsample
        optim.KFAC(model, loss_fn, lr=0.1, fisher_type="empirical", weight_decay=0.0),
    ):
        batch = _batch()
        opt.step(_closure(model, loss_fn, batch, opt), batch=batch)
        expected = "own pass" if opt.fisher_type == "empirical" and opt.curvature_examples is None else None
        assert opt.last_statistics == (expected or "separate pass")
        opt.close()
    opt = optim.KFAC(model, loss_fn, lr=0.1, fisher_type="empirical")
    other = _batch(seed=5)

    def clipped():  # a gradient that is not the pass' UᵀX: the probe check refuses it
        opt.zero_grad()
        loss = loss_fn(model(other[0]), other[1])
        loss.backward()
        for p in model.parameters():
            p.grad.mul_(0.5)
        return loss

    opt.step(clipped, batch=other)
    assert opt.last_statistics == "separate pass"


def test_a_recorded_pass_is_freed_by_reference_counting():
    """The output-gradient hooks must not close a cycle through autograd's graph (a leak per step)."""
    import gc
    import weakref

    from curvlab.optim.factored import record_linear_factors

    model = _wide_mlp()
    X, Y = _batch()
    with record_linear_factors(model, list(model.parameters())) as records:
        loss = nn.MSELoss()(model(X), Y)
        loss.backward()
    first = next(iter(records.values()))
    assert len(first.output_grads) == 1
    output = weakref.ref(first.outputs[0])
    del records, first, loss
    gc.disable()
    try:
        assert output() is None  # freed at once, not at some later cycle collection
    finally:
        gc.enable()
