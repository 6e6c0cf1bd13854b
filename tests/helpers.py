"""The one comparator of the test suite."""

import torch


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, what: str = ""):
    """‖actual − expected‖_F ≤ rtol · max(‖expected‖_F, tiny) with a readable message."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.to(expected) - expected).norm().item()
    scale = max(expected.norm().item(), 1e-300)
    assert error <= rtol * scale, f"{what}: relative error {error / scale:.3e} > {rtol:.1e}"
