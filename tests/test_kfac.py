"""KFAC against the exact GGN where it is provably exact, against curvlinops, and its structure."""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim, reference
from tests.helpers import assert_close_rel, curvlinops_kfac_dense

F64 = torch.float64


def _targets(loss, n, outputs, generator):
    if isinstance(loss, nn.CrossEntropyLoss):
        return torch.randint(0, outputs, (n,), generator=generator)
    if isinstance(loss, nn.BCEWithLogitsLoss):  # binary: curvlinops' type-2 KFAC requires it
        return torch.randint(0, 2, (n, outputs), generator=generator).to(F64)
    return torch.randn(n, outputs, generator=generator, dtype=F64)


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _conv2d():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2, dilation=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    ).double()


def _conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double()


MODELS = {"mlp": (_mlp, (4,)), "conv2d": (_conv2d, (2, 4, 4)), "conv1d": (_conv1d, (2, 6))}
LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


def _problem(model_name, loss_name, batch_sizes=(4, 3), reduction="mean", seed=0):
    torch.manual_seed(seed)
    build, input_shape = MODELS[model_name]
    model = build()
    loss = LOSSES[loss_name](reduction=reduction)
    generator = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(n, *input_shape, generator=generator, dtype=F64), _targets(loss, n, 3, generator))
        for n in batch_sizes
    ]
    return cl.Problem(model, loss, data)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("separate", [False, True], ids=["folded_bias", "separate_bias"])
def test_single_example_type2_equals_exact_ggn_blocks(loss_name, separate):
    problem = _problem("mlp", loss_name, batch_sizes=(1,))
    kfac = cl.KFAC(problem, separate_weight_and_bias=separate)
    exact = cl.GGN(problem)
    by = "parameter" if separate else "layer"
    for kfac_block, exact_block in zip(kfac.blocks(by=by), exact.blocks(by=by)):
        assert_close_rel(kfac_block.to_dense(), exact_block.to_dense(), 1e-12, "single example")


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_single_example_blocks_with_one_output_number_per_example(loss_name):
    """Outputs (N,) (``model(x).squeeze(-1)``): type-2 and empirical KFAC, EKFAC on one example."""
    from tests.cases import CASES

    case = next(c for c in CASES if c.name.startswith("scalar_regressor") and c.loss == loss_name)
    built = case.build(torch.float64)
    X, y = built.data[0]
    problem = cl.Problem(built.model, built.loss_fn, (X[:1], y[:1]))
    assert problem.model(X[:1]).shape == (1,)
    for fisher_type, exact in (("type-2", cl.GGN(problem)), ("empirical", cl.EmpiricalFisher(problem))):
        for structured in (
            cl.KFAC(problem, fisher_type=fisher_type),
            cl.EKFAC(problem, fisher_type=fisher_type),
        ):
            for block, exact_block in zip(structured.blocks(by="layer"), exact.blocks(by="layer")):
                assert_close_rel(block.to_dense(), exact_block.to_dense(), 1e-12, fisher_type)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_network_mse_type2_equals_block_diagonal_ggn(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)).double()
    data = [
        (torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)),
        (torch.randn(2, 3, dtype=F64), torch.randn(2, 2, dtype=F64)),
    ]
    problem = cl.Problem(model, nn.MSELoss(reduction=reduction), data)
    kfac = cl.KFAC(problem)
    dense_ggn = reference.ggn(problem)
    offsets = kfac.block_offsets()
    for indices, block in zip(kfac.block_indices, kfac.blocks()):
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
        assert_close_rel(block.to_dense(), dense_ggn[index][:, index], 1e-11, "deep linear")


