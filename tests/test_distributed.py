"""Curvature across processes: every rank's result equals one process on the concatenated data.

Two processes with one thread each, spawned here on 127.0.0.1 with the gloo backend
(CUDA/NCCL versions in ``test_gpu.py``). The global data set is three batches of
unequal sizes; rank 0 holds two of them, rank 1 one (unequal shards and batch
counts). Each worker computes the single-process reference itself, on the
concatenated batches (``process_group=None``), and compares in float64.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import curvlab as cl
from curvlab import optim
from curvlab.distributed import RankFailure
from tests.helpers import Wrapped, assert_close_rel

F64 = torch.float64
TIGHT = 1e-10  # products, factors: the ranks' sums in another order than one process' loop
LOOSE = 1e-8  # iterative results (Lanczos, CG) on those products
CPU = torch.device("cpu")  # where the CUDA worker runs when tried without a GPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, name: str, backend: str = "gloo"):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    WORKERS[name](rank, size)
    dist.barrier()  # both ranks done before either tears gloo's connections down
    dist.destroy_process_group()
    # Past this point only the interpreter's teardown is left, where gloo's worker threads can
    # abort the process now and then ("terminate called without an active exception",
    # pytorch/pytorch#179291): the worker has passed, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(name: str, size: int = 2, backend: str = "gloo") -> None:
    mp.spawn(_entry, args=(size, _free_port(), name, backend), nprocs=size, join=True)


# ---------------------------------------------------------------- the data and models
def _batches(loss: str = "ce"):
    generator = torch.Generator().manual_seed(0)
    sizes = (5, 3, 4)  # rank 0: the first two, rank 1: the last
    batches = []
    for n in sizes:
        X = torch.randn(n, 3, generator=generator, dtype=F64)
        y = (
            torch.randint(0, 2, (n,), generator=generator)
            if loss == "ce"
            else torch.randn(n, 2, generator=generator, dtype=F64)
        )
        batches.append((X, y))
    return batches


def _shard(batches, rank: int):
    return batches[:2] if rank == 0 else batches[2:]


def _model(wrap: bool = False):
    torch.manual_seed(1)  # the same weights on every rank
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return Wrapped(model) if wrap else model


def _pair(rank: int, loss_fn=None, wrap: bool = False, ddp: bool = False, loss: str = "ce"):
    """``(distributed problem, single-process problem on all the data)`` over the same model."""
    loss_fn = loss_fn or (nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss())
    model = _model(wrap)
    batches = _batches(loss)
    single = cl.Problem(model, loss_fn, batches, process_group=None)
    shared = DistributedDataParallel(model) if ddp else model
    return cl.Problem(shared, loss_fn, _shard(batches, rank)), single


# ---------------------------------------------------------------- workers (run on every rank)
def _exact_operators(rank, size):
    for wrap, ddp in ((False, False), (True, False), (False, True)):  # the MLP fast path, torch.func, DDP
        distributed, single = _pair(rank, wrap=wrap, ddp=ddp)
        what = f"wrap={wrap} ddp={ddp}"
        assert (
            distributed.group is not None and distributed.num_examples == 12 and distributed.num_batches == 3
        )
        assert distributed.reduction_factor == single.reduction_factor
        assert_close_rel(distributed.loss(), single.loss(), TIGHT, f"loss {what}")
        assert_close_rel(distributed.gradient(), single.gradient(), TIGHT, f"gradient {what}")
        v = torch.randn(single.num_params, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
        operators = {
            "hessian": lambda p: cl.Hessian(p),
            "ggn": lambda p: cl.GGN(p),
            "fisher": lambda p: cl.Fisher(p),
            "mc fisher": lambda p: cl.Fisher(p, mc_samples=3, seed=5),
            "ef": lambda p: cl.EmpiricalFisher(p),
        }
        for name, build in operators.items():
            ours, theirs = build(distributed), build(single)
            label = f"{name} {what}"
            assert_close_rel(ours.to_dense(), theirs.to_dense(), TIGHT, label)
            assert_close_rel(ours @ v, theirs @ v, TIGHT, f"{label} products")
            assert_close_rel(ours.quadratic_forms(v), theirs.quadratic_forms(v), TIGHT, f"{label} forms")
            assert_close_rel(ours.diag(), theirs.diag(), TIGHT, f"{label} diagonal")
            assert_close_rel(ours.blocks("layer")[1].to_dense(), theirs.blocks("layer")[1].to_dense(), TIGHT)
            solved = ours.solve(v[:, 0], damping=1.0, tol=1e-12)
            assert_close_rel(solved, theirs.solve(v[:, 0], damping=1.0, tol=1e-12), LOOSE, f"{label} solve")
            scipy_product = torch.as_tensor(ours.to_scipy() @ v[:, 0].numpy())
            assert_close_rel(scipy_product, theirs @ v[:, 0], TIGHT, f"{label} scipy")
        gradient = cl.Hessian(distributed).gradient()  # read off the kept pass
        assert_close_rel(gradient, single.gradient(), TIGHT, f"Hessian's gradient {what}")


def _approximations(rank, size):
    distributed, single = _pair(rank)
    builds = {
        "kfac type-2": lambda p: cl.KFAC(p),
        "kfac mc": lambda p: cl.KFAC(p, fisher_type="mc", mc_samples=2, seed=3),
        "kfac empirical": lambda p: cl.KFAC(p, fisher_type="empirical"),
        "kfac reduce": lambda p: cl.KFAC(p, kfac_approx="reduce", separate_weight_and_bias=True),
        "ekfac": lambda p: cl.EKFAC(p),
        "acp": lambda p: cl.ACP(p),
        "diagonal": lambda p: cl.Diagonal(cl.GGN(p)),
        "hutchinson": lambda p: cl.Diagonal(cl.GGN(p), method="hutchinson", num_probes=8, seed=2),
        "block diagonal": lambda p: cl.BlockDiagonal(cl.Hessian(p)),
    }
    for name, build in builds.items():
        assert_close_rel(build(distributed).to_dense(), build(single).to_dense(), TIGHT, name)
    ours = cl.compare(cl.KFAC(distributed), cl.GGN(distributed), k=2).overall
    theirs = cl.compare(cl.KFAC(single), cl.GGN(single), k=2).overall
    assert ours["rel_frobenius"] == pytest.approx(theirs["rel_frobenius"], rel=LOOSE)


def _spectra(rank, size):
    distributed, single = _pair(rank, loss="mse")
    for kind in (cl.Hessian, cl.GGN):
        ours, theirs = kind(distributed), kind(single)
        top_ours, top_theirs = cl.top_eigen(ours, 2, tol=1e-10), cl.top_eigen(theirs, 2, tol=1e-10)
        assert_close_rel(top_ours.values, top_theirs.values, LOOSE, f"{kind.__name__} top 2")
        for name in ("hutchinson", "hutch++"):
            a, b = cl.trace(ours, name, 12, seed=4), cl.trace(theirs, name, 12, seed=4)
            assert a.value == pytest.approx(b.value, rel=LOOSE) and a.standard_error == pytest.approx(
                b.standard_error, rel=1e-6, abs=1e-12
            )
        density_ours = cl.spectral_density(ours, 3, 5, seed=1)
        density_theirs = cl.spectral_density(theirs, 3, 5, seed=1)
        assert_close_rel(density_ours.density, density_theirs.density, LOOSE, "density")
        along_ours, along_theirs = cl.curvature_along_gradient(ours), cl.curvature_along_gradient(theirs)
        assert along_ours.g_C_g == pytest.approx(along_theirs.g_C_g, rel=TIGHT)
    condition = cl.condition_number(cl.GGN(distributed), method="lanczos")
    assert condition.lambda_max == pytest.approx(
        cl.condition_number(cl.GGN(single), method="lanczos").lambda_max
    )
    # identical numbers on every rank, not just close ones
    values = cl.top_eigen(cl.Hessian(distributed), 3).values
    gathered = distributed.group.gather(values.tolist())
    assert all(g == gathered[0] for g in gathered)


def _empty_shard(rank, size):
    batches = _batches()
    model = _model()
    single = cl.Problem(model, nn.CrossEntropyLoss(), batches, process_group=None)
    shard = batches if rank == 0 else []
    distributed = cl.Problem(model, nn.CrossEntropyLoss(), shard)
    assert distributed.num_local_batches == (3 if rank == 0 else 0)
    for build in (cl.GGN, cl.Hessian, cl.KFAC, cl.EKFAC, lambda p: cl.Diagonal(cl.GGN(p))):
        assert_close_rel(build(distributed).to_dense(), build(single).to_dense(), TIGHT, "empty shard")


def _failures(rank, size):
    # Different parameter counts on the ranks: an error on every rank, not a hang.
    torch.manual_seed(0)
    width = 4 if rank == 0 else 5
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
    with pytest.raises(cl.DataError, match="ranks of the process group disagree on the parameters"):
        cl.Problem(model, nn.CrossEntropyLoss(), _shard(_batches(), rank))
    # NaN in one rank's shard: that rank raises its error, the other names it.
    batches = _shard(_batches(), rank)
    distributed = cl.Problem(_model(), nn.CrossEntropyLoss(), batches)
    if rank == 1:
        batches[0][0][0, 0] = float("nan")
    expected = (
        (cl.NonFiniteError, "NaN or Inf") if rank == 1 else (RankFailure, "rank 1 of the process group")
    )
    for use in (
        lambda: cl.GGN(distributed).to_dense(),
        lambda: cl.KFAC(distributed),
        lambda: cl.trace(cl.GGN(distributed), num_matvecs=6),
    ):
        with pytest.raises(expected[0], match=expected[1]):
            use()
    # A data error in one rank's shard at construction: every rank raises.
    bad = [(torch.randn(3, 3, dtype=F64), torch.zeros(2).long())] if rank == 0 else _shard(_batches(), rank)
    error = (cl.DataError, "inputs have 3 examples") if rank == 0 else (RankFailure, "rank 0")
    with pytest.raises(error[0], match=error[1]):
        cl.Problem(_model(), nn.CrossEntropyLoss(), bad)


def _groups_of_one(rank, size):
    """A process group of one rank, and process_group=None: this rank's data alone."""
    groups = [dist.new_group([r]) for r in range(size)]
    batches = _shard(_batches(), rank)
    model = _model()
    alone = cl.Problem(model, nn.CrossEntropyLoss(), batches, process_group=groups[rank])
    local = cl.Problem(model, nn.CrossEntropyLoss(), batches, process_group=None)
    assert alone.group is None and local.group is None and alone.num_batches == len(batches)
    assert_close_rel(cl.GGN(alone).to_dense(), cl.GGN(local).to_dense(), 0, "group of one")


