"""Ill-conditioning: iterations to converge on quadratics of growing condition number κ.

The lecture slides' exercise. f(θ) = Σ_n (x_nᵀθ − y_n)² is a quadratic with
Hessian H = 2XᵀX; X is built so that H has eigenvalues log-spaced in [1/κ, 1].
curvlab supplies what each method needs, from the same ``Hessian`` operator:
λ_max and λ_min (``cl.top_eigen``, for the tuned step sizes), the exact line
search step ε* = gᵀg / gᵀHg (``cl.curvature_along_gradient``) and the Newton
step (``H.solve``). Methods, with their classical optimal parameters:

* gradient descent, lr = 2 / (λ_max + λ_min): iterations ∝ κ;
* heavy-ball momentum (Polyak), lr = 4 / (√λ_max + √λ_min)², β = ((√κ − 1)/(√κ + 1))²: ∝ √κ;
* Nesterov, lr = 1/λ_max, β = (√κ − 1)/(√κ + 1): ∝ √κ;
* steepest descent with exact line search: ∝ κ;
* Newton: one step.

Counts iterations until f(θ) − f* ≤ tol · (f(θ₀) − f*); writes HDF5 and a log-log figure.

    python analyses/ill_conditioning.py [--out outputs/ill_conditioning]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
from curvlab import plot

METHODS = ("gradient descent", "momentum", "Nesterov", "exact line search", "Newton")


def quadratic(kappa: float, dim: int, seed: int) -> tuple[cl.Problem, torch.Tensor]:
    """A least-squares problem whose Hessian has eigenvalues log-spaced in [1/κ, 1]."""
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(-math.log10(kappa), 0, dim, dtype=torch.float64)
    X = Q @ torch.diag((eigenvalues / 2).sqrt()) @ Q.T  # 2XᵀX = Q diag(λ) Qᵀ
    optimum = torch.randn(dim, generator=generator, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    problem = cl.Problem(model, nn.MSELoss(reduction="sum"), (X, (X @ optimum).unsqueeze(1)))
    return problem, optimum


def iterations(method: str, problem: cl.Problem, tol: float, max_iterations: int) -> int:
    """Iterations of ``method`` from θ₀ = 0 until the suboptimality drops by ``tol`` (f* = 0)."""
    hessian = cl.Hessian(problem)
    weight = problem.model.weight
    lam_max = cl.top_eigen(hessian, 1, "largest", tol=1e-8, progress=False).values[0].item()
    lam_min = cl.top_eigen(hessian, 1, "smallest", tol=1e-8, basis_size=60, progress=False).values[0].item()
    kappa = lam_max / lam_min
    start = problem.loss().item()
    previous = weight.detach().clone()
    for t in range(1, max_iterations + 1):
        g = problem.gradient()
        theta = weight.detach().reshape(-1).clone()
        if method == "gradient descent":
            new = theta - 2 / (lam_max + lam_min) * g
        elif method == "momentum":
            lr = 4 / (math.sqrt(lam_max) + math.sqrt(lam_min)) ** 2
            beta = ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2
            new = theta - lr * g + beta * (theta - previous.reshape(-1))
        elif method == "Nesterov":
            beta = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
            lookahead = theta + beta * (theta - previous.reshape(-1))
            with torch.no_grad():
                weight.copy_(lookahead.reshape(weight.shape))
            new = lookahead - problem.gradient() / lam_max
        elif method == "exact line search":
            new = theta - cl.curvature_along_gradient(hessian, g).best_step * g
        elif method == "Newton":
            new = theta - hessian.solve(g, tol=1e-12)
        else:
            raise ValueError(method)
        previous = theta.reshape(weight.shape)
        with torch.no_grad():
            weight.copy_(new.reshape(weight.shape))
        if problem.loss().item() <= tol * start:
            return t
    return max_iterations


def main():
    """Iterations against κ for every method; HDF5 and a figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/ill_conditioning")
    parser.add_argument("--kappas", type=float, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iterations", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {method: [] for method in METHODS}
    print(f"{'κ':>8}" + "".join(f"{m:>20}" for m in METHODS))
    for kappa in args.kappas:
        for method in METHODS:
            problem, _ = quadratic(kappa, args.dim, args.seed)
            table[method].append(iterations(method, problem, args.tol, args.max_iterations))
        print(f"{kappa:>8g}" + "".join(f"{table[m][-1]:>20}" for m in METHODS))
    path = out / "ill_conditioning.h5"
    cl.storage.remove(path)
    cl.Store(path).save(
        "iterations to converge",
        {"kappa": np.array(args.kappas), **{m: np.array(v) for m, v in table.items()}},
        settings={"tol": args.tol, "dim": args.dim},
        dataset="synthetic quadratics",
    )
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    kappas = np.array(args.kappas)
    for method, counts in table.items():
        ax.plot(kappas, counts, marker="o", label=method)
    for power, label in ((1.0, "∝ κ"), (0.5, "∝ √κ")):
        reference = table["gradient descent" if power == 1 else "momentum"][0] * (kappas / kappas[0]) ** power
        ax.plot(kappas, reference, ls=":", color="grey", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("condition number κ")
    ax.set_ylabel(f"iterations to reduce f − f* by {args.tol:g}")
    ax.set_title(f"quadratics in {args.dim} dimensions")
    ax.legend(fontsize=8)
    figure = plot.save(fig, out / "ill_conditioning.png")
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