def _as_conv2d_problem(problem):
    """The same network with every Conv1d as a Conv2d of kernel (1, k) on (N, C, 1, L) inputs."""
    layers = []
    for module in problem.model:
        if isinstance(module, nn.Conv1d):
            conv = nn.Conv2d(
                module.in_channels,
                module.out_channels,
                (1, module.kernel_size[0]),
                stride=(1, module.stride[0]),
                padding=(0, module.padding[0]),
                dilation=(1, module.dilation[0]),
                bias=module.bias is not None,
            ).to(module.weight)
            with torch.no_grad():
                conv.weight.copy_(module.weight.unsqueeze(2))
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            module = conv
        layers.append(module)
    data = [(X.unsqueeze(2), y) for X, y in problem.data]
    return cl.Problem(nn.Sequential(*layers), problem.loss_fn, data)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [False, True], ids=["folded_bias", "separate_bias"])
def test_matches_curvlinops(model_name, loss_name, fisher_type, approx, separate):
    problem = _problem(model_name, loss_name)
    ours = cl.KFAC(problem, fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=separate)
    # curvlinops 3 has no Conv1d rule: it gets the same network as a Conv2d on height-1 inputs
    peer = _as_conv2d_problem(problem) if model_name == "conv1d" else problem
    expected = curvlinops_kfac_dense(
        peer, fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=separate
    )
    assert_close_rel(ours.to_dense(), expected, 1e-10, "KFAC vs curvlinops")


