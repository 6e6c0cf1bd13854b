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
    if c.name
    in (
        "mlp_relu_ce_mean_3batches",
        "conv2d_mse_mean_2batches",
        "mlp_gelu_bce_mean",
        "mlp_bce_pos_weight_mean",  # the loss' pos_weight stays on the CPU: the rule moves it
        "sequence_ce_probability_targets_smoothing_mean",
    )
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
        # HessianFree solves to 1e-12: a truncated CG iterate is rounding-sensitive (measured on an
        # H100: 13 iterations to 1e-4 agree across devices only to 5e-9; the converged solve to 3e-13).
        options = {"cg_tol": 1e-12} if name == "HessianFree" else {}
        opt = getattr(optim, name)(m, nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, **options)

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


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "ACP"])
def test_cuda_factored_preconditioning_steps_like_the_ordinary_route_on_cpu(name):
    import copy

    from torch import nn

    from curvlab import optim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 20)).double()
    X, y = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    results, used = [], []
    for device, factored in (("cpu", False), ("cuda", True)):
        m = copy.deepcopy(model).to(device)
        batch = (X.to(device), y.to(device))
        opt = getattr(optim, name)(m, nn.MSELoss(), lr=0.1, damping=1e-2)
        opt.factored_gradients = factored

        def closure(m=m, opt=opt, batch=batch):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(batch[0]), batch[1])
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure, batch=batch)
        used.append(opt.last_factored_blocks)
        results.append([p.detach().cpu() for p in m.parameters()])
    assert used == [0, 2]
    for p, q in zip(*results):
        assert_close_rel(q, p, 1e-8, name)


STRUCTURED_CASES = [
    c
    for c in CASES
    if c.name
    in ("mlp_tanh_mse_mean", "mlp_relu_ce_mean_3batches", "conv2d_mse_mean_2batches", "mlp_gelu_bce_mean")
]


def _on_both_devices(build, case, dtype=torch.float64):
    """``build(problem)`` on the CPU and on CUDA, for the same case and dtype."""
    return build(case.build(dtype)), build(case.build(dtype, device="cuda"))


@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_cuda_kfac_matches_cpu(case, fisher_type):
    cpu, cuda = _on_both_devices(lambda p: cl.KFAC(p, fisher_type=fisher_type, mc_samples=2, seed=3), case)
    assert cuda.device.type == "cuda"
    dense = cuda.to_dense()
    assert dense.is_cuda
    assert_close_rel(dense.cpu(), cpu.to_dense(), 1e-10, f"KFAC {fisher_type}")
    for block_cpu, block_cuda in zip(cpu.blocks(), cuda.blocks()):
        assert_close_rel(block_cuda.A.cpu(), block_cpu.A, 1e-10, "factor A")
        assert_close_rel(block_cuda.G.cpu(), block_cpu.G, 1e-10, "factor G")
    v = torch.randn(cpu.shape[0], dtype=torch.float64)
    solved = cuda.solve(v.cuda(), damping=1e-2)
    assert solved.is_cuda
    assert_close_rel(solved.cpu(), cpu.solve(v, damping=1e-2), 1e-9, "solve")
    assert_close_rel(cl.eigvalsh(cuda).cpu(), torch.linalg.eigvalsh(cpu.to_dense()), 1e-9, "eigenvalues")


