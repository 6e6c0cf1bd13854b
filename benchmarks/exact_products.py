"""Time one gradient and one product with each exact operator, next to peer libraries.

Problems: the deep autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid, MSE,
batch 256, random data) and a small CNN (two 3×3 convolutions, 28×28 inputs,
cross-entropy, batch 256). Each measurement runs in its own process: median of
repeats after warm-up, and the extra peak memory of one call. Ratios are to the
plain gradient timed alternately in the same process and to the fastest peer for the same quantity.

    python benchmarks/exact_products.py --threads 2 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import build_problem, median_seconds_beside, peak_bytes_of, print_table, run_child  # noqa: E402

import curvlab as cl  # noqa: E402

QUANTITIES = ["gradient", "hessian", "ggn", "fisher", "fisher_mc", "ef"]
IMPLEMENTATIONS = {
    "gradient": ["torch"],
    "hessian": ["curvlab", "curvlinops", "backpack"],
    "ggn": ["curvlab", "curvlinops", "backpack"],
    "fisher": ["curvlab"],
    "fisher_mc": ["curvlab", "curvlinops"],
    "ef": ["curvlab", "curvlinops"],
}


def _product(problem_name: str, quantity: str, library: str, device: torch.device):
    model, loss_fn, (X, y) = build_problem(problem_name)
    model, X, y = model.to(device), X.to(device), y.to(device)
    params = [p for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    if quantity == "gradient":

        def gradient():
            return torch.autograd.grad(loss_fn(model(X), y), params)

        return gradient, device
    if library == "curvlab":
        problem = cl.Problem(model, loss_fn, (X, y))
        operator = {
            "hessian": lambda: cl.Hessian(problem),
            "ggn": lambda: cl.GGN(problem),
            "fisher": lambda: cl.Fisher(problem),
            "fisher_mc": lambda: cl.Fisher(problem, mc_samples=1, seed=0),
            "ef": lambda: cl.EmpiricalFisher(problem),
        }[quantity]()
        return (lambda: operator @ v), device
    if library == "curvlinops":
        import curvlinops

        cls = {
            "hessian": curvlinops.HessianLinearOperator,
            "ggn": curvlinops.GGNLinearOperator,
            "fisher_mc": curvlinops.FisherMCLinearOperator,
            "ef": curvlinops.EFLinearOperator,
        }[quantity]
        operator = cls(model, loss_fn, params, [(X, y)], check_deterministic=False)
        return (lambda: operator @ v), device
    if library == "backpack":
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        def backpack_product():
            output = model(X)
            loss = loss_fn(output, y)
            if quantity == "ggn":
                return ggn_vector_product_from_plist(loss, output, params, v)
            return hessian_vector_product(loss, params, v)

        return backpack_product, device
    raise ValueError(library)


def child(problem_name: str, quantity: str, library: str, threads: int, device_name: str) -> None:
    """Measure one (problem, quantity, library) and print a JSON line."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    fn, device = _product(problem_name, quantity, library, torch.device(device_name))
    peak = peak_bytes_of(fn, device)  # first call: memory not yet cached by the allocator
    gradient, _ = _product(problem_name, "gradient", "torch", device)
    seconds, gradient_seconds = median_seconds_beside(fn, gradient, repeats=7)
    print(json.dumps({"seconds": seconds, "gradient_seconds": gradient_seconds, "peak_bytes": peak}))


def main() -> None:
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "cnn"])
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads, args.device)
        return
    results = {}
    print(f"threads={args.threads} device={args.device} torch={torch.__version__}")
    for problem_name in args.problems:
        print(f"\n{problem_name}")
        rows = {}
        for quantity in QUANTITIES:
            for library in IMPLEMENTATIONS[quantity]:
                rows[quantity, library] = run_child(
                    __file__,
                    [
                        problem_name,
                        quantity,
                        library,
                        "--threads",
                        str(args.threads),
                        "--device",
                        args.device,
                    ],
                    args.timeout,
                )
        print_table(rows, width=11)
        results[problem_name] = {f"{q}/{lib}": r for (q, lib), r in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