def _patches_reference(conv, x):
    """Input patches of a convolution by explicit loops over output positions (independent of unfold)."""
    x2d = x if isinstance(conv, nn.Conv2d) else x.unsqueeze(2)
    k = conv.kernel_size if isinstance(conv, nn.Conv2d) else (1, conv.kernel_size[0])
    s = conv.stride if isinstance(conv, nn.Conv2d) else (1, conv.stride[0])
    d = conv.dilation if isinstance(conv, nn.Conv2d) else (1, conv.dilation[0])
    p = conv.padding if isinstance(conv, nn.Conv2d) else (0, conv.padding[0])
    padded = nn.functional.pad(x2d, (p[1], p[1], p[0], p[0]))
    H = (padded.shape[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    W = (padded.shape[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    patches = []
    for i in range(H):
        for j in range(W):
            window = padded[
                :,
                :,
                i * s[0] : i * s[0] + d[0] * (k[0] - 1) + 1 : d[0],
                j * s[1] : j * s[1] + d[1] * (k[1] - 1) + 1 : d[1],
            ]
            patches.append(window.reshape(x.shape[0], -1))
    return torch.stack(patches, dim=1)  # (N, R, C_in·k…)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_same_padding_equals_explicit_zero_padding(approx, fisher_type):
    """padding="same" (even kernel: asymmetric) gives the KFAC of ZeroPad2d + an unpadded conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (4, 3), padding="same", dilation=(1, 2)).double()
    explicit = nn.Conv2d(2, 3, (4, 3), dilation=(1, 2)).double()
    explicit.load_state_dict(conv.state_dict())
    head = nn.Linear(3 * 5 * 5, 4).double()
    same = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    padded = nn.Sequential(nn.ZeroPad2d((2, 2, 1, 2)), explicit, nn.Tanh(), nn.Flatten(), copy.deepcopy(head))
    X, y = torch.randn(6, 2, 5, 5, dtype=F64), torch.randint(0, 4, (6,))
    assert torch.allclose(same(X), padded(X))
    kfacs = [
        cl.KFAC(cl.Problem(model, nn.CrossEntropyLoss(), (X, y)), fisher_type=fisher_type, kfac_approx=approx)
        for model in (same, padded)
    ]
    assert_close_rel(kfacs[0].to_dense(), kfacs[1].to_dense(), 1e-12, "same vs explicit padding")


_PAD_MODULES = {
    ("reflect", 2): nn.ReflectionPad2d,
    ("replicate", 2): nn.ReplicationPad2d,
    ("circular", 2): nn.CircularPad2d,
    ("reflect", 1): nn.ReflectionPad1d,
    ("replicate", 1): nn.ReplicationPad1d,
    ("circular", 1): nn.CircularPad1d,
}


@pytest.mark.parametrize("spatial_dims", [2, 1])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_padding_modes_equal_explicit_padding(padding_mode, spatial_dims, fisher_type):
    """A conv with padding_mode gives the KFAC, EKFAC and ACP of the pad module + an unpadded conv."""
    torch.manual_seed(0)
    Conv = nn.Conv2d if spatial_dims == 2 else nn.Conv1d
    padding, pads = ((1, 2), (2, 2, 1, 1)) if spatial_dims == 2 else (2, (2, 2))
    conv = Conv(2, 3, 3, padding=padding, padding_mode=padding_mode, stride=2).double()
    explicit = Conv(2, 3, 3, stride=2).double()
    explicit.load_state_dict(conv.state_dict())
    shape = (6, 2) + (5,) * spatial_dims
    X, y = torch.randn(*shape, dtype=F64), torch.randint(0, 4, (6,))
    features = conv(X).numel() // 6
    head = nn.Linear(features, 4).double()
    implicit = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    padded = nn.Sequential(
        _PAD_MODULES[padding_mode, spatial_dims](pads), explicit, nn.Tanh(), nn.Flatten(), copy.deepcopy(head)
    )
    assert torch.allclose(implicit(X), padded(X))
    problems = [cl.Problem(model, nn.CrossEntropyLoss(), (X, y)) for model in (implicit, padded)]
    for approx in ("expand", "reduce"):
        kfacs = [cl.KFAC(p, fisher_type=fisher_type, kfac_approx=approx).to_dense() for p in problems]
        assert_close_rel(kfacs[0], kfacs[1], 1e-12, f"KFAC {approx}, {padding_mode} vs explicit padding")
        if spatial_dims == 2:  # curvlinops 3.0.1 zero-pads whatever the padding_mode: give it the pad module
            theirs = curvlinops_kfac_dense(problems[1], fisher_type=fisher_type, kfac_approx=approx)
            assert_close_rel(kfacs[0], theirs, 1e-10, f"KFAC {approx}, {padding_mode} vs curvlinops")
    ekfacs = [cl.EKFAC(p, fisher_type=fisher_type).to_dense() for p in problems]
    assert_close_rel(ekfacs[0], ekfacs[1], 1e-10, "EKFAC")
    acps = [cl.ACP(p).to_dense() for p in problems]
    assert_close_rel(acps[0], acps[1], 1e-12, "ACP")
    diagonal = cl.Diagonal(cl.GGN(problems[0]))  # one pass over the same patches
    assert diagonal.method_used == "layerwise"
    assert_close_rel(diagonal.diagonal, torch.diagonal(reference.ggn(problems[0])), 1e-12, "exact diagonal")


@pytest.mark.parametrize("model_name", ["conv2d", "conv1d"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_against_independent_reference(model_name, approx):
    """Conv factors from explicit patches and per-location output gradients (empirical flavour)."""
    problem = _problem(model_name, "mse", batch_sizes=(5,))
    conv = problem.model[0]
    X, y = problem.data[0]
    # gradient of the summed loss w.r.t. the convolution's output, through the rest of the network
    pre = conv(X).detach().requires_grad_(True)
    tail = problem.model[1:]
    grad_pre = torch.autograd.grad(((tail(pre) - y) ** 2).sum(), pre)[0]  # (N, C_out, *spatial)
    a = _patches_reference(conv, X)
    a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    g = grad_pre.reshape(grad_pre.shape[0], grad_pre.shape[1], -1).transpose(1, 2)  # (N, R, C_out)
    N, R = a.shape[:2]
    c = problem.reduction_factor
    if approx == "expand":
        A = torch.einsum("nri,nrj->ij", a, a) / (N * R)
        G = c * torch.einsum("nri,nrj->ij", g, g)
    else:
        A = torch.einsum("ni,nj->ij", a.mean(1), a.mean(1)) / N
        G = c * torch.einsum("ni,nj->ij", g.sum(1), g.sum(1))
    block = cl.KFAC(problem, fisher_type="empirical", kfac_approx=approx).blocks()[0]
    assert_close_rel(block.A, A, 1e-12, "A")
    assert_close_rel(block.G, G, 1e-12, "G")


def test_mc_kfac_converges_to_type2():
    problem = _problem("mlp", "ce", batch_sizes=(6,))
    exact = cl.KFAC(problem).to_dense()

    def error(samples, seed):
        approx = cl.KFAC(problem, fisher_type="mc", mc_samples=samples, seed=seed).to_dense()
        return ((approx - exact).norm() / exact.norm()).item()

    few = torch.tensor([error(2, s) for s in range(6)]).mean()
    many = torch.tensor([error(2000, s) for s in range(6)]).mean()
    assert many < few / 10, f"MC KFAC error {many:.3e} with 2000 samples vs {few:.3e} with 2"
    assert many < 0.05


def test_mc_kfac_is_reproducible():
    problem = _problem("mlp", "bce")
    first = cl.KFAC(problem, fisher_type="mc", mc_samples=2, seed=3).to_dense()
    assert torch.equal(first, cl.KFAC(problem, fisher_type="mc", mc_samples=2, seed=3).to_dense())


def test_empirical_kfac_matches_definition():
    """Empirical KFAC of a one-layer model from per-example gradients by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    r = model(X).softmax(1) - nn.functional.one_hot(y, 2).double()
    a = torch.cat([X, torch.ones(5, 1, dtype=F64)], 1)
    block = cl.KFAC(problem, fisher_type="empirical").blocks()[0]
    assert_close_rel(block.G, (r.T @ r).detach() / 5, 1e-12, "G = c Σ r rᵀ")
    assert_close_rel(block.A, a.T @ a / 5, 1e-12, "A = 1/N Σ ã ãᵀ")
    # the product in parameter order [vec W, b] equals G [W b] A
    V = [torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)]
    M = torch.cat([V[0], V[1][:, None]], 1)
    expected = block.G @ M @ block.A
    result = block @ V
    assert_close_rel(result[0], expected[:, :-1], 1e-12, "weight part")
    assert_close_rel(result[1], expected[:, -1], 1e-12, "bias part")


def test_structure_eigvalsh_trace_logdet_frobenius_solve():
    problem = _problem("conv2d", "ce")
    for block in cl.KFAC(problem).blocks():
        dense = block.to_dense()
        assert_close_rel(block.eigvalsh(), torch.linalg.eigvalsh(dense), 1e-10, "eigvalsh")
        assert_close_rel(block.trace(), dense.trace(), 1e-12, "trace")
        assert_close_rel(block.frobenius_norm(), dense.norm(), 1e-12, "frobenius")
        assert_close_rel(
            block.logdet(0.1), torch.logdet(dense + 0.1 * torch.eye(len(dense), dtype=F64)), 1e-10, "logdet"
        )
        b = torch.randn(len(dense), dtype=F64)
        expected = torch.linalg.solve(dense + 0.1 * torch.eye(len(dense), dtype=F64), b)
        assert_close_rel(block.solve(b, damping=0.1), expected, 1e-10, "solve")


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x):
        return self.gain * x


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_a_layer_with_forward_hooks_is_refused_or_given_another_structure(hook):
    # A hook that rescales the output: KFAC from the layer's input and output
    # gradient would be 0.75 (relative) away from the exact block, silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if hook == "forward":
        model[0].register_forward_hook(lambda module, args, output: 2 * output)
    else:
        model[0].register_forward_pre_hook(lambda module, args: (2 * args[0],))
    X, y = torch.randn(1, 4, dtype=F64), torch.randint(0, 3, (1,))
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(cl.UnsupportedError, match=r"'0' \(Linear\) has forward hooks.*other_structure"):
        cl.KFAC(problem)
    kfac = cl.KFAC(problem, other_structure="exact")  # one example: type-2 KFAC is the exact GGN block
    ggn = reference.ggn(problem)
    blocks = [slice(0, 25), slice(25, 43)]
    for block in blocks:
        assert_close_rel(kfac.to_dense()[block, block], ggn[block, block], 1e-10, "block")
    V = torch.randn(problem.num_params, 2, dtype=F64)  # the forms' plain-MLP route refuses hooks too
    expected = (V * (reference.hessian_matrix(problem) @ V)).sum(0)
    assert_close_rel(cl.Hessian(problem).quadratic_forms(V), expected, 1e-10, "Hessian forms")


def test_unsupported_layer_names_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).double(), _Scale())
    problem = cl.Problem(model, nn.MSELoss(), (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)))
    with pytest.raises(
        cl.UnsupportedError,
        match=r"'1' \(_Scale\).*supported layers: Linear, Conv1d, Conv2d. Pass other_structure",
    ):
        cl.KFAC(problem)
    # Each caller offers its own remedy: ACP and CenteredSGD have no other_structure.
    with pytest.raises(cl.UnsupportedError, match=r"'1' \(_Scale\).*ACP covers those layers only") as error:
        cl.ACP(problem)
    assert "other_structure" not in str(error.value)
    centered = optim.CenteredSGD(model, nn.MSELoss(), lr=0.1)
    with pytest.raises(cl.UnsupportedError, match="CenteredSGD centers those layers only") as error:
        centered.centered_gradient(problem.data[0])
    assert "other_structure" not in str(error.value)