@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=lambda c: c.name)
def test_cuda_ekfac_acp_diagonal_match_cpu(case):
    builders = {
        "EKFAC": lambda p: cl.EKFAC(p),
        "ACP": lambda p: cl.ACP(p, alpha="heuristic"),
        "diagonal GGN": lambda p: cl.Diagonal(cl.GGN(p)),
        "diagonal Hessian": lambda p: cl.Diagonal(cl.Hessian(p)),
        "Hutchinson diagonal": lambda p: cl.Diagonal(cl.GGN(p), method="hutchinson", num_probes=7, seed=2),
        "block-diagonal Hessian": lambda p: cl.BlockDiagonal(cl.Hessian(p), by="parameter"),
    }
    for name, build in builders.items():
        cpu, cuda = _on_both_devices(build, case)
        assert cuda.device.type == "cuda", name
        assert_close_rel(cuda.to_dense().cpu(), cpu.to_dense(), 1e-9, name)
        v = torch.randn(cpu.shape[0], dtype=torch.float64)
        assert_close_rel((cuda @ v.cuda()).cpu(), cpu @ v, 1e-9, name)
        if name in ("EKFAC", "ACP", "diagonal GGN"):  # PSD (the others may be indefinite)
            assert_close_rel(cuda.solve(v.cuda(), damping=0.1).cpu(), cpu.solve(v, damping=0.1), 1e-8, name)


def test_cuda_float32_kfac_close_to_float64():
    case = STRUCTURED_CASES[0]
    cuda32 = cl.KFAC(case.build(torch.float32, device="cuda"))
    assert cuda32.dtype == torch.float32
    assert_close_rel(
        cuda32.to_dense().double().cpu(), cl.KFAC(case.build(torch.float64)).to_dense(), 1e-5, "float32"
    )


@pytest.mark.parametrize("case", STRUCTURED_CASES[1:3], ids=lambda c: c.name)
def test_cuda_compare_and_store_match_cpu(case, tmp_path):
    from curvlab.storage import Store, read

    reports = _on_both_devices(lambda p: cl.compare(cl.KFAC(p), cl.GGN(p), k=3), case)
    cpu, cuda = (r.to_dict() for r in reports)
    keys = ("rel_frobenius", "rel_spectral", "topk_eigenvalues_exact", "topk_eigenvalues_approx")
    assert len(cuda["blocks"]) == len(cpu["blocks"]) > 0
    for row_cpu, row_cuda in zip([cpu["overall"], *cpu["blocks"]], [cuda["overall"], *cuda["blocks"]]):
        for key in keys:
            assert row_cuda[key] == pytest.approx(row_cpu[key], rel=1e-8, abs=1e-12), key
    problem = case.build(torch.float64, device="cuda")
    top = cl.top_eigen(cl.GGN(problem), 2, progress=False)
    store = Store(tmp_path / "cuda.h5")
    store.save("kfac_vs_ggn", reports[1], step=1)
    store.save("ggn_top", top, step=1, curvature=cl.GGN(problem), problem=problem)
    records = read(tmp_path / "cuda.h5")
    assert [r.name for r in records] == ["kfac_vs_ggn", "ggn_top"]
    assert records[1].provenance["device"].startswith("cuda")
    assert_close_rel(torch.as_tensor(records[1].data["values"]), top.values.cpu(), 1e-12, "stored values")


def _device_models():
    from tests.test_batch_norm import _model, _problem
    from tests.test_fused_kernels import _causal_problem, _recurrent_problem

    return {
        "lstm": lambda device: _moved(_recurrent_problem(), device),
        "attention": lambda device: _moved(_causal_problem(), device),
        "batch_norm_training": lambda device: _moved(_problem(_model()), device),
    }


def _moved(problem: cl.Problem, device: str) -> cl.Problem:
    """The same problem with its model and data on ``device``."""
    model = problem.model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in problem.data]
    return cl.Problem(model, problem.loss_fn, data, eval_mode=problem.eval_mode)


@pytest.mark.parametrize("model", ["lstm", "attention", "batch_norm_training"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_cuda_models_without_fused_second_derivatives(model, name):
    """CuDNN RNNs, fused attention and batch norm in training give the CPU's curvature on CUDA."""
    operator_class, _ = OPERATORS[name]
    build = _device_models()[model]
    cuda = operator_class(build("cuda")).to_dense()
    cpu = operator_class(build("cpu")).to_dense()
    assert_close_rel(cuda.cpu(), cpu, 1e-9, f"{model} {name}")
    assert torch.backends.cudnn.enabled and torch.backends.mha.get_fastpath_enabled()
