r"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

Per supported layer (registry in ``curvlab.structured.layers``), the block of the
GGN/Fisher over its weight [and bias] is replaced by G ⊗ A (THEORY.md):

* expand (Eschenhagen et al. 2023): A = 1/(N R) Σ_{n,r} ã_{n,r} ã_{n,r}ᵀ and
  G = c Σ_v Σ_{n,r} g_{v,n,r} g_{v,n,r}ᵀ,
* reduce: A = 1/N Σ_n ā_n ā_nᵀ with ā_n = 1/R Σ_r ã_{n,r}, and
  G = c Σ_v Σ_n ḡ_{v,n} ḡ_{v,n}ᵀ with ḡ_{v,n} = Σ_r g_{v,n,r},

where ã is the layer input (with a trailing 1 when the bias is folded in), N the
number of examples of all batches, R the number of weight-sharing locations, c
the loss' reduction factor, and g_v the gradients w.r.t. the layer output of the
backpropagated output-space vectors, which define the flavour:

* ``"type-2"``: columns of a square root of Λ_n (exact in expectation; "KFLR"),
* ``"mc"``: gradients for S sampled labels ŷ ~ p(·|f), scaled by 1/√S,
* ``"empirical"``: the gradient for the true label.

With one example and no weight sharing, type-2 KFAC equals the exact GGN block.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from curvlab.errors import UnsupportedError
from curvlab.problem import Problem
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kronecker import KroneckerBlock
from curvlab.structured.layers import rule_for

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")


class _Layer:
    """A supported module and where its weight and bias sit in the problem's params."""

    def __init__(self, name: str, module: nn.Module, weight: int | None, bias: int | None):
        self.name = name
        self.module = module
        self.rule = rule_for(module, name)
        self.weight = weight
        self.bias = bias


def _find_layers(problem: Problem) -> list[_Layer]:
    """Group the problem's parameters by module; error on unsupported modules."""
    index_of = {id(p): i for i, p in enumerate(problem.params)}
    layers = []
    for name, module in problem.model.named_modules():
        owned = {
            role: index_of[id(p)] for role, p in module.named_parameters(recurse=False) if id(p) in index_of
        }
        if not owned:
            continue
        layer = _Layer(name, module, owned.get("weight"), owned.get("bias"))  # checks the registry
        unknown = set(owned) - {"weight", "bias"}
        if unknown:
            raise UnsupportedError(
                f"module {name!r} ({type(module).__name__}) has parameters {sorted(unknown)}"
            )
        layers.append(layer)
    return layers