def test_grouped_conv_is_rejected():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double()
    problem = cl.Problem(
        model, nn.MSELoss(), (torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 8, dtype=F64))
    )
    with pytest.raises(cl.UnsupportedError, match="groups=2"):
        cl.KFAC(problem)


def test_hooks_leave_nothing_behind():
    problem = _problem("conv2d", "ce")
    before = {
        name: (dict(vars(m)), len(m._forward_hooks), len(m._backward_hooks))
        for name, m in problem.model.named_modules()
    }
    state = copy.deepcopy(problem.model.state_dict())
    cl.KFAC(problem, fisher_type="mc")
    for name, m in problem.model.named_modules():
        attributes, forward_hooks, backward_hooks = before[name]
        assert set(vars(m)) == set(attributes), name
        assert len(m._forward_hooks) == forward_hooks and len(m._backward_hooks) == backward_hooks, name
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, state[key])
    assert all(p.grad is None for p in problem.params)


def test_hooks_removed_when_the_forward_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    data = [
        (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)),
        (torch.randn(2, 4, dtype=F64), torch.randn(2, 2, dtype=F64)),
    ]
    problem = cl.Problem(model, nn.MSELoss(), data)
    with pytest.raises(cl.DataError):
        cl.KFAC(problem)
    assert len(model[0]._forward_hooks) == 0


