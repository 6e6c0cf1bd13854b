"""Hooks that record what chosen modules see in a forward (and backward) pass, always removed.

The one capture mechanism of curvlab: the layerwise statistics pass records each
layer's input and output (``passes/autograd.py``), the optimizers the inputs
and output gradients of the Linear layers of a training step (``optim/factored.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

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


@contextlib.contextmanager
def record_calls(
    modules: Mapping[Hashable, nn.Module], copy_outputs: bool = False, output_gradients: bool = False
):
    """Record every call of each module while the block runs; yields ``{key: Calls}``.

    Args:
        modules: The modules to record, by any key.
        copy_outputs: The model computes on from a copy of each recorded output, so
            later in-place operations cannot change the recorded one.
        output_gradients: Also record the gradient of each output when a backward
            pass reaches it (a tensor hook; the output must require grad).
    """
    calls = {key: Calls() for key in modules}
    handles = []

    def hook_for(record: Calls):
        def hook(module, args, output):
            record.inputs.append(args[0].detach())
            record.outputs.append(output)
            record.versions.append(output._version)
            if output_gradients and isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda grad: record.output_grads.append(grad.detach()))
            return output.clone() if copy_outputs else None

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(calls[key])))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
