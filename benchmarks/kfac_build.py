"""Time to build KFAC (type-2, MC, empirical) and the exact diagonal GGN, next to peers.

Same problems and process isolation as ``exact_products.py`` (each build timed
alternately with a gradient in its own process; ratios are to that gradient): the deep autoencoder
(784 outputs, so type-2 backpropagates 784 vectors per example, batched) and the
small CNN, batch 256. Peers: BackPACK ``KFAC`` (MC), ``KFLR`` (type-2) and
``DiagGGNExact``; curvlinops ``KFACLinearOperator`` (factors computed eagerly).

    python benchmarks/kfac_build.py --threads 2 [--device cuda]
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

MEASUREMENTS = [
    ("gradient", "torch"),
    ("kfac_mc", "curvlab"),
    ("kfac_mc", "curvlinops"),
    ("kfac_mc", "backpack"),
    ("kfac_empirical", "curvlab"),
    ("kfac_empirical", "curvlinops"),
    ("kfac_type2", "curvlab"),
    ("kfac_type2", "curvlinops"),
    ("kfac_type2", "backpack"),
    ("diag_ggn", "curvlab"),
    ("diag_ggn", "backpack"),
]


def _backpack(model, loss_fn, X, y, extension_name):
    import backpack
    from backpack import extensions

    model = backpack.extend(model)
    loss_fn = backpack.extend(loss_fn)
    extension = getattr(extensions, extension_name)()

    def run():
        model.zero_grad()
        with backpack.backpack(extension):
            loss_fn(model(X), y).backward()

    return run


def _build(problem_name: str, quantity: str, library: str, device: torch.device):
    model, loss_fn, (X, y) = build_problem(problem_name)
    model, X, y = model.to(device), X.to(device), y.to(device)
    params = list(model.parameters())
    if quantity == "gradient":
        return lambda: torch.autograd.grad(loss_fn(model(X), y), params)
    flavour = {"kfac_mc": "mc", "kfac_empirical": "empirical", "kfac_type2": "type-2"}.get(quantity)
    if library == "curvlab":
        problem = cl.Problem(model, loss_fn, (X, y))
        if quantity == "diag_ggn":
            return lambda: cl.Diagonal(cl.GGN(problem))
        return lambda: cl.KFAC(problem, fisher_type=flavour)
    if library == "curvlinops":
        import curvlinops

        def build():
            operator = curvlinops.KFACLinearOperator(
                model, loss_fn, params, [(X, y)], fisher_type=flavour, check_deterministic=False
            )
            operator.compute_kronecker_factors()

        return build
    extension = {"kfac_mc": "KFAC", "kfac_type2": "KFLR", "diag_ggn": "DiagGGNExact"}[quantity]
    return _backpack(model, loss_fn, X, y, extension)


def child(problem_name, quantity, library, threads, device_name):
    """Measure one build and print a JSON line."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    fn = _build(problem_name, quantity, library, device)
    peak = peak_bytes_of(fn, device)
    slow_on_cpu = quantity in ("kfac_type2", "diag_ggn") and device.type == "cpu"
    repeats = 1 if slow_on_cpu else 15
    gradient = _build(problem_name, "gradient", "torch", device)
    seconds, gradient_seconds = median_seconds_beside(fn, gradient, repeats=repeats)
    print(json.dumps({"seconds": seconds, "gradient_seconds": gradient_seconds, "peak_bytes": peak}))


def main():
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "cnn"])
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads, args.device)
        return
    results = {}
    print(
        f"threads={args.threads} device={args.device} torch={torch.__version__}"
        f" (timeout {args.timeout:.0f} s per measurement)"
    )
    for problem_name in args.problems:
        print(f"\n{problem_name}")
        rows = {
            (q, lib): run_child(
                __file__,
                [problem_name, q, lib, "--threads", str(args.threads), "--device", args.device],
                args.timeout,
            )
            for q, lib in MEASUREMENTS
        }
        print_table(rows)
        results[problem_name] = {f"{q}/{lib}": r for (q, lib), r in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