@pytest.mark.parametrize("bad", [{"fisher_type": "type-1"}, {"kfac_approx": "shrink"}, {"mc_samples": 0}])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        cl.KFAC(_problem("mlp", "mse"), **bad)


def test_kfac_level_structure_against_dense():
    problem = _problem("mlp", "mse")
    kfac = cl.KFAC(problem)
    dense = kfac.to_dense()
    eye = torch.eye(len(dense), dtype=F64)
    assert_close_rel(cl.eigvalsh(kfac), torch.linalg.eigvalsh(dense), 1e-10, "cl.eigvalsh")
    assert_close_rel(kfac.trace(), dense.trace(), 1e-12, "trace")
    assert_close_rel(kfac.frobenius_norm(), dense.norm(), 1e-12, "frobenius")
    assert_close_rel(kfac.logdet(0.5), torch.logdet(dense + 0.5 * eye), 1e-10, "logdet")
    inverse = kfac.inverse(0.5)
    assert_close_rel(inverse.to_dense(), torch.linalg.inv(dense + 0.5 * eye), 1e-10, "inverse")
    b = torch.randn(len(dense), dtype=F64)
    assert_close_rel(kfac.solve(b, damping=0.5), torch.linalg.solve(dense + 0.5 * eye, b), 1e-10, "solve")
    assert torch.equal(kfac.to_dense(), dense), "inverse() must not mutate the operator"


