"""One pass over the data that yields, per layer, input vectors and output gradients.

KFAC, EKFAC and ACP all consume this pass; they differ in what they accumulate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.errors import UnsupportedError
from curvlab.operators.memory import block_budget
from curvlab.problem import Problem
from curvlab.sampling import mc_noise, sampled_output_gradients
from curvlab.structured.capture import record_calls
from curvlab.structured.layers import LayerRule, module_label, rule_for

_MAX_ELEMENTS = 2**24  # bound on the (vectors, examples, d_out, d_A) intermediate


def squared_gradient_moments(g: Tensor, a: Tensor) -> Tensor:
    """Σ_{v,n} (Σ_r g_{v,n,r} a_{n,r}ᵀ)², elementwise: (d_out, d_A).

    g: (V, N, R, d_out) output gradients, a: (N, R, d_A) inputs, both possibly
    rotated into an eigenbasis. Unrotated, this is the exact diagonal of the layer
    block c⁻¹ B (the per-example gradient of each vector, squared and summed).
    ``g`` may also be the MLP pass' vectors (``sequential.DenseVectors``/``ScaledRows``).
    """
    if not isinstance(g, Tensor):
        return g.squared_moments(a)
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


@dataclass
class Layer:
    """A supported module and where its weight and bias sit in the problem's params."""

    name: str
    module: nn.Module
    rule: LayerRule
    weight: int | None
    bias: int | None


# Why a layer used several times (or not at all) has no layerwise statistics.
_ONCE = "Kronecker factors and the layerwise statistics need each layer used once per forward pass"


def _shared_message(module: nn.Module, name: str, uses: int | None = None) -> str:
    how = f"is used {uses} times" if uses else "shares a parameter with another module"
    return f"{module_label(name, module)} {how} (weight sharing); {_ONCE}"


def _check_used_once(problem: Problem, module: nn.Module, name: str, indices) -> None:
    """UnsupportedError unless each of the module's parameters is read once by the forward pass.

    Counted in the first batch's autograd graph (``Problem.param_uses``): 0 means
    the module takes no part in the forward pass; more than 1 that it is called
    again (a loop) or that its parameter is also used outside it (a decoder
    reading an encoder's weight transposed), which no per-layer pass captures.
    """
    uses = {problem.param_uses[problem.param_names[i]] for i in indices}
    if uses == {1}:
        return
    if 0 in uses:
        raise UnsupportedError(
            f"{module_label(name, module)} takes no part in the model's forward pass "
            "(its parameters get no gradient, so its curvature is 0)"
        )
    raise UnsupportedError(
        f"{module_label(name, module)} has a parameter read {max(uses)} times in one "
        "forward pass: the module is called more than once (e.g. in a loop) or its parameter is "
        f"also used outside it (weight sharing); {_ONCE}"
    )


OTHER_STRUCTURE_REMEDY = (
    "Pass other_structure='exact' or 'diagonal' to give its parameters an exact block or diagonal, "
    "or leave them out of the problem's params"
)


def find_layers(
    problem: Problem, unsupported: list[int] | None = None, remedy: str = OTHER_STRUCTURE_REMEDY
) -> list[Layer]:
    """Group the problem's parameters by module; error on unsupported modules.

    A module reachable by two paths (the same layer twice in a ``Sequential``),
    owning a parameter tied to another module, or whose parameters the first
    batch's forward pass reads more than once or never, counts as unsupported:
    its parameters' curvature couples several uses, which no per-layer pass
    captures (or is 0).

    Args:
        problem: The problem.
        unsupported: If given, indices of parameters of modules without a rule are
            appended to it instead of raising.
        remedy: The sentence the error ends with: what the caller offers instead
            (``other_structure`` for the KFAC family).
    """
    index_of = {id(p): i for i, p in enumerate(problem.params)}
    paths = Counter(id(m) for _, m in problem.model.named_modules(remove_duplicate=False))
    owners = Counter(
        id(p) for m in problem.model.modules() for _, p in m.named_parameters(recurse=False)
    )  # more than 1: a parameter tied across modules
    layers = []
    for name, module in problem.model.named_modules():
        owned = {
            role: index_of[id(p)] for role, p in module.named_parameters(recurse=False) if id(p) in index_of
        }
        if not owned:
            continue
        try:
            if paths[id(module)] > 1 or any(owners[id(problem.params[i])] > 1 for i in owned.values()):
                uses = paths[id(module)]
                raise UnsupportedError(_shared_message(module, name, uses if uses > 1 else None))
            _check_used_once(problem, module, name, owned.values())
            rule = rule_for(module, name)
        except UnsupportedError as error:
            if unsupported is None:
                raise UnsupportedError(f"{error}. {remedy}") from None
            unsupported.extend(i for i in owned.values() if i not in unsupported)
            continue
        unknown = set(owned) - {"weight", "bias"}
        if unknown:
            raise UnsupportedError(f"{module_label(name, module)} has parameters {sorted(unknown)}")
        layers.append(Layer(name, module, rule, owned.get("weight"), owned.get("bias")))
    return layers


def input_vectors(layer: Layer, x: Tensor) -> Tensor:
    """ã: ``(N, R, d_A)``, with a trailing 1 when the layer's bias is in the problem."""
    a = layer.rule.input_vectors(layer.module, x, append_one=layer.bias is not None)
    if layer.weight is None:
        a = a[..., -1:]
    return a


