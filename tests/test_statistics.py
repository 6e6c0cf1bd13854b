"""The statistics pass' building blocks: second moments in every layout, patches, chunking."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab.passes.autograd import vectors_per_pass
from curvlab.passes.capture import record_calls
from curvlab.passes.fast.mlp import _trapezoidal_times
from curvlab.passes.layers import rule_for
from curvlab.passes.vectors import gram, second_moment
from curvlab.structured.kronecker import _scaled_identity_scalar
from tests.helpers import assert_close_rel

F64 = torch.float64


@pytest.mark.parametrize("d", [7, 260, 600, 1001])
def test_gram_equals_the_full_product(d):
    """The strip-wise lower triangle, mirrored, is flatᵀ flat (1 to 4 strips)."""
    flat = torch.randn(40, d, dtype=F64)
    assert_close_rel(gram(flat), flat.T @ flat, 1e-14, "gram")


@pytest.mark.parametrize(
    "layout",
    ["row-major", "blocks (B, d, R), d <= R", "d-major rows", "blocks with d > R"],
)
def test_second_moment_in_every_layout(layout):
    """Σ over leading indices of v vᵀ, whatever the strides of v."""
    g = torch.Generator().manual_seed(0)
    if layout == "row-major":
        v = torch.randn(3, 5, 4, 6, generator=g, dtype=F64)
    elif layout == "blocks (B, d, R), d <= R":
        v = torch.randn(3, 5, 6, 9, generator=g, dtype=F64).transpose(-1, -2)  # (V, N, R, d)
    elif layout == "d-major rows":
        v = torch.randn(6, 5, 9, generator=g, dtype=F64).permute(1, 2, 0)  # (N, R, d) from (d, N, R)
    else:
        v = torch.randn(5, 8, 3, generator=g, dtype=F64).transpose(-1, -2)  # d = 8 > R = 3
    expected = torch.einsum("...i,...j->ij", v, v)
    assert_close_rel(second_moment(v), expected, 1e-13, layout)


def _conv_reference(module, x, append_one):
    """Patches by F.unfold (N, R, d) [with a trailing 1]: the layout KFAC's rule must reproduce."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if append_one:
        patches = torch.cat([patches, torch.ones_like(patches[..., :1])], -1)
    return patches


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 3, 9, 7)),
        (nn.Conv2d(2, 4, 3), (3, 2, 5, 5)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (4, 2, 11)),
    ],
    ids=["conv2d-strided-dilated-padded", "conv2d-plain", "conv1d"],
)
@pytest.mark.parametrize("append_one", [False, True])
def test_conv_patches_match_unfold(module, shape, append_one):
    x = torch.randn(*shape, dtype=F64)
    patches = rule_for(module, "conv").input_vectors(module.double(), x, append_one=append_one)
    assert torch.equal(patches, _conv_reference(module, x, append_one))


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(2, 3, (4, 3), padding="same", dilation=(1, 2)), (2, 2, 7, 6)),
        (nn.Conv2d(2, 3, 2, padding="valid", stride=2), (2, 2, 7, 6)),
        (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 3, 9, 7)),
        (nn.Conv1d(2, 3, 4, padding="same", dilation=3), (3, 2, 12)),
    ],
    ids=["conv2d-same-even-kernel", "conv2d-valid", "conv2d-numeric", "conv1d-same"],
)
def test_conv_patches_reproduce_the_layer_output(module, shape):
    """W ã = the layer's output at every location: an exact check of the patches, any padding.

    "same" with an even kernel pads one more on the far side; unfold cannot express that.
    """
    module = module.double()
    x = torch.randn(*shape, dtype=F64)
    patches = rule_for(module, "conv").input_vectors(module, x, append_one=True)  # (N, R, d + 1)
    weight = torch.cat([module.weight.reshape(module.out_channels, -1), module.bias[:, None]], 1)
    expected = module(x).reshape(shape[0], module.out_channels, -1).transpose(1, 2)
    assert_close_rel(patches @ weight.T, expected, 1e-13, "W ã vs the convolution")


