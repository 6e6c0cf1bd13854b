"""Per-step wall time of the optimizers relative to SGD and Adam, amortised over 100 steps.

Deep autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid, MSE, random
data), minibatch 200. Each optimizer runs 100 steps (curvature and inverses
refreshed every 100 steps for KFAC, EKFAC and ACP, so each run contains exactly
one refresh), after 3 untimed warm-up steps; each in its own process, where SGD
and Adam run alternately with it (``--rounds`` times, medians), so the ratios
do not carry the drift of a shared machine. A run with a skipped (non-finite)
step is reported as an error, not timed.

    python benchmarks/optimizer_steps.py [--threads 2] [--steps 100] [--rounds 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_child  # noqa: E402

from curvlab import optim  # noqa: E402
from curvlab.models import deep_autoencoder  # noqa: E402

OPTIMIZERS = {
    "SGD": lambda m, lf, every: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Adam": lambda m, lf, every: torch.optim.Adam(m.parameters(), lr=1e-3),
    "CenteredSGD": lambda m, lf, every: optim.CenteredSGD(m, lf, lr=0.1, momentum=0.9),
    "ACP": lambda m, lf, every: optim.ACP(m, lf, lr=0.01, alpha=1.0, damping=0.1, curvature_every=every),
    "KFAC": lambda m, lf, every: optim.KFAC(m, lf, lr=0.01, damping=0.1, curvature_every=every),
    "KFAC (π-damping)": lambda m, lf, every: optim.KFAC(
        m, lf, lr=0.01, damping=0.1, curvature_every=every, pi_damping=True
    ),
    "EKFAC": lambda m, lf, every: optim.EKFAC(m, lf, lr=0.01, damping=0.1, curvature_every=every),
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(name: str, model, loss_fn, X, every: int, device: torch.device):
    """``run(first, count)``: ``count`` timed updates of one optimizer on batches ``X[first:]``."""
    opt = OPTIMIZERS[name](model, loss_fn, every)
    curvlab_step = not isinstance(opt, (torch.optim.SGD, torch.optim.Adam))

    def step(i):
        batch = (X[i], X[i])

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            return loss

        return opt.step(closure, batch=batch) if curvlab_step else opt.step(closure)

    def run(first: int, count: int) -> float:
        if curvlab_step and hasattr(opt, "steps"):
            opt.steps = 0  # every timed run starts with a refresh, as every 100th step does
        _synchronize(device)
        start = time.perf_counter()
        for i in range(first, first + count):
            step(i)
        _synchronize(device)
        return (time.perf_counter() - start) / count

    return opt, run


def child(name: str, steps: int, rounds: int, threads: int, device: torch.device) -> None:
    """Time ``steps`` updates of one optimizer, alternating with SGD and Adam; print a JSON line.

    Each of ``rounds`` rounds times ``steps`` updates of SGD, of Adam and of the
    optimizer (each on its own copy of the model), so the ratios compare runs
    under the same conditions of a shared machine; medians over the rounds.
    """
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = deep_autoencoder(784).to(device), nn.MSELoss()
    X = torch.rand(steps + 3, 200, 784).to(device)
    runners = {}
    for label in dict.fromkeys(["SGD", "Adam", name]):
        opt, run = _runner(label, copy.deepcopy(model), loss_fn, X, steps, device)
        run(0, 3)  # warm-up (also builds a first curvature)
        runners[label] = (opt, run, [])
    for _ in range(rounds):
        for _, run, times in runners.values():
            times.append(run(3, steps))
    skipped = getattr(runners[name][0], "counts", {}).get("skipped", 0)
    if skipped:  # a skipped step costs less than a real one: the timing would flatter
        raise SystemExit(f"{skipped} steps skipped (non-finite): choose a stable setting")
    medians = {label: statistics.median(times) for label, (_, _, times) in runners.items()}
    print(
        json.dumps({"seconds": medians[name], "sgd_seconds": medians["SGD"], "adam_seconds": medians["Adam"]})
    )


def main() -> None:
    """Run every optimizer and print seconds per step and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.rounds, args.threads, torch.device(args.device))
        return
    print(
        f"threads={args.threads} device={args.device} torch={torch.__version__},"
        f" {args.steps} steps, batch 200, 784-autoencoder"
    )
    rows = {}
    for name in OPTIMIZERS:
        options = [name, "--steps", str(args.steps), "--rounds", str(args.rounds)]
        options += ["--threads", str(args.threads), "--device", args.device]
        rows[name] = run_child(__file__, options, args.timeout)
    print("ratios: to SGD and Adam timed alternately in the same process")
    print(f"{'optimizer':<20}{'s / step':>10}{'x SGD':>8}{'x Adam':>8}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<20}{row['error']}")
            continue
        seconds = row["seconds"]
        to_sgd, to_adam = seconds / row["sgd_seconds"], seconds / row["adam_seconds"]
        print(f"{name:<20}{seconds:>10.4f}{to_sgd:>8.2f}{to_adam:>8.2f}")


if __name__ == "__main__":
    main()