def backpropagated_vectors(
    problem: Problem,
    output: Tensor,
    y: Tensor,
    index: int,
    fisher_type: str,
    mc_samples: int,
    seed: int,
    counted: Tensor | None = None,
) -> Tensor:
    """Output-space vectors ``(V, *output.shape)`` of a flavour.

    ``"type-2"``: columns of a square root of Λ; ``"mc"``: gradients for
    ``mc_samples`` sampled labels scaled by 1/√S (drawn on the CPU from ``seed``
    and the batch index); ``"empirical"``: the gradient for the true label.
    ``counted``: the batch's examples kept by ``Problem.counted_batches`` (``None``:
    all); labels are drawn for the whole batch and then selected, so each example
    gets the same labels as in ``cl.Fisher(mc_samples=…)`` with the same seed.
    """
    rule = problem.loss_rule
    output = output.detach()
    if fisher_type == "empirical":
        return rule.output_gradient(output, y).unsqueeze(0)  # zero where there is no loss term
    if fisher_type == "type-2":
        vectors = rule.hessian_sqrt_columns(output, y)
    else:
        noise = mc_noise(rule, y, mc_samples, seed, index, output.dtype, counted)
        vectors = sampled_output_gradients(rule, output, noise) / mc_samples**0.5
    mask = rule.mask(y)  # entries without a loss term (ignore_index) backpropagate nothing
    return vectors if mask is None else vectors * mask


def _pullback(output: Tensor, layer_outputs: list[Tensor], vectors: Tensor) -> list[Tensor]:
    """Gradients of ⟨output, v⟩ w.r.t. each layer output, batched over the V vectors."""
    if vectors.shape[0] == 1:
        grads = torch.autograd.grad(output, layer_outputs, vectors[0], retain_graph=True)
        return [g.unsqueeze(0) for g in grads]
    return list(torch.autograd.grad(output, layer_outputs, vectors, retain_graph=True, is_grads_batched=True))


def vectors_per_pass(layer_outputs: list[Tensor], max_vectors: int | None) -> int:
    """How many vectors one batched backward pass takes.

    ``None`` chooses by memory: as many as keep the pass' layer-output gradients
    within ``block_budget`` (CPU 16 MiB, CUDA 1 GiB), at least 1 and at most 64.
    """
    if max_vectors is not None:
        return max(1, int(max_vectors))
    per_vector = sum(o.numel() * o.element_size() for o in layer_outputs)
    return max(1, min(64, block_budget(layer_outputs[0].device) // max(1, per_vector)))


def layer_statistics(
    problem: Problem,
    layers: list[Layer],
    fisher_type: str,
    mc_samples: int = 1,
    seed: int = 0,
    max_vectors: int | None = None,
) -> Iterator[tuple[int, dict[str, Tensor], dict[str, Tensor]]]:
    """Yield ``(batch_index, inputs, grads)`` per batch and chunk of vectors.

    ``inputs[name]`` is ã ``(N, R, d_A)`` (repeated for every chunk of a batch),
    ``grads[name]`` the output gradients ``(V, N, R, d_out)`` of up to
    ``max_vectors`` backpropagated vectors (``None``: see ``vectors_per_pass``).
    """
    params = [p.detach().requires_grad_(True) for p in problem.params]
    modules = {layer.name: layer.module for layer in layers}
    copy_outputs = False  # until a layer's output is found changed in place
    for index, X, y, counted in problem.counted_batches():
        with record_calls(modules, copy_outputs) as calls:
            output = problem.forward(params, X)
        if not copy_outputs and any(record.modified() for record in calls.values()):
            # Run the batch again with copies of the recorded outputs (and every
            # later batch: the model is the same). Copying always would cost a copy
            # and fresh memory of every layer output per pass.
            copy_outputs = True
            with record_calls(modules, copy_outputs) as calls:
                output = problem.forward(params, X)
        problem.loss_rule.check(output, y)
        for layer in layers:
            called = len(calls[layer.name].inputs)
            if called == 0:
                raise UnsupportedError(
                    f"{module_label(layer.name, layer.module)} is not called in the forward "
                    f"pass of batch {index} (it was in the first): {_ONCE}, in every batch"
                )
            if called > 1:
                raise UnsupportedError(
                    f"{module_label(layer.name, layer.module)} is called more than once in one forward "
                    f"pass (weight sharing, e.g. in a loop); {_ONCE}. Leave its parameters out of the "
                    "problem's params, or use the exact operators (cl.GGN, cl.BlockDiagonal of them)"
                )
        inputs = {name: record.inputs[0] for name, record in calls.items()}
        outputs = {name: record.outputs[0] for name, record in calls.items()}
        a = {layer.name: input_vectors(layer, inputs[layer.name]) for layer in layers}
        layer_outputs = [outputs[layer.name] for layer in layers]
        vectors = backpropagated_vectors(problem, output, y, index, fisher_type, mc_samples, seed, counted)
        for chunk in vectors.split(vectors_per_pass(layer_outputs, max_vectors)):
            grads = _pullback(output, layer_outputs, chunk)
            yield (
                index,
                a,
                {layer.name: layer.rule.output_vectors(layer.module, g) for layer, g in zip(layers, grads)},
            )
