r"""The plain-MLP fast path: ``nn.Sequential``s of ``nn.Linear`` and elementwise activations.

The model runs by hand on ``(N, d)`` inputs from one primal pass.

One forward pass per batch (``PlainMLP.primal``) keeps each linear layer's input
a₀ and each activation's derivatives σ'(z₀) (and σ''(z₀) for second order); from
it come, without autograd:

**Quadratic forms, products and the gradient** (the exact Hessian and GGN).
A Hutchinson trace needs only the numbers vᵀCv, not the products Cv. Along
θ + t v, the first two Taylor coefficients of every layer's value are
propagated forward (Griewank & Walther 2008, ch. 13). A linear layer
z = W a + b with direction (V, v_b) maps the coefficients a₁, a₂ of its input to

    z₁ = W a₁ + V a₀ + v_b,        z₂ = W a₂ + 2 V a₁,

an elementwise activation a = σ(z) maps them to

    a₁ = σ'(z₀) z₁,                a₂ = σ'(z₀) z₂ + σ''(z₀) z₁²,

with a₀, z₀ the primal values and a₁ = a₂ = 0 at the input. With f the output,

    vᵀ H v = d²R/dt² = c Σₙ [ ⟨∇_f ℓₙ, f₂ₙ⟩ + f₁ₙᵀ Λₙ f₁ₙ ],        vᵀ G v = c Σₙ f₁ₙᵀ Λₙ f₁ₙ

(the GGN keeps only the loss curvature: G = c Σ Jᵀ Λ J and J v = f₁).

f₂ itself is never formed. It is linear in its sources, 2 V a₁ at each linear
layer and σ''(z₀) z₁² at each activation, pushed through the network's
tangent-linear map; so ⟨∇_f ℓ, f₂⟩ = Σ_sources ⟨ḡ, source⟩, with ḡ the adjoint
(the backpropagated ∇_f ℓ) at the source's layer output. The adjoints are one
backward sweep of the batch, shared by every direction, and per direction

    vᵀ H v = c Σₙ [ f₁ₙᵀ Λₙ f₁ₙ + Σ_linear 2 ⟨ḡ_z, V a₁⟩ + Σ_act ⟨ḡ_a σ''(z₀), z₁²⟩ ].

A Hessian form then costs 3 GEMMs per layer (W a₁, V a₀, V a₁; 1 for the
first), against 4 when f₂ is propagated and about 6 for a reverse-over-reverse
product, and no backward pass; a GGN form costs 2. Models other than an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations on
``(N, d)`` inputs use products instead.

The same primal pass (layer inputs a₀, σ'(z₀), σ''(z₀) and the adjoints δ = ḡ)
gives Hessian products by forward-over-reverse in closed form (Pearlmutter 1994,
the R-operator): the first-order tangents above go forward, and the tangent of
the backward pass comes back. Starting from δ̇_f = ∇²_f ℓ f₁ at the output,

    activation:  δ̇_z = σ'(z₀) δ̇_a + σ''(z₀) δ_a z₁,
    linear:      δ̇_a = δ̇_z W + δ_z V,     (H v)_W = δ̇_zᵀ a₀ + δ_zᵀ a₁,     (H v)_b = Σₙ δ̇_z,

scaled by c. That is the arithmetic of a reverse-over-reverse product on a
cached graph (6 GEMMs per layer) without autograd's engine, its second copy of
the graph, or the elementwise work of differentiating each backward formula;
the gradient is δ_zᵀ a₀ off the same pass, at no extra cost. Dropping the
terms with σ'' and δ_z leaves the GGN product Jᵀ Λ J v (4 GEMMs per layer).

**Layerwise statistics** (KFAC, EKFAC, the exact diagonal). The output gradients
of V backpropagated vectors per example (V = number of outputs for type-2) are
propagated by flat GEMMs over all ``V·n`` rows instead of V autograd passes, with
three exact savings:

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

Other models, or inputs with extra dimensions, use the general routes (torch.func
products, ``curvlab.passes.autograd``); both give the same numbers (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.memory import block_budget
from curvlab.passes.autograd import backpropagated_vectors
from curvlab.passes.fast.base import FastPath
from curvlab.passes.layers import Layer, input_vectors
from curvlab.passes.vectors import BatchStatistics, Chunk, OutputGradients, gram
from curvlab.problem import Problem

ELEMENTWISE = (
    nn.Identity,
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
)


def activation_derivatives(activation: nn.Module, s: Tensor, second: bool = False):
    """σ'(s) and, if ``second``, σ''(s) of an elementwise activation, by autograd (ReLU'(0) = 0 as torch).

    Returns:
        ``σ'(s)`` alone, or ``(σ'(s), σ''(s))`` when ``second``; shaped like ``s``.
    """
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        out = activation(leaf * 1.0)  # not the leaf itself: in-place activations are fine
        (d1,) = torch.autograd.grad(out.sum(), leaf, create_graph=second)
        if not second:
            return d1
        if not d1.requires_grad:  # piecewise linear (ReLU, LeakyReLU, Identity): σ'' = 0
            return d1, torch.zeros_like(d1)
        (d2,) = torch.autograd.grad(d1.sum(), leaf)
    return d1.detach(), d2


def plain_mlp(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` of ``nn.Linear`` and elementwise activations, as written.

    Each weight and bias must be the layer's own parameter, used as stored, and no
    module may have forward hooks or a parametrization: a hook (the old
    ``nn.utils.weight_norm``, or one that rescales an output) or a parametrization
    changes what a layer computes, which passes that run the layers by hand
    (this fast path) would not see.
    """
    if type(model) is not nn.Sequential or len(model) == 0:
        return False
    for module in (model, *model):
        if type(module) is not nn.Linear and not isinstance(module, ELEMENTWISE) and module is not model:
            return False
        if module._forward_pre_hooks or module._forward_hooks or nn.utils.parametrize.is_parametrized(module):
            return False
        if type(module) is nn.Linear:
            for name in ("weight", "bias"):
                tensor = getattr(module, name)
                if tensor is not None and module._parameters.get(name) is not tensor:
                    return False
    return True


