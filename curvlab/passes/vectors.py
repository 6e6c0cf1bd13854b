"""The statistics protocol: what a pass over the data hands KFAC, EKFAC, the diagonal and ACP.

A statistics pass (``curvlab.passes.statistics``) yields one ``BatchStatistics``
per batch: the layer inputs ã of the batch's examples (those with a loss term),
and its layers' output gradients in chunks (of vectors, or of examples), each an
``OutputGradients``. The general autograd pass hands out ``LocatedVectors``; a
fast path may hand out its own kinds (the plain-MLP pass keeps the layers next to
a diagonal output Hessian factored). Consumers use the same methods whichever
pass made them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

_MAX_ELEMENTS = 2**24  # bound on the (vectors, examples, d_out, d_A) intermediate


class OutputGradients:
    """The output gradients g_{v,n,r} of one layer for V backpropagated vectors and a chunk of examples.

    v counts the vectors (``mc_samples`` sampled labels, the columns of Λ's square
    root, or the one true-label gradient), n the chunk's examples and r the
    locations sharing the weight (sequence positions, convolution patches).
    """

    joinable = False  # the chunks of one batch give one Gram joined (``joined_gram``)

    def gram(self, reduce: bool = False) -> Tensor:
        """Σ_{v,n,r} g gᵀ (``reduce``: Σ_{v,n} (Σ_r g)(Σ_r g)ᵀ): ``(d, d)``."""
        raise NotImplementedError

    def squared_moments(self, a: Tensor) -> Tensor:
        """Σ_{v,n} (Σ_r g_{v,n,r} a_{n,r}ᵀ)², elementwise, for the chunk's inputs ``a`` ``(n, R, d_A)``.

        Unrotated, the exact diagonal of the layer's block (up to the reduction factor);
        in KFAC's eigenbases (``rotated``, ``a @ Q_A``), EKFAC's eigenvalues.
        """
        raise NotImplementedError

    def rotated(self, Q: Tensor) -> OutputGradients:
        """G ← g Q (into an eigenbasis)."""
        raise NotImplementedError

    def tensor(self) -> Tensor:
        """``(V, n, R, d)``."""
        raise NotImplementedError

    @classmethod
    def joined_gram(cls, parts: list[OutputGradients]) -> Tensor:
        """Σ of the Grams of a batch's chunks (``joinable`` kinds join them into one)."""
        total = parts[0].gram()
        for part in parts[1:]:
            total.add_(part.gram())
        return total


class LocatedVectors(OutputGradients):
    """Output gradients as one tensor ``(V, n, R, d)`` (the autograd pass)."""

    def __init__(self, g: Tensor):
        self.g = g

    def gram(self, reduce=False):  # noqa: D102
        return second_moment(self.g.sum(2) if reduce else self.g)

    def squared_moments(self, a):  # noqa: D102
        g = self.g
        V, N, R, d_out = g.shape
        d_A = a.shape[-1]
        if R == 1:  # (g aᵀ)² = g² (a²)ᵀ: no per-example matrices needed
            return torch.einsum("vno,ni->oi", g[:, :, 0] ** 2, a[:, 0] ** 2)
        total = torch.zeros(d_out, d_A, dtype=g.dtype, device=g.device)
        step = max(1, _MAX_ELEMENTS // max(1, V * d_out * d_A))
        for start in range(0, N, step):
            per_example = torch.einsum("vnro,nri->vnoi", g[:, start : start + step], a[start : start + step])
            total += (per_example**2).sum((0, 1))
        return total

    def rotated(self, Q):  # noqa: D102
        return LocatedVectors(self.g @ Q)

    def tensor(self):  # noqa: D102
        return self.g


@dataclass
class Chunk:
    """Output gradients of one chunk: ``examples`` of the batch (all for a chunk of vectors)."""

    examples: slice
    gradients: dict[str, OutputGradients]


@dataclass
class BatchStatistics:
    """One batch: inputs ã ``(N, R, d_A)`` per layer, and its chunks (read once, in order).

    A chunk's gradients may live in buffers the pass reuses: read them before
    asking for the next chunk.
    """

    index: int
    inputs: dict[str, Tensor]
    chunks: Iterable[Chunk]


class GramSum:
    """Σ of the Grams of one batch's chunks: each added at once, joinable ones joined at the end."""

    def __init__(self, reduce: bool = False):
        self.reduce = reduce
        self.total: Tensor | None = None
        self._joinable: list[OutputGradients] = []

    def add(self, g: OutputGradients) -> None:
        """Add a chunk's gradients."""
        if g.joinable:
            self._joinable.append(g)
        else:
            self._add(g.gram(self.reduce))

    def _add(self, term: Tensor) -> None:
        self.total = term if self.total is None else self.total.add_(term)

    def result(self) -> Tensor:
        """The batch's Σ g gᵀ."""
        if self._joinable:
            self._add(type(self._joinable[0]).joined_gram(self._joinable))
            self._joinable = []
        return self.total


def gram(flat: Tensor) -> Tensor:
    """flatᵀ flat ``(d, d)`` from its lower triangle of column strips, mirrored.

    Strip i (rows of the i-th of k column groups) is one GEMM against the columns
    up to its end, written in place; the strictly upper part is then copied from
    the lower. With k strips this is (k + 1) / 2k of the full GEMM's work
    (k = 4: 62.5 %); torch has no SYRK.
    """
    d = flat.shape[1]
    strips = min(4, d // 250)
    if strips < 2:
        return flat.T @ flat
    edges = [round(i * d / strips) for i in range(strips + 1)]
    out = torch.empty(d, d, dtype=flat.dtype, device=flat.device)
    for start, stop in zip(edges, edges[1:]):
        torch.mm(flat[:, start:stop].T, flat[:, :stop], out=out[start:stop, :stop])
    for start, stop in zip(edges[1:], edges[2:]):
        out[:start, start:stop] = out[start:stop, :start].T
    return out


def second_moment(v: Tensor) -> Tensor:
    """Σ over all leading indices of v vᵀ, for vectors v ``(..., d)``: ``(d, d)``.

    Vectors stored d-major (convolution patches and output gradients: stride along
    d ≠ 1) are never transposed to ``(M, d)``: stored as blocks ``(B, d, R)`` with
    d ≤ R they go through one batched GEMM; otherwise they are gathered as rows
    ``(d, M)``, a copy of contiguous runs or none at all.
    """
    d = v.shape[-1]
    if v.stride(-1) == 1 or v.dim() == 1:
        return gram(v.reshape(-1, d))
    per_location = v.transpose(-1, -2)
    if per_location.is_contiguous() and d <= per_location.shape[-1]:
        # (B, d, R) blocks in memory: Σ_b M_b M_bᵀ by one batched GEMM, no copy.
        blocks = per_location.reshape(-1, d, per_location.shape[-1])
        return torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    return gram(v.movedim(-1, 0).reshape(d, -1).T)


def accumulate(sums: dict[str, Tensor], name: str, term: Tensor) -> None:
    """sums[name] += term, in place after the first (the terms are fresh tensors)."""
    if name in sums:
        sums[name].add_(term)
    else:
        sums[name] = term
