"""Peak memory of the Krylov methods on ResNet-18 against their stated working memory.

torchvision's resnet18 adapted to 32×32 inputs (P = 11,173,962), float32, a batch of
``--batch-size`` random images. For each method: the extra peak memory of one call
(CPU: VmHWM after resetting it; CUDA: ``max_memory_allocated``), the formula of
``docs/numerics.md`` in bytes, and the peak of a plain gradient (the model's own
activations and gradient, which every product adds on top of the working memory).

    python benchmarks/memory.py [--batch-size 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import peak_bytes_of, resnet18  # noqa: E402

import curvlab as cl  # noqa: E402


def main() -> None:
    """Measure each method's extra peak next to its formula."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    problem = cl.Problem(resnet18(device), nn.CrossEntropyLoss(), [(X, y)])
    G = cl.GGN(problem)
    n, entry = problem.num_params, 4
    runs = {
        "gradient": (problem.gradient, None),
        "top_eigen k=2, basis 20": (
            lambda: cl.top_eigen(G, 2, basis_size=20, max_matvecs=25, progress=False),
            (20 + 1 + 3 * 2) * n * entry,
        ),
        "top_eigen k=5, basis 20": (
            lambda: cl.top_eigen(G, 5, basis_size=20, max_matvecs=25, progress=False),
            (20 + 1 + 3 * 5) * n * entry,
        ),
        "trace hutch++ 30": (
            lambda: cl.trace(G, "hutch++", num_matvecs=30, progress=False),
            5 * 10 * n * entry,
        ),
        "density 2 probes × 10": (
            lambda: cl.spectral_density(G, num_probes=2, lanczos_steps=10, progress=False),
            (10 + 3) * 2 * n * entry,
        ),
    }
    print(f"resnet18 (32×32), P = {n:,}, batch {args.batch_size}, float32, {device}")
    print(f"{'call':<26}{'peak MB':>10}{'formula MB':>12}{'peak − gradient':>17}")
    gradient_peak = None
    for name, (fn, formula) in runs.items():
        fn()  # warm (allocator pools, kept passes)
        peak = peak_bytes_of(fn, device)
        if gradient_peak is None:
            gradient_peak = peak
        shown = f"{formula / 1e6:>12.0f}" if formula is not None else f"{'-':>12}"
        print(f"{name:<26}{peak / 1e6:>10.0f}{shown}{(peak - gradient_peak) / 1e6:>17.0f}")


if __name__ == "__main__":
    main()
