"""Spectra benchmark: top-1/top-10 Hessian eigenvalues, a 100-probe trace and an SLQ density.

curvlab (``cl.top_eigen``, ``cl.trace``, ``cl.spectral_density``) against PyHessian
(power iteration / Hutchinson / SLQ; curvlab's trace uses Hutchinson too, so all
three spend 100 products on the same estimator) and SciPy ``eigsh`` on a curvlinops
``HessianLinearOperator`` (curvlinops' own ``hutchinson_trace`` and
``lanczos_approximate_spectrum`` for the trace and the density), on the deep
autoencoder and the small CNN (batch 256, float32), and the SLQ density on an MLP
64-128-128-10. Every measurement runs in its own process with the same thread
count. Eigenvalues are compared with a converged reference (curvlab Lanczos at a
relative residual of 1e-5); each row reports the time, the value(s), their
relative error against the reference and, where the method gives vectors, the
relative residual ‖Hv − λv‖ / |λ|. ``curvlab-random`` is ``cl.top_eigen`` with a
random start vector instead of its default gradient start, the peers' choice.

``curvlab-block`` is block Lanczos (4 vectors per product, a basis of 80). ``--problems
resnet18`` adds torchvision's ResNet-18 on 32×32 inputs at batch 32 (top-10 unless
``--tasks`` says otherwise; on 2 CPU cores its converged top-10 took over 45 min, so
``--tasks top1`` is the peer comparison that fits a CPU).

    python benchmarks/spectra.py [--threads 2] [--device cuda] [--problems autoencoder cnn mlp resnet18]
    python benchmarks/spectra.py --problems resnet18 --tasks top1 --libraries curvlab pyhessian curvlinops
    python benchmarks/spectra.py --block-versus-single --problems autoencoder
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_problem, resnet18_problem, run_child  # noqa: E402

import curvlab as cl  # noqa: E402
from curvlab.models import mlp  # noqa: E402

TASKS = ("top1", "top10", "trace100", "density")
LIBRARIES = ("curvlab", "curvlab-random", "curvlab-block", "pyhessian", "curvlinops")
BLOCK = {"block_size": 4, "basis_size": 80}  # curvlab-block: block Lanczos, 4 vectors per product


def _mlp_problem(batch_size: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp([64, 128, 128, 10], "tanh")
    return model, nn.CrossEntropyLoss(), (torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,)))


def _patch_torch_eig() -> None:
    """PyHessian 0.1's density calls ``torch.eig`` (removed from PyTorch): an equivalent for symmetric T."""

    def eig(T, eigenvectors=False):
        values, vectors = torch.linalg.eigh(T)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    torch.eig = eig


def _relative_residuals(hessian: cl.Hessian, values, vectors) -> list[float]:
    if not isinstance(vectors, torch.Tensor):
        vectors = torch.as_tensor(np.asarray(vectors))
    V = vectors.to(hessian.device, torch.float32).reshape(hessian.shape[0], -1)
    lam = torch.as_tensor(np.asarray(values), dtype=torch.float32, device=hessian.device)
    return ((hessian @ V - V * lam).norm(dim=0) / lam.abs()).tolist()


def _flat(vectors) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vectors])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _problem(problem_name: str, device: torch.device):
    if problem_name == "mlp":
        model, loss_fn, (X, y) = _mlp_problem()
    elif problem_name == "resnet18":
        model, loss_fn, (X, y) = resnet18_problem(batch_size=32)
    else:
        model, loss_fn, (X, y) = build_problem(problem_name)
    return model.to(device), loss_fn, (X.to(device), y.to(device))


