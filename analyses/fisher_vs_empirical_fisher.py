"""Natural gradient vs empirical-Fisher preconditioning on linear regression (Kunstner et al. 2019).

For least squares y ≈ θ₁ x + θ₀ the Fisher equals the GGN (and the Hessian)
everywhere, so the natural-gradient field −F⁻¹∇L points straight at the
minimum from every θ. The empirical Fisher Σ_n ∇ℓ_n ∇ℓ_nᵀ depends on the
residuals: it vanishes at a perfect fit and is distorted far from it, so the
EF-preconditioned field bends and its steps slow down or overshoot. This script
draws both vector fields over a grid of θ (the picture of Kunstner, Hennig &
Balles 2019, Fig. 1) and runs both preconditioned methods from a few starts,
with curvlab's ``Fisher`` and ``EmpiricalFisher`` on a ``Problem`` at each point.
Writes HDF5 and a figure.

    python analyses/fisher_vs_empirical_fisher.py [--out outputs/fisher_vs_empirical_fisher]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
from curvlab import plot


def make_problem(seed: int, n: int = 200) -> cl.Problem:
    """Linear regression data, targets 2x − 1 + noise, inputs from two clusters; a linear model."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat(
        [torch.randn(n // 2, 1, generator=generator) - 1.5, torch.randn(n // 2, 1, generator=generator)]
    )
    x = x.double()
    y = 2 * x - 1 + 0.5 * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(1, 1).double()
    return cl.Problem(model, nn.MSELoss(), (x, y))


def set_theta(problem: cl.Problem, theta) -> None:
    """θ = (slope, intercept) into the model, in place."""
    with torch.no_grad():
        problem.model.weight.fill_(float(theta[0]))
        problem.model.bias.fill_(float(theta[1]))


def step_direction(problem: cl.Problem, kind: str, damping: float) -> np.ndarray:
    """−(C + damping·I)⁻¹ ∇L at the current θ for C = Fisher or empirical Fisher."""
    C = cl.Fisher(problem) if kind == "natural gradient" else cl.EmpiricalFisher(problem)
    dense = cl.DenseOperator(C.to_dense(), C.param_shapes, C.param_names)
    return -dense.solve(problem.gradient(), damping).numpy()


def trajectory(problem: cl.Problem, kind: str, start, lr: float, steps: int, damping: float) -> np.ndarray:
    """θ_t of preconditioned gradient descent from ``start``."""
    theta = np.array(start, dtype=float)
    path = [theta.copy()]
    for _ in range(steps):
        set_theta(problem, theta)
        theta = theta + lr * step_direction(problem, kind, damping)
        path.append(theta.copy())
    return np.array(path)


def main():
    """Vector fields and trajectories of both methods; HDF5 and a figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/fisher_vs_empirical_fisher")
    parser.add_argument("--grid", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problem = make_problem(args.seed)
    x, y = problem.data[0]
    design = torch.cat([x, torch.ones_like(x)], 1)
    optimum = torch.linalg.lstsq(design, y).solution.squeeze(1).numpy()
    slopes = np.linspace(optimum[0] - 3, optimum[0] + 3, args.grid)
    intercepts = np.linspace(optimum[1] - 3, optimum[1] + 3, args.grid)
    kinds = ("natural gradient", "empirical Fisher")
    fields = {kind: np.zeros((args.grid, args.grid, 2)) for kind in kinds}
    losses = np.zeros((args.grid, args.grid))
    for i, b in enumerate(intercepts):
        for j, w in enumerate(slopes):
            set_theta(problem, (w, b))
            losses[i, j] = problem.loss().item()
            for kind in kinds:
                fields[kind][i, j] = step_direction(problem, kind, args.damping)
    starts = [
        (optimum[0] + dw, optimum[1] + db) for dw, db in [(-2.5, 2.5), (2.5, 2.0), (2.0, -2.5), (-2.5, -1.0)]
    ]
    paths = {
        kind: [trajectory(problem, kind, s, args.lr, args.steps, args.damping) for s in starts]
        for kind in kinds
    }
    path = out / "fisher_vs_empirical_fisher.h5"
    cl.storage.remove(path)
    store = cl.Store(path)
    with store.transaction():
        for kind in kinds:
            final = np.array([p[-1] for p in paths[kind]])
            distance = np.linalg.norm(final - optimum, axis=1)
            store.save(
                kind,
                {"slopes": slopes, "intercepts": intercepts, "field": fields[kind], "loss": losses},
                settings={"damping": args.damping, "lr": args.lr, "steps": args.steps},
                dataset="synthetic linear regression",
            )
            store.save(f"{kind} trajectories", {"paths": np.stack(paths[kind]), "optimum": optimum})
            print(
                f"{kind:<18} after {args.steps} steps of lr {args.lr}: distance to the optimum "
                + ", ".join(f"{d:.3g}" for d in distance)
            )
    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    W, B = np.meshgrid(slopes, intercepts)
    for ax, kind in zip(axes, kinds):
        ax.contour(W, B, np.log(losses), levels=15, colors="grey", linewidths=0.6)
        U, V = fields[kind][..., 0], fields[kind][..., 1]
        norm = np.hypot(U, V) + 1e-300
        ax.quiver(W, B, U / norm, V / norm, np.log10(norm), cmap="viridis", scale=30, width=0.004)
        for trace in paths[kind]:
            ax.plot(trace[:, 0], trace[:, 1], "-o", ms=2, lw=1, color="tab:red")
        ax.plot(*optimum, marker="*", ms=14, color="black")
        ax.set_title(f"{kind}: −C⁻¹∇L (direction; colour log₁₀ length)")
        ax.set_xlabel("slope θ₁")
    axes[0].set_ylabel("intercept θ₀")
    figure = plot.save(fig, out / "fisher_vs_empirical_fisher.png")
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