def _minibatches(steps: int, sizes: tuple[int, int], loss: str = "ce"):
    """``steps`` global minibatches of ``sum(sizes)`` examples; rank r's share is ``sizes[r]`` of them."""
    generator = torch.Generator().manual_seed(7)
    n = sum(sizes)
    batches = []
    for _ in range(steps):
        X = torch.randn(n, 3, generator=generator, dtype=F64)
        y = torch.randint(0, 2, (n,), generator=generator) if loss == "ce" else torch.randn(n, 2, dtype=F64)
        batches.append((X, y))
    return batches


def _share(batch, rank: int, sizes: tuple[int, int]):
    start = sum(sizes[:rank])
    return tuple(t[start : start + sizes[rank]] for t in batch)


def _train(optimizer, model, loss_fn, batches):
    """One ``step(closure, batch)`` per batch; the parameters after every step."""
    history = []
    for batch in batches:

        def closure(X=batch[0], y=batch[1]):
            optimizer.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

        optimizer.step(closure, batch=batch)
        history.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return history


OPTIMIZERS = {  # name: (build, tolerance against one process on the whole minibatch; None: MC labels)
    "kfac type-2": (lambda m, f, **o: optim.KFAC(m, f, fisher_type="type-2", lr=0.5, **o), TIGHT),
    "kfac empirical, inverses spread": (
        lambda m, f, **o: optim.KFAC(m, f, fisher_type="empirical", distribute_inverses=True, **o),
        TIGHT,
    ),
    "kfac mc, pi damping": (lambda m, f, **o: optim.KFAC(m, f, pi_damping=True, lr=0.3, **o), None),
    "ekfac": (lambda m, f, **o: optim.EKFAC(m, f, fisher_type="type-2", lr=0.5, **o), TIGHT),
    "acp": (lambda m, f, **o: optim.ACP(m, f, lr=0.1, distribute_inverses=True, **o), TIGHT),
    "diagonal ggn": (lambda m, f, **o: optim.DiagonalGGN(m, f, lr=0.1, damping=0.1, **o), TIGHT),
    "newton ggn, momentum": (
        lambda m, f, **o: optim.Newton(m, f, curvature="ggn", damping=0.1, momentum=0.5, **o),
        TIGHT,
    ),
    # CG to a tight tolerance: a loose one stops one iteration earlier or later on rounding differences
    "hessian-free, lm damping": (
        lambda m, f, **o: optim.HessianFree(m, f, cg_iterations=30, cg_tol=1e-10, **o),
        LOOSE,
    ),
    "kfac rescaled, lm damping": (
        lambda m, f, **o: optim.KFAC(
            m, f, fisher_type="type-2", rescale="ggn", damping_policy="levenberg-marquardt", **o
        ),
        TIGHT,
    ),
    "centered sgd": (lambda m, f, **o: optim.CenteredSGD(m, f, lr=0.2, **o), TIGHT),
}