def test_vectors_per_pass_by_memory():
    small = [torch.zeros(8, 10)]  # 320 bytes per vector
    large = [torch.zeros(256, 16, 28, 28)]  # 12.8 MB per vector
    assert vectors_per_pass(small, None) == 64
    assert vectors_per_pass(large, None) == 1
    assert vectors_per_pass([torch.zeros(2**20)], None) == 4  # 4 MiB per vector, 16 MiB budget
    assert vectors_per_pass(large, 5) == 5


@pytest.mark.parametrize("max_vectors", [1, 3, None])
def test_kfac_does_not_depend_on_the_vectors_per_pass(max_vectors):
    """Type-2 KFAC of a CNN (10 backpropagated vectors) for any chunking of the vectors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).double()
    X, y = torch.randn(6, 1, 6, 6, dtype=F64), torch.randint(0, 10, (6,))
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    reference = cl.KFAC(problem, max_vectors=64).to_dense()
    assert_close_rel(cl.KFAC(problem, max_vectors=max_vectors).to_dense(), reference, 1e-13, "chunking")


def test_scaled_identity_detection():
    assert _scaled_identity_scalar(2.5 * torch.eye(4)) == 2.5
    assert _scaled_identity_scalar(torch.eye(1)) == 1.0
    tricky = 2.5 * torch.eye(4)
    tricky[2, 1] = 1e-3  # G[0, 1] = 0 but not diagonal
    assert _scaled_identity_scalar(tricky) is None
    assert _scaled_identity_scalar(torch.diag(torch.tensor([1.0, 2.0, 1.0]))) is None
    full = torch.ones(3, 3)
    assert _scaled_identity_scalar(full) is None


@pytest.mark.parametrize("V, d", [(5, 9), (9, 9), (3, 12)])
def test_trapezoidal_product_skips_only_zeros(V, d):
    R = torch.linalg.qr(torch.randn(V, d, dtype=F64), mode="r").R  # (V, d) upper trapezoidal
    M = torch.randn(4, d, 6, dtype=F64)
    assert_close_rel(_trapezoidal_times(R, M), R @ M, 1e-14, "R @ M")


def test_capture_copies_layer_outputs_only_where_changed_in_place():
    """The model computes on the recorded output itself unless asked to copy it.

    Without in-place changes nothing is copied; an in-place ReLU is reported by
    ``modified()``, and with ``copy_outputs`` the recorded output does not see it.
    """
    torch.manual_seed(0)
    X = torch.randn(5, 3, dtype=F64)
    for in_place in (False, True):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=in_place), nn.Linear(4, 2)).double()
        received: dict = {}

        def record(module, args, store=received):
            store.update(x=args[0])

        handle = model[1].register_forward_pre_hook(record)
        try:
            with record_calls({"0": model[0]}) as calls:
                model(X)
            assert received["x"] is calls["0"].outputs[0]  # no copy
            assert calls["0"].modified() == in_place
            with record_calls({"0": model[0]}, copy_outputs=True) as calls:
                model(X)
            assert received["x"] is not calls["0"].outputs[0] and not calls["0"].modified()
            assert_close_rel(calls["0"].outputs[0], model[0](X), 1e-15, "recorded output, before the ReLU")
        finally:
            handle.remove()
        assert not model[0]._forward_hooks  # removed


def test_capture_records_every_call_and_output_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    X = torch.randn(5, 3, dtype=F64)
    with record_calls({"layer": layer}, output_gradients=True) as calls:
        layer(layer(X)).sum().backward()
    record = calls["layer"]
    assert len(record.inputs) == 2 and torch.equal(record.inputs[0], X)
    assert len(record.output_grads) == 2  # in backward order: the outer call's output first
    ones = torch.ones(5, 3, dtype=F64)
    assert_close_rel(record.output_grads[0], ones, 0)
    assert_close_rel(record.output_grads[1], ones @ layer.weight, 1e-15)
    assert not layer._forward_hooks
