"""The one comparator of the test suite, and pieces shared by tests."""

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.passes import fast


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, what: str = ""):
    """‖actual − expected‖_F ≤ rtol · max(‖expected‖_F, tiny) with a readable message."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.to(expected) - expected).norm().item()
    scale = max(expected.norm().item(), 1e-300)
    assert error <= rtol * scale, f"{what}: relative error {error / scale:.3e} > {rtol:.1e}"


class Wrapped(nn.Module):
    """A model behind a wrapper: KFAC then takes the autograd pass, not the plain-MLP pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def assert_same_model_fisher(first: cl.Problem, second: cl.Problem) -> None:
    """Exact and MC Fisher and MC KFAC equal: the model's own, whatever the loss options or targets."""
    for samples in (None, 3):
        a = cl.Fisher(first, mc_samples=samples, seed=1).to_dense()
        b = cl.Fisher(second, mc_samples=samples, seed=1).to_dense()
        assert_close_rel(a, b, 1e-13, f"Fisher, mc_samples={samples}")
    a = cl.KFAC(first, fisher_type="mc", mc_samples=2, seed=4).to_dense()
    b = cl.KFAC(second, fisher_type="mc", mc_samples=2, seed=4).to_dense()
    assert_close_rel(a, b, 1e-13, "MC KFAC")


def finite_difference_hessian(problem: cl.Problem, step: float = 1e-6) -> torch.Tensor:
    """Central differences of the risk's gradient (first-order autodiff only), one batch: ``(n, n)``.

    Independent of torch's second derivatives, which some fused kernels get wrong.
    """
    theta = torch.cat([p.detach().flatten() for p in problem.params])
    sizes = [p.numel() for p in problem.params]
    X, y = problem.data[0]

    def gradient(t):
        t = t.clone().requires_grad_(True)
        params = [part.reshape(p.shape) for part, p in zip(t.split(sizes), problem.params)]
        return torch.autograd.grad(problem.reduction_factor * problem.batch_loss(params, X, y), t)[0]

    basis = torch.eye(len(theta), dtype=theta.dtype)
    return torch.stack(
        [(gradient(theta + step * e) - gradient(theta - step * e)) / (2 * step) for e in basis], 1
    )


def curvlinops_kfac_dense(problem: cl.Problem, **options) -> torch.Tensor:
    """The dense matrix of curvlinops' ``KFACLinearOperator`` (bias folded unless the options say).

    Skips the test where curvlinops is not installed.
    """
    curvlinops = pytest.importorskip("curvlinops")
    options.setdefault("separate_weight_and_bias", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = curvlinops.KFACLinearOperator(
            problem.model, problem.loss_fn, problem.params, problem.data, check_deterministic=False, **options
        )
        return theirs @ torch.eye(problem.num_params, dtype=problem.params[0].dtype)


def takes_fast_path(problem: cl.Problem) -> bool:
    """Whether the exact operators of ``problem`` take forms and products from a fast path."""
    route = fast.compile(problem)
    return route is not None and route.covers_parameters and route.applies()
