"""Shared pieces of the benchmarks: problems, timing, peak memory, subprocess runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from curvlab.models import deep_autoencoder, small_cnn


def build_problem(name: str, batch_size: int = 256, seed: int = 0):
    """``(model, loss_fn, (X, y))`` of a benchmark problem with random data."""
    torch.manual_seed(seed)
    if name == "autoencoder":
        model = deep_autoencoder(784)
        X = torch.rand(batch_size, 784)
        return model, nn.MSELoss(), (X, torch.rand(batch_size, 784))
    if name == "cnn":
        model = small_cnn(in_channels=1, side=28, classes=10, width=16)
        X = torch.randn(batch_size, 1, 28, 28)
        return model, nn.CrossEntropyLoss(), (X, torch.randint(0, 10, (batch_size,)))
    raise ValueError(f"unknown problem {name!r}")


def resnet18(device: torch.device | str = "cpu") -> nn.Module:
    """ResNet-18 of torchvision for 32×32 inputs (3×3 stem, no max-pool), in eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval().to(device)


def resnet18_problem(batch_size: int = 32, seed: int = 0):
    """``(model, loss_fn, (X, y))``: ResNet-18 on random 32×32 images, 10 classes."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    return resnet18(), nn.CrossEntropyLoss(), (X, y)


def _cuda_synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, synchronise=_cuda_synchronise) -> float:
    synchronise()
    start = time.perf_counter()
    fn()
    synchronise()
    return time.perf_counter() - start


def median_seconds(fn, repeats: int = 5, warmup: int = 2, synchronise=_cuda_synchronise) -> float:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls.

    ``synchronise()`` runs before and after each timed call (default: CUDA's; a
    multi-process benchmark adds a barrier).
    """
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, synchronise) for _ in range(repeats))


def median_seconds_beside(fn, reference, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn()`` and ``reference()``, timed alternately in one process.

    Ratios of the two do not carry the drift between processes (or over time) of
    a shared machine: both see the same conditions.
    """
    for _ in range(warmup):
        fn()
        reference()
    times, reference_times = [], []
    for _ in range(repeats):
        times.append(_timed(fn))
        reference_times.append(_timed(reference))
    return statistics.median(times), statistics.median(reference_times)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_bytes_of(fn, device: torch.device) -> int:
    """Extra peak memory of one call of ``fn`` over what was in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return -1
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def run_child(script: str, args: list[str], timeout: float) -> dict:
    """Run ``script --child args...`` and parse the JSON it prints on its last line."""
    try:
        completed = subprocess.run(
            [sys.executable, script, "--child", *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:120]}
    return json.loads(lines[-1])


def print_table(rows: dict, width: int = 16) -> None:
    """Print measurements keyed ``(quantity, library)``: seconds, ratio to the gradient and to the best peer.

    ``rows`` must hold ``("gradient", "torch")``; a row with ``"error"`` prints the error.
    A row with ``"gradient_seconds"`` (the gradient timed alongside it, in its own
    process) is divided by that, else by the gradient row's time. "x best peer" is
    curvlab's "x gradient" over the smallest peer's: each is taken against the
    gradient of its own process, so the drift between processes cancels (raw
    seconds of separate processes on a shared machine were 10-30 % apart).
    """
    header = ("quantity", "library", "seconds", "x gradient", "x best peer", "peak MB")
    print(f"{{:<{width}}}{{:<12}}{{:>10}}{{:>12}}{{:>13}}{{:>10}}".format(*header))
    gradient = rows["gradient", "torch"].get("seconds", float("nan"))

    def to_gradient(row):
        return row["seconds"] / row.get("gradient_seconds", gradient)

    for (quantity, library), row in rows.items():
        if "error" in row:
            print(f"{quantity:<{width}}{library:<12}  {row['error']}")
            continue
        peers = [
            to_gradient(r)
            for (q, lib), r in rows.items()
            if q == quantity and lib not in ("curvlab", "torch") and "seconds" in r
        ]
        ratio = to_gradient(row)
        versus = f"{ratio / min(peers):>13.2f}" if peers and library == "curvlab" else " " * 13
        megabytes = row["peak_bytes"] / 2**20
        print(
            f"{quantity:<{width}}{library:<12}{row['seconds']:>10.4f}{ratio:>12.2f}{versus}{megabytes:>10.1f}"
        )