def _training(rank, size):
    """Every optimizer, plain model (unequal shares) and DDP (equal shares; a sum loss too)."""
    settings = (
        ("plain", (5, 3), nn.CrossEntropyLoss()),
        ("ddp", (4, 4), nn.CrossEntropyLoss()),
        ("ddp, sum loss", (4, 4), nn.MSELoss(reduction="sum")),
    )
    for setting, sizes, loss_fn in settings:
        loss = "ce" if isinstance(loss_fn, nn.CrossEntropyLoss) else "mse"
        batches = _minibatches(3, sizes, loss)
        for name, (build, tolerance) in OPTIMIZERS.items():
            if setting == "ddp, sum loss" and name not in ("newton ggn, momentum", "kfac type-2"):
                continue
            label = f"{name} ({setting})"
            single_model, model = _model(), _model()
            trained = DistributedDataParallel(model) if setting.startswith("ddp") else model
            ours = _train(
                build(trained, loss_fn), trained, loss_fn, [_share(b, rank, sizes) for b in batches]
            )
            theirs = _train(build(single_model, loss_fn, process_group=None), single_model, loss_fn, batches)
            everyone = dist.group.WORLD
            for step, (a, b) in enumerate(zip(ours, theirs)):
                gathered = [torch.empty_like(a) for _ in range(size)]
                dist.all_gather(gathered, a, group=everyone)
                assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks differ"
                assert torch.isfinite(a).all() and not torch.equal(a, _flat_params(_model()))
                if tolerance is not None:
                    assert_close_rel(a, b, tolerance, f"{label}, step {step}")


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _training_failures(rank, size):
    """A NaN in one rank's batch skips the step on every rank; an error on one rank raises on all."""
    loss_fn = nn.CrossEntropyLoss()
    model = _model()
    optimizer = optim.KFAC(model, loss_fn, fisher_type="type-2")
    before = _flat_params(model)
    (batch,) = _minibatches(1, (4, 4))
    X, y = _share(batch, rank, (4, 4))
    if rank == 1:
        X = X.clone()
        X[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="the inputs of rank 1's batch has NaN"):
        _train(optimizer, model, loss_fn, [(X, y)])
    assert torch.equal(_flat_params(model), before) and optimizer.counts["skipped"] == 1
    # A data error on one rank while the curvature is built: that rank raises it, the other
    # RankFailure, and neither hangs nor changes the model.
    optimizer = optim.KFAC(model, loss_fn, fisher_type="type-2")
    X, y = _share(batch, rank, (4, 4))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # rank 1's NaN kept out
    model.zero_grad()
    loss_fn(model(X), y).backward()  # the gradient, computed by the user (step without a closure)
    if rank == 0:
        y = y[:3]
    expected = (cl.DataError, "inputs have 4 examples") if rank == 0 else (RankFailure, "rank 0")
    with pytest.raises(expected[0], match=expected[1]):
        optimizer.step(batch=(X, y))
    assert torch.equal(_flat_params(model), before)


