"""Curvature across processes: every rank's result equals one process on the concatenated data.

Two processes with one thread each, spawned here on 127.0.0.1 with the gloo backend
(CUDA/NCCL versions in ``test_gpu.py``). The global data set is three batches of
unequal sizes; rank 0 holds two of them, rank 1 one (unequal shards and batch
counts). Each worker computes the single-process reference itself, on the
concatenated batches (``process_group=None``), and compares in float64.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import curvlab as cl
from curvlab.distributed import RankFailure
from tests.helpers import Wrapped, assert_close_rel

F64 = torch.float64
TIGHT = 1e-10  # products, factors: the ranks' sums in another order than one process' loop
LOOSE = 1e-8  # iterative results (Lanczos, CG) on those products


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, name: str):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    WORKERS[name](rank, size)
    dist.barrier()  # both ranks done before either tears gloo's connections down
    dist.destroy_process_group()
    # Past this point only the interpreter's teardown is left, where gloo's worker threads can
    # abort the process now and then ("terminate called without an active exception",
    # pytorch/pytorch#179291): the worker has passed, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(name: str, size: int = 2) -> None:
    mp.spawn(_entry, args=(size, _free_port(), name), nprocs=size, join=True)


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


WORKERS = {
    "exact": _exact_operators,
    "approximations": _approximations,
    "spectra": _spectra,
    "empty": _empty_shard,
    "failures": _failures,
    "groups of one": _groups_of_one,
}


@pytest.mark.parametrize("name", list(WORKERS))
def test_every_rank_gets_the_result_of_one_process_on_all_the_data(name):
    _spawn(name)


def test_fully_sharded_models_are_refused():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's (it needs a process group)
        pass

    from curvlab import distributed

    assert distributed.unwrap(nn.Linear(2, 2)).__class__ is nn.Linear
    with pytest.raises(cl.UnsupportedError, match="FullyShardedDataParallel model shards its parameters"):
        distributed._check_unsharded(FullyShardedDataParallel(), fsdp_classes=(FullyShardedDataParallel,))