def test_eigvalsh_of_kfac_never_builds_the_dense_matrix(monkeypatch):
    kfac = cl.KFAC(_problem("mlp", "ce"))
    expected = torch.linalg.eigvalsh(kfac.to_dense())

    def refuse(*args, **kwargs):
        raise AssertionError("to_dense was called")

    monkeypatch.setattr(type(kfac), "to_dense", refuse)
    assert_close_rel(cl.eigvalsh(kfac), expected, 1e-10, "structured eigenvalues")


def test_pi_damping_is_the_factored_inverse():
    block = cl.KFAC(_problem("mlp", "bce")).blocks()[0]
    damping = 0.3
    pi = ((block.G.trace() / len(block.G)) / (block.A.trace() / len(block.A))).sqrt()
    eye_G, eye_A = torch.eye(len(block.G), dtype=F64), torch.eye(len(block.A), dtype=F64)
    damped = cl.KroneckerBlock(
        block.G + pi * damping**0.5 * eye_G, block.A + damping**0.5 / pi * eye_A, block.param_shapes, True
    )
    inverse = block.inverse(damping, pi_damping=True)
    assert_close_rel(inverse.to_dense(), torch.linalg.inv(damped.to_dense()), 1e-10, "pi-damped inverse")


def test_pi_damping_of_a_bias_on_its_own_is_exact_damping():
    """A bias block G ⊗ [a] is a scaled matrix, nothing to factor: π-damping damps it exactly.

    (curvlinops 3.0.1 applies the weight's damped G inverse to the bias instead.)
    """
    problem = _problem("conv2d", "ce")
    kfac = cl.KFAC(problem, separate_weight_and_bias=True)
    damping = 0.1
    bias_blocks = [block for block in kfac.blocks(by="parameter") if block.A.shape[0] == 1]
    assert len(bias_blocks) == 2
    for block in bias_blocks:
        exact = torch.linalg.inv(block.to_dense() + damping * torch.eye(block.shape[0], dtype=F64))
        assert_close_rel(block.inverse(damping, pi_damping=True).to_dense(), exact, 1e-10, "bias block")
    dense = kfac.inverse(damping, pi_damping=True).to_dense()
    offsets = kfac.block_offsets()
    for (index,), block in zip(kfac.block_indices, kfac.blocks(by="parameter")):
        part = slice(offsets[index], offsets[index + 1])
        assert_close_rel(
            dense[part, part], block.inverse(damping, pi_damping=True).to_dense(), 1e-12, "layout"
        )


@pytest.mark.parametrize("other", ["exact", "diagonal"])
@pytest.mark.parametrize("kind", [cl.KFAC, cl.EKFAC])
def test_other_structure_for_unsupported_layers(other, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).double(), _Scale(), nn.Tanh(), nn.Linear(3, 2).double())
    problem = cl.Problem(model, nn.MSELoss(), (torch.randn(5, 4, dtype=F64), torch.randn(5, 2, dtype=F64)))
    approx = kind(problem, other_structure=other)
    ggn = reference.ggn(problem)
    index = torch.arange(15, 18)  # the three gains of _Scale
    expected = ggn[index][:, index] if other == "exact" else torch.diag(torch.diagonal(ggn)[index])
    assert_close_rel(approx.to_dense()[index][:, index], expected, 1e-12, other)
    subset = [problem.params[i] for i in (0, 1, 3, 4)]
    plain = kind(cl.Problem(model, nn.MSELoss(), problem.data, params=subset))
    keep = torch.cat([torch.arange(0, 15), torch.arange(18, 26)])
    assert_close_rel(approx.to_dense()[keep][:, keep], plain.to_dense(), 1e-12, "Kronecker blocks unchanged")


