"""How good is each curvature approximation? Per-layer errors against the exact GGN.

Trains a small MLP and a small CNN on the embedded digits data, then compares
KFAC (type-2 and MC), EKFAC, ACP, the exact block-diagonal, the exact diagonal and
the empirical Fisher with the exact GGN (``cl.compare``): relative Frobenius and
spectral errors per layer, top-k subspace overlap, and for Kronecker blocks the
error of the best single Kronecker product. Prints the tables, writes the reports
as JSON and a figure of the errors per layer and method.

    python analyses/approximation_quality.py [--out outputs/approximation_quality]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvlab as cl  # noqa: E402
from curvlab.data import load_digits  # noqa: E402
from curvlab.models import mlp  # noqa: E402


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


def plot(results, path):
    """Grouped bars: relative Frobenius error per layer (and overall) for each method."""
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, (name, reports) in zip(axes[0], results.items()):
        methods = list(reports)
        layers = [
            row["name"].split(" + ")[0].rsplit(".", 1)[0] for row in next(iter(reports.values())).blocks
        ]
        groups = [*layers, "overall"]
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            report = reports[method]
            values = [row["rel_frobenius"] for row in report.blocks] + [report.overall["rel_frobenius"]]
            positions = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(positions, values, width, label=method)
            for x, value in zip(positions, values):
                if value < 1e-12:  # exact: invisible on a log axis
                    ax.annotate(
                        "0",
                        (x, 0),
                        xycoords=("data", "axes fraction"),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=bars.patches[0].get_facecolor(),
                    )
            if method == "KFAC":
                bound = [row.get("optimal_kronecker_rel_frobenius", float("nan")) for row in report.blocks]
                ax.scatter(positions[:-1], bound, marker="_", s=200, color="black", zorder=3)
        ax.set_xticks(range(len(groups)), [f"layer {g}" if g != "overall" else g for g in groups])
        ax.set_ylabel("‖A − G‖_F / ‖G‖_F")
        ax.set_yscale("log")
        ax.set_title(f"{name}: error vs exact GGN (— best Kronecker product)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main():
    """Train both models, compare the approximations, write tables, JSON and the figure."""
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
    (out / "reports.json").write_text(
        json.dumps(
            {name: {m: r.to_dict() for m, r in reports.items()} for name, reports in results.items()},
            indent=1,
        )
    )
    figure = out / "approximation_errors.png"
    plot(results, figure)
    print(f"\nwrote {out / 'reports.json'} and {figure} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