@dataclass
class _Linear:
    module: nn.Linear
    weight: Tensor  # W, (d_out, d_in)
    inputs: Tensor  # a₀, (N, d_in)
    weight_index: int | None  # position of W among the problem's parameters (None: held fixed)
    bias_index: int | None
    adjoint: Tensor | None = None  # ḡ_z, the backpropagated ∇_f ℓ at the layer's output, (N, d_out)


@dataclass
class _Activation:
    first: Tensor  # σ'(z₀), (N, d)
    second: Tensor | None  # σ''(z₀) (None: not asked for)
    curvature_weight: Tensor | None = None  # ḡ_a σ''(z₀) (None: σ'' = 0, piecewise linear)


@dataclass
class PrimalBatch:
    """One batch's primal values: what every form, product and statistic of the batch shares."""

    steps: list[_Linear | _Activation]
    output: Tensor  # f, (N, C)
    output_gradient: Tensor | None  # ∇_f ℓ (sum reduction), (N, C); None for statistics
    mask: Tensor | None  # entries with a loss term (None: all), broadcastable to (N, C)
    target: Tensor  # y, for the loss' output Hessian


class PlainMLP(FastPath):
    """The fast path of a plain MLP (module docstring), compiled for one problem."""

    @classmethod
    def compile(cls, problem: Problem) -> PlainMLP | None:  # noqa: D102
        if problem.input_ndims != {2} or not plain_mlp(problem.model):
            return None
        return cls(problem)

    def __init__(self, problem: Problem):
        self.problem = problem
        own = {id(getattr(m, n)) for m in problem.model if type(m) is nn.Linear for n in ("weight", "bias")}
        # Forms and products run here when every parameter is a Linear layer's own.
        self.covers_parameters = all(id(p) in own for p in problem.params)

    def applies(self) -> bool:  # noqa: D102
        return plain_mlp(self.problem.model)

    # ------------------------------------------------------------ the primal pass
    def primal(self, X: Tensor, y: Tensor, second: bool = True) -> PrimalBatch:
        """Forward pass of one batch, keeping layer inputs and activation derivatives.

        ``second``: also σ'' and the adjoints of ∇_f ℓ (forms, products, the gradient);
        the statistics need neither.
        """
        problem = self.problem
        index_of = {id(p): i for i, p in enumerate(problem.params)}
        steps: list[_Linear | _Activation] = []
        x = X
        with torch.no_grad(), problem.model_mode():
            for module in problem.model:
                if type(module) is nn.Linear:
                    weight_index, bias = index_of.get(id(module.weight)), module.bias
                    bias_index = None if bias is None else index_of.get(id(bias))
                    steps.append(_Linear(module, module.weight.detach(), x, weight_index, bias_index))
                    x = F.linear(x, module.weight, bias)
                else:
                    derivatives = activation_derivatives(module, x, second=second)
                    steps.append(_Activation(*derivatives) if second else _Activation(derivatives, None))
                    x = module(x)
        rule = problem.loss_rule
        rule.check(x, y)  # shapes, and NaN/Inf in the output or target
        output_gradient = None
        if second:
            output_gradient = rule.output_gradient(x, y)
            _backpropagate(steps, output_gradient)
        return PrimalBatch(steps, x, output_gradient, rule.mask(y), y)

    # ------------------------------------------------------------ exact operators
    def quadratic_forms(self, batches, Vs, second_order):  # noqa: D102
        return quadratic_forms(self.problem, batches, Vs, second_order)

    def products(self, batches, Vs, second_order, out=None):  # noqa: D102
        return products(self.problem, batches, Vs, second_order, out)

    def gradient(self, batches):  # noqa: D102
        return gradient(self.problem, batches)

    # ------------------------------------------------------------ statistics
    def covers(self, layers: list[Layer]) -> bool:  # noqa: D102
        children = {id(module) for module in self.problem.model}
        return all(type(layer.module) is nn.Linear and id(layer.module) in children for layer in layers)

    def statistics(self, layers, fisher_type, mc_samples=1, seed=0) -> Iterator[BatchStatistics]:
        """One ``BatchStatistics`` per batch; chunks of examples whose vectors fit the block budget.

        The chunks' gradients (``DenseVectors``/``ScaledRows``) live in buffers the pass
        reuses (``Workspace``): valid until the next chunk.
        """
        problem = self.problem
        widths = [m.out_features for m in problem.model if type(m) is nn.Linear]
        tracked = {id(layer.module): layer for layer in layers}
        memo: dict = {}  # factors of the weights (fixed during the pass), shared by all chunks
        workspace = Workspace()
        for index, X, y, counted in problem.counted_batches():
            batch = self.primal(X, y, second=False)
            inputs = {
                tracked[id(step.module)].name: input_vectors(
                    tracked[id(step.module)], step.inputs.unsqueeze(1)
                )
                for step in batch.steps
                if isinstance(step, _Linear) and id(step.module) in tracked
            }
            output = batch.output
            diagonal = problem.loss_rule.diagonal_hessian_sqrt(output, y) if fisher_type == "type-2" else None
            if diagonal is not None:
                vectors, V = diagonal, diagonal.shape[1]  # (N, V)
            else:
                vectors = backpropagated_vectors(
                    problem, output, y, index, fisher_type, mc_samples, seed, counted
                )
                V = vectors.shape[0]
            # Chunks of examples whose V vectors per layer fit the block budget (CPU: 16 MiB
            # blocks ran faster than 128 MiB ones).
            itemsize = torch.empty((), dtype=problem.dtype).element_size()
            size = max(1, block_budget(problem.device) // (V * max(widths) * itemsize))
            chunks = _chunks(batch.steps, tracked, vectors, diagonal is not None, size, memo, workspace)
            yield BatchStatistics(index, inputs, chunks)


def _chunks(steps, tracked, vectors, diagonal: bool, size: int, memo: dict, workspace) -> Iterator[Chunk]:
    """The chunks of one batch: its vectors backpropagated ``size`` examples at a time."""
    N = vectors.shape[0] if diagonal else vectors.shape[1]
    with torch.no_grad():
        for first in range(0, N, size):
            chunk = slice(first, first + size)
            if diagonal:
                s_chunk = vectors[chunk]
                start = ScaledRows(None, s_chunk, torch.ones_like(s_chunk), memo)
            else:
                start = DenseVectors(vectors[:, chunk].transpose(0, 1))
            yield Chunk(chunk, _backward(steps, tracked, start, chunk, workspace))


def _backward(
    steps: list[_Linear | _Activation],
    tracked: dict[int, Layer],
    state: DenseVectors | ScaledRows,
    chunk: slice,
    workspace: Workspace | None = None,
) -> dict:
    """Output gradients of every tracked layer for the examples in ``chunk``.

    With a ``workspace``, the vectors live in its buffers (valid until the next chunk).
    """
    found: dict[str, DenseVectors | ScaledRows] = {}
    i = len(steps) - 1
    while i >= 0 and isinstance(steps[i], _Activation):  # after the last linear map
        state = state.activate(steps[i].first[chunk])
        i -= 1
    while i >= 0:
        step = steps[i]  # a linear map
        if id(step.module) in tracked:
            found[tracked[id(step.module)].name] = state
        i -= 1
        derivative = None  # the activations before it, applied with the pull-back
        while i >= 0 and isinstance(steps[i], _Activation):
            d = steps[i].first[chunk]
            derivative = d if derivative is None else derivative * d
            i -= 1
        if not any(isinstance(s, _Linear) and id(s.module) in tracked for s in steps[: i + 1]):
            break  # nothing tracked below: no need to reach the input
        state = state.pull_back(step.weight, derivative, workspace, key=i)
    return found


_COMPRESS_RATIO = 4  # compress an example's V vectors to d when V ≥ ratio · d


class Workspace:
    """Buffers reused by every chunk of one pass, keyed by role.

    A pass handles a batch a few examples at a time (``block_budget``), with the
    same shapes in every chunk. Fresh tensors per chunk cost page faults: glibc
    hands the freed memory back to the kernel between chunks, so each chunk
    would fault it in again. What a chunk yields lives in these buffers, so it
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


class DenseVectors(OutputGradients):
    """Output gradients of V vectors for n examples, example-major: ``B`` ``(n, V, d)`` (R = 1)."""

    def __init__(self, B: Tensor):
        self.B = B

    def gram(self, reduce: bool = False) -> Tensor:
        """Σ_{n,v} b bᵀ: ``(d, d)`` (one location: ``reduce`` changes nothing)."""
        flat = self.B.reshape(-1, self.B.shape[-1])
        return gram(flat)

    def rotated(self, Q: Tensor) -> DenseVectors:
        """B Q."""
        return DenseVectors(self.B @ Q)

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


class ScaledRows(OutputGradients):
    """B[n, v, :] = s[n, v] · W[v, :] ∘ d[n, :], kept factored (R = 1).

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

    joinable = True  # one Gram per batch (gram_of_chunks)

    def gram(self, reduce: bool = False) -> Tensor:
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

    def rotated(self, Q: Tensor) -> DenseVectors:
        """B Q (formed)."""
        return DenseVectors(self.materialize() @ Q)

    @classmethod
    def joined_gram(cls, parts: list[ScaledRows]) -> Tensor:
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


def _backpropagate(steps: list[_Linear | _Activation], output_gradient: Tensor) -> None:
    """Store at every step the adjoint its second-order source meets (one backward sweep).

    Walking back from ḡ = ∇_f ℓ: a linear layer keeps ḡ at its output and passes
    ḡ W back; an activation keeps ḡ σ''(z₀) and passes ḡ σ'(z₀) back. The sweep
    stops at the first linear layer, whose input carries no first-order term.
    """
    adjoint = output_gradient
    first_linear = next((i for i, step in enumerate(steps) if isinstance(step, _Linear)), len(steps))
    for index in range(len(steps) - 1, first_linear - 1, -1):
        step = steps[index]
        if isinstance(step, _Linear):
            step.adjoint = adjoint
            if index > first_linear:
                adjoint = adjoint @ step.weight
        else:
            if bool(step.second.any()):
                step.curvature_weight = adjoint * step.second
            adjoint = adjoint * step.first


def _propagate(batch: PrimalBatch, direction: list[Tensor], second_order: bool):
    """Along one direction: the output's f₁ and the scalar ⟨∇_f ℓ, f₂⟩ (``None`` stands for zero).

    The scalar is summed from each layer's second-order source against the stored
    adjoint (module docstring), only when ``second_order``.
    """
    x1 = None
    second = None

    def add(term: Tensor) -> None:
        nonlocal second
        second = term if second is None else second + term

    for step in batch.steps:
        if isinstance(step, _Activation):
            if x1 is None:
                continue
            if second_order and step.curvature_weight is not None:
                add(torch.vdot(step.curvature_weight.reshape(-1), (x1 * x1).reshape(-1)))
            x1 = step.first * x1
            continue
        V = None if step.weight_index is None else direction[step.weight_index]
        v_b = None if step.bias_index is None else direction[step.bias_index]
        if second_order and V is not None and x1 is not None:  # 2 ⟨ḡ_z, V a₁⟩
            add(2.0 * torch.vdot(step.adjoint.reshape(-1), (x1 @ V.T).reshape(-1)))
        x1 = _linear_tangent(step, x1, V, v_b)
    return x1, second


def _linear_tangent(step: _Linear, x1: Tensor | None, V: Tensor | None, v_b: Tensor | None) -> Tensor | None:
    """z₁ = a₁ Wᵀ + a₀ Vᵀ + v_b of a linear step (``None``: zero)."""
    if V is not None:
        z1 = torch.addmm(v_b, step.inputs, V.T) if v_b is not None else step.inputs @ V.T
        if x1 is not None:
            z1.addmm_(x1, step.weight.T)
        return z1
    z1 = None if x1 is None else x1 @ step.weight.T
    if v_b is not None:
        z1 = v_b.expand(step.inputs.shape[0], -1) if z1 is None else z1.add_(v_b)
    return z1


def _loss_curvature(problem: Problem, batch: PrimalBatch, f1: Tensor) -> tuple[Tensor, Tensor]:
    """``(f₁, ∇²_f ℓ f₁)`` with rows without a loss term (``ignore_index``) zeroed in f₁, so in both."""
    if batch.mask is not None:
        f1 = f1 * batch.mask
    return f1, problem.loss_rule.hessian_vp(batch.output, f1, batch.target)


def quadratic_forms(
    problem: Problem, batches: Iterable[PrimalBatch], Vs: list[Tensor], second_order: bool
) -> Tensor:
    """vᵀHv (``second_order``) or vᵀGv for the k directions ``Vs[i]`` of shape ``(k, *param_shape)``.

    Returns:
        ``(k,)``, scaled by the problem's reduction factor.
    """
    k = Vs[0].shape[0]
    forms = torch.zeros(k, dtype=problem.dtype, device=problem.device)
    for batch in batches:
        for j in range(k):  # one direction at a time: GEMMs over the batch's rows
            f1, second = _propagate(batch, [V[j] for V in Vs], second_order)
            if f1 is None:  # no parameter of the problem in the direction's path
                continue
            f1, curvature = _loss_curvature(problem, batch, f1)
            forms[j] += torch.vdot(f1.reshape(-1), curvature.reshape(-1))
            if second is not None:
                forms[j] += second
    return forms.mul_(problem.reduction_factor)


def _first_parameter_step(steps: list[_Linear | _Activation]) -> int:
    """Index of the first linear step with a parameter of the problem (``len(steps)``: none)."""
    for index, step in enumerate(steps):
        if isinstance(step, _Linear) and (step.weight_index is not None or step.bias_index is not None):
            return index
    return len(steps)


class _Sink:
    """Where one direction's product goes: views ``dests[i]`` of the result, scaled by c.

    A parameter's first term is written over its view, later terms (a module used
    twice, later batches) are added; GEMM terms go straight into the view
    (``addmm`` with β = 0, then 1, and α = c). ``finish`` zeroes the parameters
    no term reached. No zero fill, no separate scaling pass, no copy.
    """

    def __init__(self, dests: list[Tensor], c: float):
        self.dests, self.c, self.written = dests, c, set()

    def addmm(self, index: int, a: Tensor, b: Tensor) -> None:
        """dests[index] (+)= c · a @ b."""
        dest = self.dests[index]
        torch.addmm(dest, a, b, beta=1 if index in self.written else 0, alpha=self.c, out=dest)
        self.written.add(index)

    def add(self, index: int, term: Tensor) -> None:
        """dests[index] (+)= c · term."""
        dest = self.dests[index]
        if index in self.written:
            dest.add_(term, alpha=self.c)
        else:
            torch.mul(term, self.c, out=dest)
        self.written.add(index)

    def finish(self) -> None:
        for index, dest in enumerate(self.dests):
            if index not in self.written:
                dest.zero_()


def _product(
    batch: PrimalBatch, direction: list[Tensor], sink: _Sink, problem: Problem, second_order: bool
) -> None:
    """(H v) (``second_order``) or (G v) of one batch into ``sink`` (which scales by c).

    The GGN product is the Hessian's without the terms of the network's own
    curvature (σ'' δ_a z₁, δ_zᵀ a₁, δ_z V): J v forward, Λ, then Jᵀ back
    (2 + 2 GEMMs a layer, 1 + 1 for the first).
    """
    steps = batch.steps
    tangents: list[Tensor | None] = []  # z₁ or a₁ entering each step (None: zero)
    x1 = None
    for step in steps:
        tangents.append(x1)
        if isinstance(step, _Activation):
            x1 = None if x1 is None else step.first * x1
            continue
        V = None if step.weight_index is None else direction[step.weight_index]
        v_b = None if step.bias_index is None else direction[step.bias_index]
        x1 = _linear_tangent(step, x1, V, v_b)
    d = None if x1 is None else _loss_curvature(problem, batch, x1)[1]  # δ̇, entering each step from above
    first = _first_parameter_step(steps)
    for index in range(len(steps) - 1, first - 1, -1):
        step, x1_in = steps[index], tangents[index]
        if isinstance(step, _Activation):  # δ̇_z = σ' δ̇_a + σ'' δ_a z₁
            new = None if d is None else step.first * d
            if second_order and step.curvature_weight is not None and x1_in is not None:
                term = step.curvature_weight * x1_in
                new = term if new is None else new.add_(term)
            d = new
            continue
        if step.weight_index is not None:  # δ̇_zᵀ a₀ + δ_zᵀ a₁
            if d is not None:
                sink.addmm(step.weight_index, d.T, step.inputs)
            if second_order and x1_in is not None:
                sink.addmm(step.weight_index, step.adjoint.T, x1_in)
        if step.bias_index is not None and d is not None:
            sink.add(step.bias_index, d.sum(0))
        if index > first:  # δ̇_a = δ̇_z W + δ_z V
            V = None if step.weight_index is None else direction[step.weight_index]
            new = None if d is None else d @ step.weight
            if second_order and V is not None:
                new = step.adjoint @ V if new is None else new.addmm_(step.adjoint, V)
            d = new


def products(
    problem: Problem,
    batches: Iterable[PrimalBatch],
    Vs: list[Tensor],
    second_order: bool,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """H V (``second_order``) or G V for the k directions ``Vs[i]`` ``(k, *param_shape)``, over all batches.

    Args:
        problem: A problem ``supports`` accepts.
        batches: Its primal passes (``primal``), one per batch.
        Vs: The directions, one ``(k, *param_shape)`` tensor per parameter.
        second_order: The Hessian (True) or the GGN (False).
        out: Tensors like ``Vs`` to write the products into (e.g. views of a flat
            vector); ``None``: new ones. They must not overlap ``Vs``.

    Returns:
        A list like ``Vs`` (``out`` if given), scaled by the problem's reduction factor.
    """
    k = Vs[0].shape[0]
    totals = [torch.empty_like(V) for V in Vs] if out is None else out
    sinks = [_Sink([t[j] for t in totals], problem.reduction_factor) for j in range(k)]
    for batch in batches:
        for j in range(k):  # one direction at a time: GEMMs over the batch's rows
            _product(batch, [V[j] for V in Vs], sinks[j], problem, second_order)
    for sink in sinks:
        sink.finish()
    return totals


def gradient(problem: Problem, batches: Iterable[PrimalBatch]) -> Tensor:
    """∇_θ R from the primal passes' adjoints (∇_W = c Σ δ_zᵀ a₀, ∇_b = c Σ δ_z): flat ``(n,)``."""
    totals = [torch.zeros_like(p) for p in problem.params]
    for batch in batches:
        for step in batch.steps:
            if not isinstance(step, _Linear) or step.adjoint is None:
                continue
            if step.weight_index is not None:
                totals[step.weight_index].addmm_(step.adjoint.T, step.inputs)
            if step.bias_index is not None:
                totals[step.bias_index].add_(step.adjoint.sum(0))
    return torch.cat([t.reshape(-1) for t in totals]).mul_(problem.reduction_factor)