@pytest.mark.parametrize("kind", [cl.KFAC, cl.EKFAC])
def test_other_structure_when_no_layer_has_a_kronecker_rule(kind):
    """Only the other structure: the exact GGN blocks of the unsupported module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).double(), _Scale(), nn.Tanh())
    problem = cl.Problem(
        model,
        nn.MSELoss(),
        (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)),
        params=list(model[1].parameters()),
    )
    approx = kind(problem, other_structure="exact")
    assert_close_rel(approx.to_dense(), reference.ggn(problem), 1e-12, "exact block of _Scale")


def test_type2_matches_backpack_kflr():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    problem = _problem("mlp", "ce", batch_sizes=(6,))
    ours = cl.KFAC(problem, separate_weight_and_bias=True)
    model = backpack.extend(copy.deepcopy(problem.model))  # BackPACK leaves hooks on what it extends
    X, y = problem.data[0]
    with backpack.backpack(KFLR()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        backpack.extend(nn.CrossEntropyLoss())(model(X), y).backward()
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    weight_blocks = [b for b in ours.blocks() if len(b.param_shapes[0]) == 2]
    assert len(weights) == len(weight_blocks) == 2
    for weight, block in zip(weights, weight_blocks):
        G, A = weight.kflr
        assert_close_rel(block.G, G, 1e-10, "G vs BackPACK KFLR")
        assert_close_rel(block.A, A, 1e-10, "A vs BackPACK KFLR")


class _LoopTwice(nn.Module):
    """One Linear applied twice in a loop: one path, two uses per forward pass."""

    def __init__(self):
        super().__init__()
        self.inp, self.inner = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        x = self.inp(x)
        for _ in range(2):
            x = torch.tanh(self.inner(x))
        return x


def _shared_problems():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), shared, nn.Tanh(), shared).double()
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.weight = a.weight  # tied across two modules
    tied = _Parallel(a, b).double()
    data = (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64))
    return {
        "same module twice": cl.Problem(twice, nn.MSELoss(), data),
        "tied parameter": cl.Problem(tied, nn.MSELoss(), data),
        "loop": cl.Problem(_LoopTwice().double(), nn.MSELoss(), data),
    }


class _Parallel(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + torch.tanh(self.b(x))


@pytest.mark.parametrize("name", ["same module twice", "tied parameter", "loop"])
@pytest.mark.parametrize("kind", [cl.KFAC, cl.EKFAC, cl.ACP])
def test_shared_weights_are_a_clear_error_not_silent_factors(name, kind):
    problem = _shared_problems()[name]
    message = {
        "same module twice": "used 2 times",
        "tied parameter": "shares a parameter",
        "loop": "called more",
    }
    with pytest.raises(cl.UnsupportedError, match=message[name]):
        kind(problem)
    assert all(not m._forward_hooks for m in problem.model.modules())


@pytest.mark.parametrize("name", ["same module twice", "tied parameter", "loop"])
def test_exact_diagonal_with_shared_weights_comes_from_products(name):
    problem = _shared_problems()[name]
    diagonal = cl.Diagonal(cl.GGN(problem))
    assert diagonal.method_used == "products"
    assert_close_rel(diagonal.diagonal, torch.diagonal(reference.ggn(problem)), 1e-12, "diagonal")


@pytest.mark.parametrize("name", ["same module twice", "tied parameter", "loop"])
def test_shared_weights_take_the_other_structure(name):
    problem = _shared_problems()[name]
    approx = cl.KFAC(problem, other_structure="exact")
    ggn = reference.ggn(problem)
    # Twice and loop: the shared layer's exact block (its weight and bias; the loop is
    # found from the forward pass' graph); tied: every parameter touches the tied
    # weight, so all of them get exact blocks, one per module.
    expected = [[0, 1], [2]] if name == "tied parameter" else [[2, 3]]
    assert [indices for indices in approx.block_indices if indices in expected] == expected
    for indices, block in zip(approx.block_indices, approx.block_operators):
        if indices in expected:
            rows = torch.cat([_flat_range(problem, i) for i in indices])
            assert_close_rel(block.to_dense(), ggn[rows][:, rows], 1e-12, f"exact block {indices}")


def _flat_range(problem, index):
    start = sum(p.numel() for p in problem.params[:index])
    return torch.arange(start, start + problem.params[index].numel())
