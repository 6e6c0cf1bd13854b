"""Curvature across processes: 2 processes × 1 thread against 1 process × 2 threads.

The deep autoencoder (P ≈ 2.8 M parameters) over 8 batches of 256 random examples;
one process holds all 8 batches, each of two processes (gloo on CPUs, NCCL on GPUs,
started by ``torchrun``) holds 4. Timed: the gradient of the risk, one GGN product,
a block of 10 GGN products, a type-2 KFAC build, a 100-probe Hutchinson trace and
KFAC's damped inverse (computed whole, or spread over the ranks as the optimizers'
``distribute_inverses=True`` does). The throughput ratio is the single process' time
over the two processes' time (above 1: the two processes are faster); the target for
products is ≥ 0.9. Bytes all-reduced per product are counted on ``torch.distributed``
itself and compared with the formula 4·(P + w) in float32 (the product, and one
failure flag per rank, in one all-reduce).

The two configurations run alternately, ``--rounds`` times each, and every figure is
the median over rounds of each run's median (runs of one machine drift 10-30 %).

    python benchmarks/distributed.py [--rounds 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds  # noqa: E402

import curvlab as cl  # noqa: E402
from curvlab import distributed  # noqa: E402
from curvlab.models import deep_autoencoder  # noqa: E402
from curvlab.optim import data_parallel  # noqa: E402
from curvlab.optim import state as curvature_state  # noqa: E402

QUANTITIES = ["gradient", "ggn_product", "ggn_10_products", "kfac_type2", "trace_100", "kfac_inverse"]


def _synchronised(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    """``common.median_seconds`` with every rank synchronised around each timed call."""
    return median_seconds(fn, repeats, warmup=1, synchronise=lambda: _synchronised(device))


class _CountedAllReduce:
    """Counts the bytes ``torch.distributed.all_reduce`` is given (curvlab calls it by module attribute)."""

    def __init__(self):
        self.original, self.bytes, self.calls = dist.all_reduce, 0, 0

    def __call__(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1
        return self.original(tensor, *args, **kwargs)

    def __enter__(self):
        dist.all_reduce = self
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def child(device_name: str, batches: int, batch_size: int, repeats: int) -> None:
    """One configuration's timings (this rank's share of the batches); rank 0 prints them as JSON."""
    device = torch.device(device_name)
    with distributed.launched(device_name):
        group = distributed.resolve("auto")
        size = 1 if group is None else group.size
        torch.manual_seed(0)
        model = deep_autoencoder(784).to(device)
        data = [(torch.rand(batch_size, 784), torch.rand(batch_size, 784)) for _ in range(batches)]
        shard = [(X.to(device), y.to(device)) for X, y in distributed.shard(data)]
        problem = cl.Problem(model, nn.MSELoss(), shard)
        G = cl.GGN(problem)
        P = G.shape[0]
        v = torch.randn(P, device=device)
        V = torch.randn(P, 10, device=device)
        K = cl.KFAC(problem, fisher_type="type-2")

        def invert():  # of a fresh copy: a KFAC keeps its factors' eigendecompositions once computed
            fresh = curvature_state.restore(
                curvature_state.snapshot(K), K.param_shapes, None, K.dtype, device
            )
            if group is None:
                return fresh.inverse(1e-3)
            return data_parallel.spread_inverse(
                group, fresh, lambda share: share.inverse(1e-3), (ValueError,)
            )

        timings = {
            "gradient": _median_seconds(problem.gradient, device, repeats),
            "ggn_product": _median_seconds(lambda: G @ v, device, repeats),
            "ggn_10_products": _median_seconds(lambda: G @ V, device, repeats),
            "kfac_type2": _median_seconds(lambda: cl.KFAC(problem, fisher_type="type-2"), device, repeats),
            "trace_100": _median_seconds(
                lambda: cl.trace(G, "hutchinson", num_matvecs=100, seed=0, progress=False), device, 1
            ),
            "kfac_inverse": _median_seconds(invert, device, repeats),
        }
        communication = {}
        if group is not None:
            with _CountedAllReduce() as counter:
                G @ v
            communication = {"product_bytes": counter.bytes, "product_calls": counter.calls}
        if distributed.is_writer():
            print(json.dumps({"processes": size, "parameters": P, "seconds": timings, **communication}))
            sys.stdout.flush()


def _run(command: list[str], threads: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CURVLAB_BENCH_THREADS": str(threads)}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command[:6])}… failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    """Both configurations, alternately; the table of medians and the bytes per product."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ["--device", args.device, "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    shape += ["--repeats", str(args.repeats)]
    if args.child:
        torch.set_num_threads(int(os.environ.get("CURVLAB_BENCH_THREADS", "1")))
        child(args.device, args.batches, args.batch_size, args.repeats)
        return
    script = str(Path(__file__).resolve())
    one_command = [sys.executable, script, "--child", *shape]
    two_command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two_command += [script, "--child", *shape]
    # on CPUs: the same 2 cores, as 2 threads of one process or 1 thread of each of 2
    ones, twos = [], []
    for _ in range(args.rounds):  # alternately, so drift hits both alike
        ones.append(_run(one_command, 2 if args.device == "cpu" else 1, args.timeout))
        twos.append(_run(two_command, 1, args.timeout))
    P, w = ones[0]["parameters"], 2

    def median(runs, quantity):
        return statistics.median(run["seconds"][quantity] for run in runs)

    print(
        f"deep autoencoder, P = {P:,} parameters, {args.batches} batches of {args.batch_size}, {args.device}"
    )
    print(f"{'quantity':<18}{'1 proc s':>12}{'2 procs s':>12}{'throughput ratio':>18}")
    results = {"parameters": P, "device": args.device, "quantities": {}}
    for quantity in QUANTITIES:
        one, two = median(ones, quantity), median(twos, quantity)
        results["quantities"][quantity] = {"one_process": one, "two_processes": two, "ratio": one / two}
        print(f"{quantity:<18}{one:>12.4f}{two:>12.4f}{one / two:>18.2f}")
    counted = twos[0]["product_bytes"]
    formula = 4 * (P + w)  # float32 product and one flag per rank
    print(
        f"bytes all-reduced per product: {counted:,} in {twos[0]['product_calls']} all-reduce "
        f"(formula 4·(P + w) = {formula:,}: {'equal' if counted == formula else 'DIFFERENT'})"
    )
    results.update(product_bytes=counted, product_bytes_formula=formula)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
