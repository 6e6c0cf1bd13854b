r"""Fast statistics pass for plain MLPs: many backpropagated vectors, by hand.

For an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations on
``(N, d)`` inputs, the output gradients of V backpropagated vectors per example
(V = number of outputs for type-2) are propagated by flat GEMMs over all
``V·n`` rows instead of V autograd passes, with three exact savings:

* **Diagonal output Hessian** (MSE, BCE-with-logits): the vectors are
  s_{n,v} e_v, so the first layer's gradients are rows of W scaled by s and by the
  activation derivative: ``ScaledRows`` never forms them for the Gram; when s is
  constant (MSE) its Gram is the Hadamard product c (WᵀW) ∘ (DᵀD).
* **Compression** (bottlenecks): every consumer needs only the per-example Gram
  B_nᵀB_n of the ``(V, d)`` matrix B_n of an example's vectors (KFAC's G, the exact
  diagonal, EKFAC's eigenbasis moments are all sums of its (rotated) entries).
  Where V ≥ 4d, B_n = Q_n R_n and R_n (d rows) replaces B_n: same Gram, d vectors.
  On the deep autoencoder the encoder then backpropagates 30 vectors, not 784.
  For the same reason, with a constant output Hessian (MSE) the vectors S W D_n
  next to the output become s R D_n with W = QR: R is upper trapezoidal, and the
  product with the next layer skips its zero blocks.
* No weight gradients and no autograd graph.

Other models, or inputs with extra dimensions, use the autograd pass in
``statistics.py``; both give the same numbers (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.operators.memory import block_budget
from curvlab.operators.taylor import activation_derivatives, plain_mlp
from curvlab.problem import Problem
from curvlab.structured.statistics import Layer, backpropagated_vectors, gram, input_vectors, layer_statistics

_COMPRESS_RATIO = 4  # compress an example's V vectors to d when V ≥ ratio · d


class Workspace:
    """Buffers reused by every chunk of one pass, keyed by role.

    A pass handles a batch a few examples at a time (``block_budget``), with the
    same shapes in every chunk. Fresh tensors per chunk cost page faults: glibc
    hands the freed memory back to the kernel between chunks, so each chunk
    faulted it in again (type-2 KFAC of the autoencoder: about 85,000 faults a
    build, 0.5 s of its 3.5 s). What a chunk yields lives in these buffers, so it
    is valid until the next chunk (every consumer reads it at once).
    """

    def __init__(self):
        self._buffers: dict = {}

    def take(self, key, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised ``shape`` tensor like ``like``: the leading rows of the buffer ``key``."""
        buffer = self._buffers.get(key)
        if (
            buffer is None
            or buffer.shape[1:] != shape[1:]
            or buffer.shape[0] < shape[0]
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = like.new_empty(shape)
            self._buffers[key] = buffer
        return buffer[: shape[0]]


class DenseVectors:
    """Output gradients of V vectors for n examples, example-major: ``B`` ``(n, V, d)``."""

    def __init__(self, B: Tensor):
        self.B = B

    def gram(self) -> Tensor:
        """Σ_{n,v} b bᵀ: ``(d, d)``, lower-triangular blocks only (it is symmetric)."""
        flat = self.B.reshape(-1, self.B.shape[-1])
        return gram(flat)

    def squares(self) -> Tensor:
        """Σ_v b_{n,v}² per example: ``(n, d)``."""
        return self.B.pow(2).sum(1)

    def tensor(self) -> Tensor:
        """``(V, n, 1, d)``, the layout of ``layer_statistics``."""
        return self.B.transpose(0, 1).unsqueeze(2)

    def squared_moments(self, a: Tensor) -> Tensor:
        """Σ_{v,n} (b_{n,v} ã_nᵀ)², elementwise, for inputs ã ``(n, 1, d_A)``: ``(d, d_A)``."""
        return self.squares().T @ a[:, 0] ** 2

    def activate(self, derivative: Tensor) -> DenseVectors:
        """Through an elementwise activation: b_{n,v} ← b_{n,v} ∘ σ'_n."""
        return DenseVectors(self.B * derivative.unsqueeze(1))

    def pull_back(
        self, weight: Tensor, then: Tensor | None = None, workspace: Workspace | None = None, key=None
    ) -> DenseVectors:
        """Through a linear map, B ← B W (one GEMM over all n·V rows), then ``then``'s σ'.

        The result is written into ``workspace``'s buffer ``key`` (``None``: a fresh tensor).
        """
        n, V, _ = self.B.shape
        out = _buffer(workspace, (key, "B"), (n, V, weight.shape[1]), self.B)
        B = torch.matmul(self.B, weight, out=out)
        if then is not None:
            B.mul_(then.unsqueeze(1))
        return _compressed(B)


def _compressed(B: Tensor) -> DenseVectors:
    """``B`` ``(n, V, d)``; where V ≥ 4d, the same per-example Gram from d vectors.

    B_n = Q_n R_n (QR), B_nᵀB_n = R_nᵀR_n: R_n's d rows replace B_n's V rows
    (bottlenecks, e.g. the autoencoder's 30-unit code).
    """
    if B.shape[1] >= _COMPRESS_RATIO * B.shape[2]:
        B = torch.linalg.qr(B, mode="r").R
    return DenseVectors(B)


def _buffer(workspace: Workspace | None, key, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``workspace.take(key, …)``, or a fresh tensor without a workspace."""
    return like.new_empty(shape) if workspace is None else workspace.take(key, shape, like)


def _trapezoidal_times(R: Tensor, M: Tensor, blocks: int = 4, out: Tensor | None = None) -> Tensor:
    """R @ M for an upper-trapezoidal R ``(V, d)`` (R[i, j] = 0 for j < i), M ``(n, d, k)``.

    Row block [a, b) of R is zero left of column a, so it multiplies only M[:, a:]:
    with 4 row blocks about 30 % fewer operations than the full product for V ≈ d.
    Written into ``out`` ``(n, V, k)`` if given.
    """
    V = R.shape[0]
    edges = [round(i * V / blocks) for i in range(blocks + 1)]
    if out is None:
        out = M.new_empty(M.shape[0], V, M.shape[2])
    for a, b in zip(edges, edges[1:]):
        torch.matmul(R[a:b, a:], M[:, a:], out=out[:, a:b])
    return out


class ScaledRows:
    """B[n, v, :] = s[n, v] · W[v, :] ∘ d[n, :], kept factored.

    W ``(V, d)`` (``None``: the identity, V = d), s ``(n, V)``, d ``(n, d)``.
    These are the output gradients of the layers next to the output when the
    output Hessian is diagonal: Λ_n = diag(s_n)². ``memo`` holds what depends on
    W alone (WᵀW, its triangular factor, W²), shared by the chunks of one batch.
    """

    def __init__(self, W: Tensor | None, s: Tensor, d: Tensor, memo: dict | None = None):
        self.W, self.s, self.d = W, s, d
        self.memo = {} if memo is None else memo

    def _constant_s(self):
        s0 = self.s.reshape(-1)[0]
        return s0 if bool((self.s == s0).all()) else None

    def _W_gram(self) -> Tensor:
        key = ("gram", id(self.W))
        if key not in self.memo:
            self.memo[key] = self.W.T @ self.W
        return self.memo[key]

    def _W_factor(self) -> Tensor:
        """Upper-trapezoidal R ``(min(V, d), d)`` with RᵀR = WᵀW (QR of W)."""
        key = ("factor", id(self.W))
        if key not in self.memo:
            self.memo[key] = torch.linalg.qr(self.W, mode="r").R
        return self.memo[key]

    def gram(self) -> Tensor:
        """Σ_n D_n Wᵀ S_n² W D_n; for constant s, s² (WᵀW) ∘ (DᵀD) without forming B."""
        if self.W is None:
            return torch.diag((self.s * self.d).pow(2).sum(0))
        s0 = self._constant_s()
        if s0 is not None:
            return self._W_gram() * (self.d.T @ self.d) * s0**2
        return DenseVectors(self.materialize()).gram()

    def squares(self) -> Tensor:
        """Σ_v s_{n,v}² W_{v,i}² d_{n,i}²: ``(n, d)``."""
        if self.W is None:
            return (self.s * self.d) ** 2
        key = ("squares", id(self.W))
        if key not in self.memo:
            self.memo[key] = self.W**2
        return (self.s**2 @ self.memo[key]) * self.d**2

    def materialize(self) -> Tensor:
        """B: ``(n, V, d)``."""
        W = torch.eye(self.d.shape[1], dtype=self.d.dtype, device=self.d.device) if self.W is None else self.W
        return self.s.unsqueeze(2) * W.unsqueeze(0) * self.d.unsqueeze(1)

    def tensor(self) -> Tensor:
        """``(V, n, 1, d)``, the layout of ``layer_statistics``."""
        return self.materialize().transpose(0, 1).unsqueeze(2)

    squared_moments = DenseVectors.squared_moments

    @staticmethod
    def gram_of_chunks(parts: list[ScaledRows]) -> Tensor:
        """Σ of the parts' Grams (chunks of one batch, same W): one Gram of their rows joined.

        Per chunk, the Gram is a V × V diagonal (W = I) or s² (WᵀW) ∘ (DᵀD): a
        product with few rows and several passes over a d × d matrix. Joined, they
        are one. Where the parts' s are not one constant (no factored Gram of the
        join), each part's Gram is added instead.
        """
        W, memo = parts[0].W, parts[0].memo
        if len(parts) > 1 and all(part.W is W for part in parts):
            joined = ScaledRows(W, torch.cat([p.s for p in parts]), torch.cat([p.d for p in parts]), memo)
            if W is None or joined._constant_s() is not None:
                return joined.gram()
        total = parts[0].gram()
        for part in parts[1:]:
            total.add_(part.gram())
        return total

    def activate(self, derivative: Tensor) -> ScaledRows:
        """Through an elementwise activation: d ← d ∘ σ'."""
        return ScaledRows(self.W, self.s, self.d * derivative, self.memo)

    def pull_back(
        self, weight: Tensor, then: Tensor | None = None, workspace: Workspace | None = None, key=None
    ) -> ScaledRows | DenseVectors:
        """Through a linear map W' and, if given, the activation derivative ``then`` before it.

        Vectors it forms are written into ``workspace``'s buffers ``key`` (``None``: fresh tensors).
        """
        if self.W is None:  # s[n, v] d[n, v] e_vᵀ W' = (s ∘ d)[n, v] W'[v, :]
            d = torch.ones_like(self.s[:, :1]) if then is None else then
            return ScaledRows(weight, self.s * self.d, d, self.memo)
        n = self.d.shape[0]
        inner = _buffer(workspace, (key, "inner"), (n, *weight.shape), self.d)
        torch.mul(self.d.unsqueeze(2), weight, out=inner)  # D_n W'
        s0 = self._constant_s()
        if s0 is None:
            out = _buffer(workspace, (key, "B"), (n, self.W.shape[0], weight.shape[1]), inner)
            B = torch.matmul(self.W, inner, out=out)
            B.mul_(self.s.unsqueeze(2))  # S_n W D_n W'
            scale = then
        else:
            # Only B_nᵀB_n matters: W = QR gives the same Gram from R (min(V, d) rows,
            # upper trapezoidal), whose zero blocks the product skips.
            R = self._W_factor()
            out = _buffer(workspace, (key, "B"), (n, R.shape[0], weight.shape[1]), inner)
            B = _trapezoidal_times(R, inner, out=out)
            scale = s0 if then is None else then * s0  # s and D'_n in one pass over B
        if scale is not None:
            B.mul_(scale if then is None else scale.unsqueeze(1))
        return _compressed(B)


@dataclass
class _Step:
    """One module of the forward pass, as the backward pass needs it."""

    kind: str  # "linear" or "activation"
    weight: Tensor | None = None  # linear: (d_out, d_in)
    layer: Layer | None = None  # linear layers whose parameters are in the problem
    derivative: Tensor | None = None  # activation: (N, d)


def supports(problem: Problem, layers: list[Layer]) -> bool:
    """Whether the problem's model is a plain MLP this pass handles."""
    model = problem.model
    if not plain_mlp(model):
        return False
    children = {id(module) for module in model}
    return all(type(layer.module) is nn.Linear and id(layer.module) in children for layer in layers)


def _forward(problem: Problem, layers: list[Layer], params: list[Tensor], X: Tensor):
    """Output, layer inputs ã ``(N, 1, d_A)`` and the steps of the backward pass."""
    layer_of = {id(layer.module): layer for layer in layers}
    steps, inputs = [], {}
    x = X
    for module in problem.model:
        if type(module) is nn.Linear:
            layer = layer_of.get(id(module))
            weight, bias = module.weight.detach(), module.bias
            bias = None if bias is None else bias.detach()
            if layer is not None:
                if layer.weight is not None:
                    weight = params[layer.weight]
                if layer.bias is not None:
                    bias = params[layer.bias]
                inputs[layer.name] = input_vectors(layer, x.unsqueeze(1))
            steps.append(_Step("linear", weight=weight, layer=layer))
            x = F.linear(x, weight, bias)
        else:
            steps.append(_Step("activation", derivative=activation_derivatives(module, x)))
            x = module(x)
    return x, inputs, steps


def _backward(
    steps: list[_Step], state: DenseVectors | ScaledRows, chunk: slice, workspace: Workspace | None = None
) -> dict:
    """Output gradients of every tracked layer for the examples in ``chunk``.

    With a ``workspace``, the vectors live in its buffers (valid until the next chunk).
    """
    found: dict[str, DenseVectors | ScaledRows] = {}
    i = len(steps) - 1
    while i >= 0 and steps[i].kind == "activation":  # after the last linear map
        state = state.activate(steps[i].derivative[chunk])
        i -= 1
    while i >= 0:
        step = steps[i]  # a linear map
        if step.layer is not None:
            found[step.layer.name] = state
        i -= 1
        derivative = None  # the activations before it, applied with the pull-back
        while i >= 0 and steps[i].kind == "activation":
            d = steps[i].derivative[chunk]
            derivative = d if derivative is None else derivative * d
            i -= 1
        if not any(earlier.layer is not None for earlier in steps[: i + 1]):
            break  # nothing tracked below: no need to reach the input
        state = state.pull_back(step.weight, derivative, workspace, key=i)
    return found


def sequential_statistics(
    problem: Problem, layers: list[Layer], fisher_type: str, mc_samples: int = 1, seed: int = 0
) -> Iterator[tuple[tuple[int, int], dict[str, Tensor], dict[str, DenseVectors | ScaledRows]]]:
    """Yield ``((batch, first example), inputs, vectors)`` per chunk of examples.

    ``inputs[name]``: ã ``(n, 1, d_A)``; ``vectors[name]``: the layer's output
    gradients as ``DenseVectors``/``ScaledRows`` (``.gram()``, ``.squares()``,
    ``.tensor()``), valid until the next chunk: they live in buffers the pass
    reuses (``Workspace``). Only for problems where ``supports`` holds.
    """
    params = [p.detach() for p in problem.params]
    widths = [m.out_features for m in problem.model if type(m) is nn.Linear]
    memo: dict = {}  # factors of the weights (fixed during the pass), shared by all chunks
    workspace = Workspace()
    for index, X, y, counted in problem.counted_batches():
        if X.dim() != 2:
            raise ValueError(f"the MLP pass needs (N, d) inputs, got shape {tuple(X.shape)}")
        with torch.no_grad():
            output, inputs, steps = _forward(problem, layers, params, X)
        problem.loss_rule.check(output, y)
        diagonal = problem.loss_rule.diagonal_hessian_sqrt(output, y) if fisher_type == "type-2" else None
        if diagonal is not None:
            vectors = diagonal  # (N, V)
            V = vectors.shape[1]
        else:
            vectors = backpropagated_vectors(
                problem, output, y, index, fisher_type, mc_samples, seed, counted
            )
            V = vectors.shape[0]
        # Chunks of examples whose V vectors per layer fit the block budget (CPU: 16 MiB
        # blocks ran faster than 128 MiB ones, 2.9–3.1 s against 3.4–3.6 s for type-2 KFAC
        # of the autoencoder).
        itemsize = torch.empty((), dtype=problem.dtype).element_size()
        size = max(1, block_budget(problem.device) // (V * max(widths) * itemsize))
        with torch.no_grad():
            for first in range(0, X.shape[0], size):
                chunk = slice(first, first + size)
                if diagonal is not None:
                    s_chunk = vectors[chunk]
                    start = ScaledRows(None, s_chunk, torch.ones_like(s_chunk), memo)
                else:
                    start = DenseVectors(vectors[:, chunk].transpose(0, 1))
                found = _backward(steps, start, chunk, workspace)
                yield (index, first), {name: a[chunk] for name, a in inputs.items()}, found


def statistics_pass(
    problem: Problem,
    layers: list[Layer],
    fisher_type: str,
    mc_samples: int = 1,
    seed: int = 0,
    max_vectors: int | None = None,
):
    """The MLP pass where it applies and many vectors are backpropagated, else autograd.

    Consumers accept both: per-layer ``grads`` are tensors ``(V, N, R, d)`` or
    ``DenseVectors``/``ScaledRows`` (see ``as_tensor``).
    """
    many = fisher_type == "type-2" or (fisher_type == "mc" and mc_samples > 1)
    if many and problem.input_ndims == {2} and supports(problem, layers):
        return sequential_statistics(problem, layers, fisher_type, mc_samples, seed)
    return layer_statistics(problem, layers, fisher_type, mc_samples, seed, max_vectors)


def as_tensor(grads) -> Tensor:
    """Per-layer output gradients as a ``(V, N, R, d)`` tensor, whichever pass made them."""
    return grads if isinstance(grads, Tensor) else grads.tensor()
