"""Random draws, one function per idea: Monte-Carlo labels and Rademacher probes.

Both are drawn on the CPU from a seed, so results are the same on every device.

* **Monte-Carlo labels** (the MC Fisher, MC KFAC, the MC diagonal): the noise of
  batch ``index`` comes from a generator seeded by ``(seed, index)``, so every
  product and every statistics pass pairs each example with the same labels.
* **Rademacher probes** (traces, SLQ densities, Hutchinson diagonals, matrix-free
  Frobenius norms): random signs, eight per random byte.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from curvlab.losses import LossRule


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of batch ``index``'s Monte-Carlo noise."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % 2**63)


def mc_noise(
    rule: LossRule,
    target: Tensor,
    samples: int,
    seed: int,
    index: int,
    dtype: torch.dtype,
    counted: Tensor | None = None,
) -> Tensor:
    """Standard noise for ``samples`` labels per example of batch ``index``, on ``target``'s device.

    ``counted``: the examples kept of a batch with ignored targets (``Problem.counted_batches``;
    ``target`` holds only those): the noise is drawn for the whole batch and then selected,
    so each example gets the same labels whichever pass asks.
    """
    shape = list(rule.noise_shape(target, samples))  # (S, N, ...)
    if counted is not None:
        shape[1] = counted.shape[0]
    noise = rule.draw_noise(tuple(shape), batch_generator(seed, index), dtype)
    if counted is not None:
        noise = noise[:, counted.cpu()]
    return noise.to(target.device)


def sampled_output_gradients(rule: LossRule, output: Tensor, noise: Tensor) -> Tensor:
    """∇_f ℓ(f, ŷ_s) for the labels ŷ_s ~ p(·|f) that ``noise`` ``(S, …)`` gives: ``(S, *output.shape)``."""
    samples = noise.shape[0]
    sampled = rule.sample_targets(output, noise)  # (S, *y.shape)
    repeated = output.unsqueeze(0).expand(samples, *output.shape)
    flat = rule.sampled_gradient(
        repeated.reshape(-1, *output.shape[1:]), sampled.reshape(-1, *sampled.shape[2:])
    )
    return flat.reshape(samples, *output.shape)


def rademacher(
    n: int, k: int, generator: torch.Generator, dtype, device, out: Tensor | None = None
) -> Tensor:
    """``(n, k)`` random signs drawn on the CPU, probe after probe (probe-major layout).

    The i-th probe of a seed is the same however the probes are chunked, and on
    every device. Eight signs per random byte (bits), which is several times
    faster than one integer draw per entry for millions of parameters; only the
    bytes cross to the device, where each is looked up in a 256 × 8 table of its
    signs (on a GPU, unpacking on the CPU and copying the signs cost ten times
    the products of a trace).

    Args:
        n: Probe length.
        k: Number of probes.
        generator: CPU generator the bytes are drawn from.
        dtype: Float dtype of the signs.
        device: Where the signs go.
        out: A ``(≥ k, 8 ⌈n/8⌉)`` buffer of ``dtype`` on ``device`` to write into
            (``probe_buffer``): probes drawn chunk after chunk then reuse one
            allocation, where fresh memory for every chunk costs more in page
            faults than drawing the signs. The result is a view of it.
    """
    size = (n + 7) // 8
    random_bytes = torch.randint(0, 256, (k, size), generator=generator, dtype=torch.uint8).to(device)
    if out is None:
        out = probe_buffer(n, k, dtype, device)
    elif (
        out.shape[0] < k
        or out.shape[1] != 8 * size
        or (out.dtype, out.device) != (dtype, random_bytes.device)
    ):
        raise ValueError(
            f"out must be a ({k}+, {8 * size}) {dtype} buffer on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    signs = out[:k]
    table = _sign_table(dtype, random_bytes.device)  # the concrete device ("cuda" → cuda:i)
    torch.index_select(table, 0, random_bytes.reshape(-1).int(), out=signs.view(k * size, 8))
    return signs[:, :n].T


def probe_buffer(n: int, k: int, dtype, device) -> Tensor:
    """Storage for ``k`` probes of length ``n`` from ``rademacher``: ``(k, 8 ⌈n/8⌉)``."""
    return torch.empty(k, 8 * ((n + 7) // 8), dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _sign_table(dtype, device) -> Tensor:
    """``(256, 8)``: row b holds the signs 2 bit_j(b) − 1 of byte b, lowest bit first (kept, read only)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & 1
    return bits.to(dtype).mul_(2).sub_(1).to(device)
