"""The general statistics pass: layer inputs and output gradients by autograd, for any model.

One forward pass per batch records every layer's input and output (hooks,
``curvlab.passes.capture``); the backpropagated vectors of a flavour (type-2: the
columns of a square root of Λ; MC: gradients for sampled labels; empirical: the
gradient for the true label) are pulled back to the layer outputs by batched
backward passes, a chunk of vectors at a time. Fast paths for particular
architectures (``curvlab.passes.fast``) give the same statistics by other means.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from curvlab.errors import UnsupportedError
from curvlab.memory import block_budget
from curvlab.passes.capture import record_calls
from curvlab.passes.layers import _ONCE, Layer, input_vectors, module_label
from curvlab.passes.vectors import BatchStatistics, Chunk, LocatedVectors
from curvlab.problem import Problem
from curvlab.sampling import mc_noise, sampled_output_gradients


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


def flavour_passes(problem: Problem, flavour: tuple, forward) -> Iterator[tuple[int, Tensor, Tensor, object]]:
    """Per counted batch: ``(index, output, vectors, extra)``, the shared start of a statistics pass.

    ``forward(X) -> (output, extra)`` runs the model on the batch's inputs, recording
    whatever the caller needs (``extra``); the output is checked against the targets and
    ``vectors`` are the flavour's (``(fisher_type, mc_samples, seed)``) backpropagated
    vectors (``backpropagated_vectors``).
    """
    fisher_type, mc_samples, seed = flavour
    for index, X, y, counted in problem.counted_batches():
        output, extra = forward(X)
        problem.loss_rule.check(output, y)
        vectors = backpropagated_vectors(problem, output, y, index, fisher_type, mc_samples, seed, counted)
        yield index, output, vectors, extra


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


def autograd_statistics(
    problem: Problem,
    layers: list[Layer],
    fisher_type: str,
    mc_samples: int = 1,
    seed: int = 0,
    max_vectors: int | None = None,
) -> Iterator[BatchStatistics]:
    """One ``BatchStatistics`` per batch; its chunks are of up to ``max_vectors`` vectors (all examples).

    ``max_vectors``: ``None`` chooses by memory (``vectors_per_pass``).
    """
    params = [p.detach().requires_grad_(True) for p in problem.params]
    modules = {layer.name: layer.module for layer in layers}
    copy_outputs = False  # until a layer's output is found changed in place

    def forward(X: Tensor):
        nonlocal copy_outputs
        with record_calls(modules, copy_outputs) as calls:
            output = problem.forward(params, X)
        if not copy_outputs and any(record.modified() for record in calls.values()):
            # Run the batch again with copies of the recorded outputs (and every
            # later batch: the model is the same). Copying always would cost a copy
            # and fresh memory of every layer output per pass.
            copy_outputs = True
            with record_calls(modules, copy_outputs) as calls:
                output = problem.forward(params, X)
        return output, calls

    flavour = (fisher_type, mc_samples, seed)
    for index, output, vectors, calls in flavour_passes(problem, flavour, forward):
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
        inputs = {layer.name: input_vectors(layer, calls[layer.name].inputs[0]) for layer in layers}
        layer_outputs = [calls[layer.name].outputs[0] for layer in layers]
        yield BatchStatistics(index, inputs, _chunks(layers, output, layer_outputs, vectors, max_vectors))


def _chunks(layers, output, layer_outputs, vectors, max_vectors) -> Iterator[Chunk]:
    """The chunks of one batch: its vectors pulled back a chunk at a time."""
    for chunk in vectors.split(vectors_per_pass(layer_outputs, max_vectors)):
        grads = _pullback(output, layer_outputs, chunk)
        yield Chunk(
            slice(None),
            {
                layer.name: LocatedVectors(layer.rule.output_vectors(layer.module, g))
                for layer, g in zip(layers, grads)
            },
        )
