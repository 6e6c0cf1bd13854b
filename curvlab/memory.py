"""How much memory a device has free, the guard against dense matrices too large, and block sizes."""

from __future__ import annotations

import os

import torch

from curvlab.errors import DenseTooLargeError


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CUDA: ``mem_get_info``; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def block_budget(device: torch.device) -> int:
    """Bytes one batched block of vectors may take (products, backward passes).

    CPU: 16 MiB, about a last-level cache: wider blocks of large vectors stream
    from memory at every elementwise step, slower than a loop over them. CUDA:
    1 GiB, where batching amortises kernel launches.
    """
    return 2**30 if torch.device(device).type == "cuda" else 2**24


def check_fits(what: str, shape: tuple[int, ...], dtype: torch.dtype, device, max_bytes=None):
    """Raise ``DenseTooLargeError`` if a tensor of ``shape`` would not fit.

    Args:
        what: Description used in the error message.
        shape: Shape of the tensor to allocate.
        dtype: Its dtype.
        device: Where it would live.
        max_bytes: Overrides the free memory of the device as the limit.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    needed = numel * torch.empty((), dtype=dtype).element_size()
    limit = available_bytes(device) if max_bytes is None else int(max_bytes)
    if needed > limit:
        raise DenseTooLargeError(f"{what} of shape {tuple(shape)} in {dtype}", needed, limit)


def check_workspace(what: str, vectors: int, n: int, dtype: torch.dtype, device, hint: str) -> None:
    """Raise ``DenseTooLargeError`` if ``vectors`` vectors of ``n`` entries would not fit on ``device``.

    The working memory of the Krylov methods (their bases, probes and products),
    beyond the model and one batch: checked before they start, not found out at the
    hundredth product. ``hint`` says what to lower.
    """
    needed = int(vectors) * int(n) * torch.empty((), dtype=dtype).element_size()
    limit = available_bytes(device)
    if needed > limit:
        raise DenseTooLargeError(
            f"{what} ({vectors} vectors of {n:,} entries in {dtype})", needed, limit, hint
        )
