"""CUDA runs of the exact operators (skipped without a GPU)."""

import pytest
import torch

import curvlab as cl
from tests.cases import CASES
from tests.conftest import OPERATORS
from tests.helpers import assert_close_rel

pytestmark = pytest.mark.gpu

GPU_CASES = [
    c
    for c in CASES
    if c.name in ("mlp_relu_ce_mean_3batches", "conv2d_mse_mean_2batches", "mlp_gelu_bce_mean")
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_cuda_operator_matches_cpu_reference(case, name):
    operator_class, reference_fn = OPERATORS[name]
    problem = case.build(torch.float64, device="cuda")
    operator = operator_class(problem)
    assert operator.device.type == "cuda"
    dense = operator.to_dense()
    assert dense.is_cuda
    assert_close_rel(dense.cpu(), reference_fn(case.build(torch.float64)), 1e-10, name)
    v = torch.randn(operator.shape[0], dtype=torch.float64, device="cuda")
    assert_close_rel((operator @ v).cpu(), dense.cpu() @ v.cpu(), 1e-10, "matvec")


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_mc_fisher_same_samples_on_cpu_and_cuda(case):
    cpu = cl.Fisher(case.build(torch.float64), mc_samples=2, seed=5).to_dense()
    cuda = cl.Fisher(case.build(torch.float64, device="cuda"), mc_samples=2, seed=5).to_dense()
    assert_close_rel(cuda.cpu(), cpu, 1e-10, "MC Fisher across devices")


def test_float32_on_cuda():
    case = GPU_CASES[0]
    dense = cl.GGN(case.build(torch.float32, device="cuda")).to_dense()
    assert_close_rel(dense.double().cpu(), cl.GGN(case.build(torch.float64)).to_dense(), 1e-5, "float32 cuda")


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_cuda_spectra_match_cpu(case):
    cpu = cl.Hessian(case.build(torch.float64))
    cuda = cl.Hessian(case.build(torch.float64, device="cuda"))
    top_cpu, top_cuda = cl.top_eigen(cpu, 3, progress=False), cl.top_eigen(cuda, 3, progress=False)
    assert top_cuda.vectors.is_cuda
    assert_close_rel(top_cuda.values.cpu(), top_cpu.values, 1e-8, "top eigenvalues")
    exact = torch.linalg.eigvalsh(cpu.to_dense())
    assert_close_rel(cl.eigvalsh(cuda).cpu(), exact, 1e-10, "eigvalsh on the device")
    for method in ("hutchinson", "hutch++"):
        a, b = cl.trace(cpu, method, 30, seed=1), cl.trace(cuda, method, 30, seed=1)
        assert b.value == pytest.approx(a.value, rel=1e-10), method  # same probes on both devices
    d_cpu = cl.spectral_density(cpu, 4, 10, seed=2, progress=False)
    d_cuda = cl.spectral_density(cuda, 4, 10, seed=2, progress=False)
    assert d_cuda.density.is_cuda
    assert_close_rel(d_cuda.density.cpu(), d_cpu.density, 1e-8, "SLQ density")


def test_cuda_analyze_job(tmp_path):
    from curvlab import cli
    from curvlab.storage import read

    code = cli.main(
        ["analyze", "--steps", "10", "--checkpoints", "2", "--hidden", "4", "--k", "3", "--no-progress"]
        + ["--examples", "200", "--device", "cuda", "--out", str(tmp_path)]
    )
    assert code == 0
    assert read(tmp_path / "analysis.h5")[0].provenance["device"].startswith("cuda")


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "ACP", "DiagonalGGN", "HessianFree", "Newton"])
def test_cuda_optimizers_step_like_on_cpu(name):
    import copy

    from torch import nn

    from curvlab import optim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        batch = (X.to(device), y.to(device))
        opt = getattr(optim, name)(m, nn.CrossEntropyLoss(), lr=0.1, damping=1e-2)

        def closure(m=m, opt=opt, batch=batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure, batch=batch)
        results.append([p.detach().cpu() for p in m.parameters()])
    for p, q in zip(*results):
        assert_close_rel(q, p, 1e-8, name)
