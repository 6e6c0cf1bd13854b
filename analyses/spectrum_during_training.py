"""The Hessian spectrum during SGD training: top eigenvalues, trace and density; λ_max against 2/lr.

Gradient descent on a quadratic with curvature λ is stable only for lr < 2/λ
(thesis §3.1.2), so plain SGD cannot stay where λ_max(H) > 2/lr for long. This
script trains an MLP on the embedded digits data with two learning rates and
tracks, every few steps, the Hessian's top eigenvalues (Lanczos, matrix-free),
its trace (Hutch++) and its spectral density (stochastic Lanczos quadrature),
all stored in one HDF5 file, with figures beside it.

    python analyses/spectrum_during_training.py [--out outputs/spectrum_during_training]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
from curvlab import plot
from curvlab.data import load_digits
from curvlab.models import mlp


def run(lr: float, args, X, y, store: cl.Store) -> None:
    """Full-batch-curvature tracking along a minibatch SGD run with learning rate ``lr``."""
    torch.manual_seed(args.seed)
    model = mlp([64, *args.hidden, 10], "tanh").double()
    problem = cl.Problem(model, nn.CrossEntropyLoss(), (X, y))
    hessian = cl.Hessian(problem)  # one batch: the gradient graph is cached between products
    name = f"hessian lr={lr}"
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with store.transaction():
                top = cl.top_eigen(hessian, args.k, tol=1e-5, progress=False)
                store.save(
                    name, top, step, settings={"learning_rate": lr}, curvature=hessian, dataset="digits"
                )
                store.save(name, cl.trace(hessian, "hutch++", 60, seed=step, progress=False), step)
                store.save(name, cl.spectral_density(hessian, 8, 40, seed=step, progress=False), step)
                store.save(name, {"loss": problem.loss().item()}, step)
            print(
                f"lr {lr:<5} step {step:>4}  loss {problem.loss().item():.4f}  "
                f"λ_max {top.values[0].item():8.3f}  2/lr {2 / lr:6.1f}"
            )
        if step == args.steps:
            break
        index = torch.randint(0, X.shape[0], (args.batch_size,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()


def figure(store: cl.Store, rates, path: Path) -> None:
    """λ_max against 2/lr for each learning rate, and the final densities."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for lr in rates:
        records = store.records(name=f"hessian lr={lr}")
        steps = [r.step for r in records if r.kind == "top_eigen"]
        values = [float(r.data["values"][0]) for r in records if r.kind == "top_eigen"]
        (line,) = left.plot(steps, values, marker="o", ms=3, label=f"λ_max, lr = {lr}")
        left.axhline(2 / lr, color=line.get_color(), ls="--", lw=1, label=f"2 / lr = {2 / lr:g}")
    left.set_yscale("log")
    left.set_xlabel("SGD step")
    left.set_ylabel("top Hessian eigenvalue")
    left.set_title("λ_max(H) during training against the stability edge 2/lr")
    left.legend(fontsize=8)
    last = {}
    for lr in rates:
        densities = [r for r in store.records(name=f"hessian lr={lr}") if r.kind == "spectral_density"]
        last[f"lr = {lr}, step {densities[-1].step}"] = densities[-1]
    plot.densities(last, ax=right, title="Hessian spectral density at the end (SLQ)")
    plot.save(fig, path)


def main():
    """Train with each learning rate, track the spectrum, write HDF5 and figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/spectrum_during_training")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50, help="steps between spectra")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.5, 2.0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--examples", type=int, default=512, help="examples the curvature is taken over")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spectrum_during_training.h5"
    cl.storage.remove(path)
    store = cl.Store(path)
    (X, y), _ = load_digits(dtype=torch.float64, seed=args.seed)
    X, y = X[: args.examples], y[: args.examples]
    start = time.perf_counter()
    for lr in args.lrs:
        run(lr, args, X, y, store)
    figure(store, args.lrs, out / "lambda_max_vs_lr.png")
    written = plot.plot_store(path, out / "figures")
    print(
        f"wrote {path}, {out / 'lambda_max_vs_lr.png'} and {len(written)} figures "
        f"({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
