"""Hooks that record what chosen modules see in a forward (and backward) pass, always removed.

The one capture mechanism of curvlab: the layerwise statistics pass records each
layer's input and output (``passes/autograd.py``), the optimizers the inputs
and output gradients of the Linear layers of a training step (``optim/factored.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Calls:
    """What one module saw, one entry per call (a module called twice has two)."""

    inputs: list[Tensor] = field(default_factory=list)  # its first argument, detached
    outputs: list[Tensor] = field(default_factory=list)  # as returned (with their graph)
    versions: list[int] = field(default_factory=list)  # the outputs' in-place versions when returned
    output_grads: list[Tensor] = field(default_factory=list)  # in the backward pass, if recorded

    def modified(self) -> bool:
        """Whether an output was changed in place after it was returned (``ReLU(inplace=True)``)."""
        return any(output._version != version for output, version in zip(self.outputs, self.versions))


_IN_CURVATURE_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("curvlab_pass", default=False)


@contextlib.contextmanager
def own_pass():
    """Mark the block as one of curvlab's own passes (``Problem.forward`` runs in one)."""
    token = _IN_CURVATURE_PASS.set(True)
    try:
        yield
    finally:
        _IN_CURVATURE_PASS.reset(token)


def _append_gradient(weak_record, grad: Tensor) -> None:
    record = weak_record()
    if record is not None:
        record.output_grads.append(grad.detach())


@contextlib.contextmanager
def record_calls(
    modules: Mapping[Hashable, nn.Module],
    copy_outputs: bool = False,
    output_gradients: bool = False,
    user_passes_only: bool = False,
):
    """Record every call of each module while the block runs; yields ``{key: Calls}``.

    Args:
        modules: The modules to record, by any key.
        copy_outputs: The model computes on from a copy of each recorded output, so
            later in-place operations cannot change the recorded one.
        output_gradients: Also record the gradient of each output when a backward
            pass reaches it (a tensor hook; the output must require grad).
        user_passes_only: Record only the user's training passes: skip calls made with
            gradients disabled (evaluation) and those of curvlab's own passes
            (``own_pass``).
    """
    calls = {key: Calls() for key in modules}
    handles = []

    def hook_for(record: Calls):
        def hook(module, args, output):
            if user_passes_only and (not torch.is_grad_enabled() or _IN_CURVATURE_PASS.get()):
                return None
            record.inputs.append(args[0].detach())
            record.outputs.append(output)
            record.versions.append(output._version)
            if output_gradients and isinstance(output, Tensor) and output.requires_grad:
                # Through a weak reference: the record keeps the output, whose graph keeps this
                # hook; a strong one would close a cycle through autograd's C++ graph that
                # Python's collector cannot see (every recorded pass would leak).
                weak = weakref.ref(record)
                output.register_hook(lambda grad: _append_gradient(weak, grad))
            return output.clone() if copy_outputs else None

        hook.observes_only = not copy_outputs  # changes nothing the module computes (passes/layers.py)
        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(calls[key])))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
