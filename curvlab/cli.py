"""The ``curvlab`` command.

``curvlab analyze`` trains a small MLP on the embedded digits data and reports
the four exact curvature matrices (Hessian, GGN, Fisher, empirical Fisher).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

import curvlab as cl
from curvlab.data import load_digits
from curvlab.models import mlp

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _batches(X, y, batch_size):
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]


def train(model: nn.Module, X, y, steps: int, lr: float, batch_size: int, seed: int, progress: bool):
    """Plain minibatch SGD with momentum on cross-entropy; returns the final training loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(steps), desc="training", disable=None if progress else True, leave=False)
    for _ in bar:
        index = torch.randint(0, X.shape[0], (batch_size,), generator=generator)
        optimizer.zero_grad()
        loss = loss_fn(model(X[index]), y[index])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {loss.item()}; lower --lr")
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        return loss_fn(model(X), y).item()


def summarize(name: str, matrix: torch.Tensor) -> dict:
    """Size, trace, Frobenius norm and extreme eigenvalues of a dense symmetric matrix."""
    eigenvalues = torch.linalg.eigvalsh(matrix)
    return {
        "matrix": name,
        "size": matrix.shape[0],
        "trace": matrix.trace().item(),
        "frobenius": matrix.norm().item(),
        "lambda_max": eigenvalues[-1].item(),
        "lambda_min": eigenvalues[0].item(),
    }


def analyze(args) -> int:
    """Train, then build and summarise the four exact matrices."""
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    (X, y), (X_test, y_test) = load_digits(dtype=dtype, seed=args.seed)
    X, y, X_test, y_test = X.to(device), y.to(device), X_test.to(device), y_test.to(device)
    sizes = [X.shape[1], *args.hidden, 10]
    model = mlp(sizes, args.activation).to(device, dtype)
    start = time.perf_counter()
    train_loss = train(model, X, y, args.steps, args.lr, args.batch_size, args.seed, not args.no_progress)
    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"model   MLP {'-'.join(map(str, sizes))} ({args.activation}), {args.steps} SGD steps")
    print(f"data    digits: {X.shape[0]} train / {X_test.shape[0]} test examples")
    print(
        f"trained loss {train_loss:.4f}, test accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)"
    )

    problem = cl.Problem(model, nn.CrossEntropyLoss(), _batches(X, y, args.batch_size))
    print(f"problem {problem.describe()}")
    operators = {
        "Hessian": cl.Hessian(problem),
        "GGN": cl.GGN(problem),
        "Fisher": cl.Fisher(problem),
        "EmpiricalFisher": cl.EmpiricalFisher(problem),
    }
    dense = {}
    rows = []
    for name, operator in tqdm(
        operators.items(), desc="curvature", disable=True if args.no_progress else None, leave=False
    ):
        dense[name] = operator.to_dense()
        rows.append(summarize(name, dense[name]))
    print(f"\n{'matrix':<16}{'size':>8}{'trace':>14}{'frobenius':>14}{'lambda_max':>14}{'lambda_min':>14}")
    for row in rows:
        print(
            f"{row['matrix']:<16}{row['size']:>8}{row['trace']:>14.6g}{row['frobenius']:>14.6g}"
            f"{row['lambda_max']:>14.6g}{row['lambda_min']:>14.6g}"
        )
    gap = ((dense["Fisher"] - dense["GGN"]).norm() / dense["GGN"].norm()).item()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    status = "OK" if gap <= tolerance else "MISMATCH"
    print(f"\ncheck   ‖Fisher − GGN‖_F / ‖GGN‖_F = {gap:.2e} ({status}, tolerance {tolerance:.0e})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if status == "OK" else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command."""
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("analyze", help="train a small MLP on digits and analyse its curvature")
    run.add_argument("--hidden", type=int, nargs="+", default=[16], help="hidden layer widths")
    run.add_argument("--activation", default="tanh", help="tanh, relu, sigmoid, gelu or elu")
    run.add_argument("--steps", type=int, default=300, help="SGD steps before the analysis")
    run.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    run.add_argument("--batch-size", type=int, default=256, help="minibatch size (training and curvature)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they are off anyway without a terminal)"
    )
    run.set_defaults(handler=analyze)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``curvlab`` console script."""
    args = build_parser().parse_args(argv)
    # torch.func emits this deprecation from inside its own transforms; not actionable here.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