@contextlib.contextmanager
def _capture(layers: list[_Layer]):
    """Record each layer's input and output in a forward pass; hooks always removed."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            outputs[name] = output

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook_for(layer.name)))
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


class KFAC(BlockDiagonalOperator):
    """Kronecker-factored approximation of the GGN / Fisher / empirical Fisher.

    Args:
        problem: The problem; every parameter must belong to a supported layer
            (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``).
        fisher_type: ``"type-2"`` (exact output-space square root), ``"mc"``
            (sampled labels) or ``"empirical"`` (true labels).
        mc_samples: Labels per example for ``"mc"``.
        seed: Seed of the sampled labels (drawn on the CPU, device-independent).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing.
        separate_weight_and_bias: Give weight and bias separate blocks G ⊗ A_W
            and G ⊗ 1 instead of folding the bias into A.
        max_vectors: Backpropagated vectors per batched backward pass (memory).
    """

    def __init__(
        self,
        problem: Problem,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        seed: int = 0,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        max_vectors: int = 64,
    ):
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        if int(mc_samples) != mc_samples or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples}")
        self.problem = problem
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.max_vectors = max_vectors
        self.layers = _find_layers(problem)
        factors = self._collect_factors()
        blocks = []
        for layer in self.layers:
            A, G = factors[layer.name]
            blocks.extend(self._blocks_of(layer, A, G))
        super().__init__(
            blocks, [p.shape for p in problem.params], problem.dtype, problem.device, problem.param_names
        )

    def _blocks_of(self, layer: _Layer, A: Tensor, G: Tensor):
        names = self.problem.param_names
        shapes = [p.shape for p in self.problem.params]
        has_weight, has_bias = layer.weight is not None, layer.bias is not None
        if has_weight and has_bias and not self.separate_weight_and_bias:
            indices = [layer.weight, layer.bias]
            block = KroneckerBlock(G, A, [shapes[i] for i in indices], True, [names[i] for i in indices])
            return [(indices, block)]
        blocks = []
        if has_weight:
            A_weight = A[:-1, :-1] if has_bias else A
            blocks.append(([layer.weight], KroneckerBlock(G, A_weight, [shapes[layer.weight]], False)))
        if has_bias:
            one = A[-1:, -1:]
            blocks.append(([layer.bias], KroneckerBlock(G, one, [shapes[layer.bias]], False)))
        return blocks

    # -------------------------------------------------------- factor statistics
    def _backpropagated(self, output: Tensor, y: Tensor, index: int) -> Tensor:
        """Output-space vectors ``(V, *output.shape)`` of the chosen flavour."""
        rule = self.problem.loss_rule
        if self.fisher_type == "type-2":
            return rule.hessian_sqrt_columns(output.detach())
        if self.fisher_type == "empirical":
            return rule.output_gradient(output.detach(), y).unsqueeze(0)
        generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + index) % 2**63)
        noise = rule.draw_noise(rule.noise_shape(y, self.mc_samples), generator).to(output.device)
        sampled = rule.sample_targets(output.detach(), noise)
        S = self.mc_samples
        repeated = output.detach().unsqueeze(0).expand(S, *output.shape).reshape(-1, *output.shape[1:])
        r = rule.output_gradient(repeated, sampled.reshape(-1, *sampled.shape[2:]))
        return r.reshape(S, *output.shape) / S**0.5

    def _collect_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        problem = self.problem
        A_sum: dict[str, Tensor] = {}
        G_sum: dict[str, Tensor] = {}
        params = [p.detach().requires_grad_(True) for p in problem.params]
        for index, (X, y) in enumerate(problem.batches()):
            with _capture(self.layers) as (inputs, outputs):
                output = problem.forward(params, X)
            problem.loss_rule.validate(output, y)
            for layer in self.layers:
                A = self._input_moment(layer, inputs[layer.name])
                A_sum[layer.name] = A if layer.name not in A_sum else A_sum[layer.name] + A
            layer_outputs = [outputs[layer.name] for layer in self.layers]
            vectors = self._backpropagated(output, y, index)
            for chunk in vectors.split(self.max_vectors):
                for layer, g in zip(self.layers, self._pullback(output, layer_outputs, chunk)):
                    G = self._output_moment(layer, g)
                    G_sum[layer.name] = G if layer.name not in G_sum else G_sum[layer.name] + G
        c = problem.reduction_factor
        return {
            layer.name: (A_sum[layer.name] / problem.num_examples, G_sum[layer.name] * c)
            for layer in self.layers
        }

    @staticmethod
    def _pullback(output: Tensor, layer_outputs: list[Tensor], vectors: Tensor) -> list[Tensor]:
        """Gradients of ⟨output, v⟩ w.r.t. each layer output, batched over the V vectors."""
        if vectors.shape[0] == 1:
            grads = torch.autograd.grad(output, layer_outputs, vectors[0], retain_graph=True)
            return [g.unsqueeze(0) for g in grads]
        return list(
            torch.autograd.grad(output, layer_outputs, vectors, retain_graph=True, is_grads_batched=True)
        )

    def _input_moment(self, layer: _Layer, x: Tensor) -> Tensor:
        """Σ_n over the batch of the input second moment (before dividing by N)."""
        a = layer.rule.input_vectors(layer.module, x)  # (N, R, d_in)
        if layer.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if layer.weight is None:
            a = a[..., -1:]
        R = a.shape[1]
        if self.kfac_approx == "expand":
            flat = a.reshape(-1, a.shape[-1])
            return flat.T @ flat / R
        mean = a.mean(1)
        return mean.T @ mean

    def _output_moment(self, layer: _Layer, g: Tensor) -> Tensor:
        """Σ over vectors and examples of the output-gradient second moment."""
        vectors = layer.rule.output_vectors(layer.module, g)  # (V, N, R, d_out)
        if self.kfac_approx == "reduce":
            vectors = vectors.sum(2)
        flat = vectors.reshape(-1, vectors.shape[-1])
        return flat.T @ flat