def _files(rank, size):
    """Rank 0 alone writes stores and figures; provenance says how many processes there were."""
    from curvlab import distributed, plot

    folder = os.environ["CURVLAB_TEST_FOLDER"]
    assert distributed.shard(list(range(5))) == ([0, 1, 2] if rank == 0 else [3, 4])
    distributed_problem, _ = _pair(rank)
    store = cl.Store(os.path.join(folder, "run.h5"))
    store.save("ggn", cl.trace(cl.GGN(distributed_problem), "exact"), step=0, problem=distributed_problem)
    own = cl.Store(os.path.join(folder, f"rank{rank}.h5"))
    own.save("ggn", cl.trace(cl.GGN(distributed_problem), "exact"), step=0)
    figure = plot.save(plot.spectrum_histogram(torch.arange(4.0)), os.path.join(folder, f"rank{rank}.png"))
    dist.barrier()
    assert os.path.exists(own.path) == (rank == 0) and os.path.exists(figure) == (rank == 0)
    (record,) = cl.Store(os.path.join(folder, "run.h5")).records()
    origin = record.provenance
    assert (origin["world_size"], origin["backend"], origin["processes"]) == (2, "gloo", 2)


def _on_cuda(rank, size):
    """CUDA models and data: gloo (buffers through the CPU, one GPU for both) or NCCL (a GPU per rank)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU
    model = _model().to(device)
    batches = [(X.to(device), y.to(device)) for X, y in _batches("mse")]
    loss_fn = nn.MSELoss()
    single = cl.Problem(model, loss_fn, batches, process_group=None)
    distributed = cl.Problem(model, loss_fn, _shard(batches, rank))
    v = torch.randn(single.num_params, dtype=F64, device=device)
    distributed.group.broadcast_(v)
    for name, build in {
        "ggn": cl.GGN,
        "hessian": cl.Hessian,
        "mc fisher": lambda p: cl.Fisher(p, mc_samples=2, seed=1),
        "kfac": cl.KFAC,
        "ekfac": cl.EKFAC,
        "diagonal": lambda p: cl.Diagonal(cl.GGN(p)),
    }.items():
        ours, theirs = build(distributed), build(single)
        assert ours.device == device
        assert_close_rel((ours @ v).cpu(), (theirs @ v).cpu(), TIGHT, f"{name} on cuda")
    top = cl.top_eigen(cl.Hessian(distributed), 2, tol=1e-10).values
    assert_close_rel(top.cpu(), cl.top_eigen(cl.Hessian(single), 2, tol=1e-10).values.cpu(), LOOSE, "top 2")
    optimizer = optim.KFAC(model, loss_fn, lr=0.1, damping=1e-2, distribute_inverses=True)
    X, y = torch.cat([b[0] for b in _shard(batches, rank)]), torch.cat([b[1] for b in _shard(batches, rank)])

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure, batch=(X, y))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    gathered = distributed.group.gather(flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered)  # bit-identical on every rank


WORKERS = {
    "exact": _exact_operators,
    "approximations": _approximations,
    "spectra": _spectra,
    "empty": _empty_shard,
    "failures": _failures,
    "groups of one": _groups_of_one,
    "training": _training,
    "training failures": _training_failures,
    "files": _files,
    "cuda": _on_cuda,
}


@pytest.mark.parametrize("name", [name for name in WORKERS if name != "cuda"])
def test_every_rank_gets_the_result_of_one_process_on_all_the_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CURVLAB_TEST_FOLDER", str(tmp_path))  # inherited by the spawned workers
    _spawn(name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_cuda_ranks_get_the_result_of_one_process(backend):
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a GPU per rank: this machine has fewer than 2")
    _spawn("cuda", backend=backend)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):  # per-block reports
            for index, item in enumerate(value):
                yield from _leaves(item, f"{prefix}{key}/{index}/")
        else:
            yield f"{prefix}{key}", value


def test_torchrun_analyze_gives_the_numbers_of_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m curvlab analyze``: rank 0 writes the single-process numbers."""
    flags = ["--steps", "5", "--checkpoints", "2", "--hidden", "6", "--k", "3", "--dtype", "float64"]
    flags += ["--examples", "600", "--batch-size", "100", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "curvlab", "analyze", *flags, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    spread = subprocess.run(
        [*launch, "-m", "curvlab", "analyze", *flags, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert spread.returncode == 0, spread.stderr
    assert "split over 2 processes (gloo)" in spread.stdout
    assert spread.stdout.count("test accuracy") == 1  # rank 0 alone prints
    ones, twos = cl.storage.read(tmp_path / "one/analysis.h5"), cl.storage.read(tmp_path / "two/analysis.h5")
    assert len(ones) == len(twos) > 40
    assert sorted(p.name for p in (tmp_path / "one/figures").iterdir()) == sorted(
        p.name for p in (tmp_path / "two/figures").iterdir()
    )
    for one, two in zip(ones, twos):
        assert (one.kind, one.name, one.step) == (two.kind, two.name, two.step)
        assert two.provenance["world_size"] == 2 and one.provenance["world_size"] == 1
        values = one.data.get("values")
        for (key, a), (_, b) in zip(_leaves(one.data), _leaves(two.data)):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind != "f" or a.size == 0:
                assert np.array_equal(a, b), f"{one.kind} {one.name} {key}"
                continue
            # Lanczos residuals are rounding-sized: measured against the eigenvalues
            reference = values if key == "residuals" else a
            scale = max(float(np.abs(np.asarray(reference)).max()), 1e-300)
            assert np.abs(a - b).max() <= 1e-8 * scale, f"{one.kind} {one.name} step {one.step} {key}"


def test_the_script_of_the_scaling_page_gives_the_numbers_of_one_process(tmp_path):
    """docs/scaling.md's script, run by ``python`` and by ``torchrun --nproc_per_node=2``."""
    page = (Path(__file__).parents[1] / "docs" / "scaling.md").read_text()
    (script,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    printed = {}
    for name, launch in (
        ("one", []),
        ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "spectrum.py").write_text(script)
        run = subprocess.run(
            [sys.executable, *launch, "spectrum.py"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [line for line in run.stdout.splitlines() if line.startswith("top eigenvalues")]
        assert len(lines) == 1  # rank 0 alone prints
        printed[name] = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", lines[0])]
        assert len(cl.Store(folder / "spectrum.h5").records(kind="top_eigen")) == 1
    assert len(printed["one"]) == 4
    assert_close_rel(
        torch.tensor(printed["two"]), torch.tensor(printed["one"]), 1e-10, "eigenvalues and trace"
    )


def test_fully_sharded_models_are_refused():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's (it needs a process group)
        pass

    from curvlab import distributed

    assert distributed.unwrap(nn.Linear(2, 2)).__class__ is nn.Linear
    with pytest.raises(cl.UnsupportedError, match="FullyShardedDataParallel model shards its parameters"):
        distributed._check_unsharded(FullyShardedDataParallel(), fsdp_classes=(FullyShardedDataParallel,))
