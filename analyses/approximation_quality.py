"""How good is each curvature approximation? Per-layer errors against the exact GGN.

Trains a small MLP and a small CNN on the embedded digits data, then compares
KFAC (type-2 and MC), EKFAC, ACP, the exact block-diagonal, the exact diagonal and
the empirical Fisher with the exact GGN (``cl.compare``): relative Frobenius and
spectral errors per layer, top-k subspace overlap, and for Kronecker blocks the
error of the best single Kronecker product. Prints the tables, writes the reports
to HDF5 and a figure of the errors per layer and method.

    python analyses/approximation_quality.py [--out outputs/approximation_quality]
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


def small_cnn_for_digits() -> nn.Sequential:
    """Conv(1→6, 3×3) → ReLU → Conv(6→6, 3×3, stride 2) → ReLU → Linear(96→10) on 8×8 images."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 10),
    )


def train(model, X, y, steps, lr=0.05, batch_size=128, seed=0):
    """Minibatch SGD with momentum on cross-entropy."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        index = torch.randint(0, X.shape[0], (batch_size,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(X), y).item()


def approximations(problem, ggn):
    """The approximations compared with the exact GGN, by display name."""
    return {
        "KFAC": cl.KFAC(problem),
        "KFAC (MC, 1 sample)": cl.KFAC(problem, fisher_type="mc", seed=0),
        "EKFAC": cl.EKFAC(problem),
        "ACP": cl.ACP(problem),
        "block-diagonal": cl.BlockDiagonal(ggn, by="layer"),
        "diagonal": cl.Diagonal(ggn),
        "empirical Fisher": cl.EmpiricalFisher(problem),
    }


def analyse(name, model, data, k):
    """Compare every approximation with the exact GGN of ``model`` on ``data``."""
    problem = cl.Problem(model, nn.CrossEntropyLoss(), data)
    exact = cl.GGN(problem)
    ggn = cl.DenseOperator(exact.to_dense(), exact.param_shapes, exact.param_names)  # built once
    reports = {}
    for label, approx in approximations(problem, ggn).items():
        reports[label] = cl.compare(approx, ggn, k=k, approx_name=label, exact_name="exact GGN")
        print(f"\n[{name}] {label}\n{reports[label]}")
    return problem, reports


def figure(results, path):
    """Grouped bars: relative Frobenius error per layer (and overall) for each method and model."""
    fig = Figure(figsize=(7.5 * len(results), 4.4), layout="constrained")
    for ax, (name, reports) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items()):
        plot.approximation_errors(
            reports, ax=ax, title=f"{name}: error vs exact GGN (— best Kronecker product)"
        )
    plot.save(fig, path)


def main():
    """Train both models, compare the approximations, write tables, HDF5 and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/approximation_quality")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--examples", type=int, default=512, help="training examples the curvature is taken over"
    )
    parser.add_argument("--k", type=int, default=10, help="top eigenpairs compared")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (X, y), _ = load_digits(dtype=torch.float64, seed=args.seed)
    curvature_data = [(X[i : i + 256], y[i : i + 256]) for i in range(0, args.examples, 256)]
    results = {}
    start = time.perf_counter()
    for name, model in [("MLP 64-32-10", mlp([64, 32, 10], "tanh")), ("CNN", small_cnn_for_digits())]:
        model = model.double()
        loss = train(model, X, y, args.steps, seed=args.seed)
        print(f"\n=== {name}: trained {args.steps} steps, training loss {loss:.4f}")
        problem, reports = analyse(name, model, curvature_data, args.k)
        results[name] = reports
        print(f"({problem.describe()})")
    path = out / "approximation_quality.h5"
    cl.storage.remove(path)
    store = cl.Store(path)
    with store.transaction():
        for name, reports in results.items():
            for method, report in reports.items():
                store.save(f"{name}: {method}", report, dataset="digits", model=name)
    figure_path = out / "approximation_errors.png"
    figure(results, figure_path)
    print(f"\nwrote {path} and {figure_path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