def measure(problem_name: str, task: str, library: str, device: torch.device, tol: float = 1e-4) -> dict:
    """Time one (problem, task, library); values and residuals alongside."""
    model, loss_fn, (X, y) = _problem(problem_name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    problem = cl.Problem(model, loss_fn, (X, y))
    hessian = cl.Hessian(problem)
    k = 10 if task == "top10" else 1
    result: dict = {}
    # The same warm-up for every library: one Hessian-vector product by plain double
    # backward (allocator, autograd engine, kernels, and torch's one-time lazy imports
    # on the first ``grad`` with ``grad_outputs``: about 0.5 s of sympy).
    gradient = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    torch.autograd.grad(gradient, params, [torch.ones_like(g) for g in gradient])
    _synchronize(device)
    start = time.perf_counter()
    if library in ("curvlab", "curvlab-random", "curvlab-block"):
        if task in ("top1", "top10"):
            start_vector = "random" if library == "curvlab-random" else "auto"  # auto: the gradient start
            block = BLOCK if library == "curvlab-block" else {}
            top = cl.top_eigen(hessian, k, tol=tol, start=start_vector, progress=False, **block)
            result.update(values=top.values.tolist(), matvecs=top.num_matvecs)
            vectors = top.vectors
        elif task == "trace100":
            estimate = cl.trace(hessian, "hutchinson", 100, progress=False)  # the peers' estimator
            result.update(value=estimate.value, standard_error=estimate.standard_error)
        else:
            density = cl.spectral_density(hessian, num_probes=1, lanczos_steps=100, progress=False)
            result.update(mean_eigenvalue=density.moment(1))
    elif library == "pyhessian":
        from pyhessian import hessian as PyHessian

        _patch_torch_eig()
        analyzer = PyHessian(model, loss_fn, data=(X, y), cuda=device.type == "cuda")
        if task in ("top1", "top10"):
            values, vectors = analyzer.eigenvalues(top_n=k)
            vectors = torch.stack([_flat(v) for v in vectors], 1)
            result.update(values=[float(v) for v in values])
        elif task == "trace100":
            values = analyzer.trace(maxIter=100, tol=-1.0)  # tol < 0: all 100 probes
            result.update(
                value=float(np.mean(values)), standard_error=float(np.std(values) / np.sqrt(len(values)))
            )
        else:
            eigen_list, weight_list = analyzer.density(iter=100, n_v=1)
            result.update(mean_eigenvalue=float(np.sum(np.array(eigen_list) * np.array(weight_list))))
    elif library == "curvlinops":
        import curvlinops
        import scipy.sparse.linalg

        operator = curvlinops.HessianLinearOperator(
            model, loss_fn, params, [(X, y)], check_deterministic=False
        )
        if task in ("top1", "top10"):
            values, vectors = scipy.sparse.linalg.eigsh(operator.to_scipy(), k=k, which="LA", tol=tol)
            order = np.argsort(values)[::-1]
            values, vectors = values[order], torch.as_tensor(vectors[:, order].copy())
            result.update(values=values.tolist())
        elif task == "trace100":
            result.update(value=float(curvlinops.hutchinson_trace(operator, 100)))
        else:
            grid, density = curvlinops.lanczos_approximate_spectrum(operator, ncv=100, num_repeats=1)
            result.update(points=len(grid))
    else:
        raise ValueError(library)
    _synchronize(device)
    result["seconds"] = time.perf_counter() - start
    if task in ("top1", "top10"):
        result["rel_residuals"] = _relative_residuals(hessian, result["values"], vectors)
    return result


def reference(problem_name: str, device: torch.device, k: int = 10, max_matvecs: int = 3000) -> dict:
    """Converged top-k eigenvalues (relative residual ≤ 1e-5, ten times the tolerance benchmarked).

    A basis of 100 vectors (ResNet-18: 4.5 GB) restarts less often than the default on
    a clustered spectrum; its seconds and products are reported.
    """
    model, loss_fn, data = _problem(problem_name, device)
    hessian = cl.Hessian(cl.Problem(model, loss_fn, data))
    start = time.perf_counter()
    top = cl.top_eigen(hessian, k, tol=1e-5, basis_size=100, max_matvecs=max_matvecs, progress=False)
    return {
        "values": top.values.tolist(),
        "rel_residuals": top.relative_residuals.tolist(),
        "seconds": time.perf_counter() - start,
        "matvecs": top.num_matvecs,
    }


def block_versus_single(problem_name: str, device: torch.device, rounds: int = 2) -> dict:
    """Top-10 by single-vector and by block Lanczos, alternately in one process (issue 32, item 3).

    Each run is timed and checked against a converged reference (relative residual 1e-5):
    the largest |λ − λ_ref| / |λ_ref| of the ten, and the products it took.
    """
    model, loss_fn, data = _problem(problem_name, device)
    hessian = cl.Hessian(cl.Problem(model, loss_fn, data))
    ref = torch.tensor(reference(problem_name, device)["values"], device=device)
    runs: dict = {"single": [], "block": []}
    for _ in range(rounds):
        for name, options in (("single", {}), ("block", BLOCK)):
            _synchronize(device)
            start = time.perf_counter()
            top = cl.top_eigen(hessian, 10, tol=1e-4, progress=False, **options)
            _synchronize(device)
            error = ((top.values - ref).abs() / ref.abs()).max().item()
            runs[name].append(
                {
                    "seconds": time.perf_counter() - start,
                    "matvecs": top.num_matvecs,
                    "max_rel_error": error,
                    "converged": top.converged,
                }
            )
    return runs


def child(args) -> None:
    """One measurement in a fresh process; prints a JSON line."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    problem_name, task, library = args.child
    device = torch.device(args.device)
    if task.startswith("reference"):  # "reference": top-10; "reference1": top-1 only
        k = int(task.removeprefix("reference") or 10)
        print(json.dumps(reference(problem_name, device, k, args.reference_products)))
        return
    if task == "block-versus-single":
        print(json.dumps(block_versus_single(problem_name, device)))
        return
    print(json.dumps(measure(problem_name, task, library, device, args.tol)))


def _row(task: str, library: str, row: dict, ref: list[float]) -> str:
    if "error" in row:
        return f"{task:<10}{library:<16}{row['error']}"
    text = f"{task:<10}{library:<16}{row['seconds']:>9.2f} s"
    if "values" in row:
        k = len(row["values"])
        errors = [abs(v - r) / abs(r) for v, r in zip(row["values"], ref[:k])]
        text += f"   λ1 {row['values'][0]:.5f}   max rel. error {max(errors):.1e}"
        text += f"   max rel. residual {max(row['rel_residuals']):.1e}"
        if "matvecs" in row:
            text += f"   ({row['matvecs']} products)"
    elif "value" in row:
        error = f" ± {row['standard_error']:.3g}" if "standard_error" in row else ""
        text += f"   trace {row['value']:.5g}{error}"
    elif "mean_eigenvalue" in row:
        text += f"   mean eigenvalue {row['mean_eigenvalue']:.4g}"
    return text


def main() -> None:
    """Run every measurement and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "cnn", "mlp"])
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual of top-1/top-10")
    parser.add_argument(
        "--reference-products",
        type=int,
        default=3000,
        help="the reference's product budget (it stops there, residuals reported, if 1e-5 is out of reach)",
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, help="default: all (mlp: density; resnet18: top10)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--block-versus-single",
        action="store_true",
        help="only time top-10 by single-vector and by block Lanczos, alternately in one process",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.block_versus_single:
        options = ["--threads", str(args.threads), "--device", args.device]
        for problem_name in args.problems:
            command = [problem_name, "block-versus-single", "curvlab", *options]
            runs = run_child(__file__, command, 3 * args.timeout)
            print(f"{problem_name}: top-10 to relative residual 1e-4, alternately ({BLOCK})")
            if "error" in runs:
                print(f"  {runs['error']}")
                continue
            for name, rows in runs.items():
                for row in rows:
                    print(
                        f"  {name:<7}{row['seconds']:>8.1f} s {row['matvecs']:>6} products   max rel. error "
                        f"{row['max_rel_error']:.1e}   converged {row['converged']}"
                    )
        return
    if args.child:
        child(args)
        return
    results = {}
    print(f"threads={args.threads} device={args.device} torch={torch.__version__}")
    for problem_name in args.problems:
        options = ["--threads", str(args.threads), "--device", args.device, "--tol", str(args.tol)]
        options += ["--reference-products", str(args.reference_products)]
        tasks = args.tasks or {"mlp": ("density",), "resnet18": ("top10",)}.get(problem_name, TASKS)
        reference_task = "reference" if "top10" in tasks else "reference1"
        ref = run_child(__file__, [problem_name, reference_task, "curvlab", *options], args.timeout * 3)
        ref_values = ref.get("values", [float("nan")] * 10)
        print(
            f"\n{problem_name}: reference top eigenvalues {[round(v, 5) for v in ref_values[:3]]} … "
            f"({ref.get('seconds', math.nan):.0f} s, {ref.get('matvecs', '?')} products; "
            f"{ref.get('error', 'ok')})",
            flush=True,
        )
        rows = {}
        for task in tasks:
            for library in args.libraries:
                if library in ("curvlab-random", "curvlab-block") and task not in ("top1", "top10"):
                    continue  # start vectors and blocks are Lanczos options
                if library == "curvlab-block" and task == "top1":
                    continue  # one eigenvalue: nothing for a block to resolve
                rows[task, library] = run_child(
                    __file__, [problem_name, task, library, *options], args.timeout
                )
                print(_row(task, library, rows[task, library], ref_values), flush=True)
        results[problem_name] = {"reference": ref, **{f"{t}/{lib}": r for (t, lib), r in rows.items()}}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
