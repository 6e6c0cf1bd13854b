"""The layers of a problem with Kronecker-factored curvature, and the rules for each layer type.

``find_layers`` groups a problem's parameters by module and refuses what no
layerwise pass captures (a module without a rule, used twice, or not at all).
A rule (the explicit ``REGISTRY``) turns a module's input into per-location input vectors ``(N, R, d_in)``
and an output gradient into per-location vectors ``(V, N, R, d_out)``, where R
counts the locations that share the weight (sequence positions, convolution
patches; R = 1 for a plain ``Linear`` on ``(N, d_in)`` inputs). The flattened
weight ``(d_out, d_in)`` is ``module.weight.reshape(d_out, -1)``, row-major.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import UnsupportedError
from curvlab.problem import Problem


def module_label(name: str, module: nn.Module) -> str:
    """How errors name a module: ``module 'encoder.0' (Linear)``, or the model itself."""
    kind = type(module).__name__
    return f"module {name!r} ({kind})" if name else f"the model itself ({kind})"


class LayerRule:
    """How one layer type maps inputs and output gradients to Kronecker factors."""

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``UnsupportedError`` for module options the rule cannot handle."""

    def input_vectors(self, module: nn.Module, x: Tensor, append_one: bool = False) -> Tensor:
        """Layer input → ``(N, R, d_in)``, or ``(N, R, d_in + 1)`` ending in 1 with ``append_one``."""
        raise NotImplementedError

    def output_vectors(self, module: nn.Module, g: Tensor) -> Tensor:
        """Output gradients with leading vector dim ``(V, N, …)`` → ``(V, N, R, d_out)``."""
        raise NotImplementedError


class LinearRule(LayerRule):
    """``nn.Linear`` on inputs ``(N, …, d_in)``; extra dims are shared locations."""

    def input_vectors(self, module, x, append_one=False):  # noqa: D102
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if append_one else a

    def output_vectors(self, module, g):  # noqa: D102
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


# nn.Conv*d's padding modes; all but "zeros" are F.pad modes of the same name.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d``: any stride, dilation, padding (``"same"`` too), padding mode; groups 1.

    The patches are those of the padded input, padded as the module pads it
    (zeros, or ``F.pad`` with its ``padding_mode``, which is what ``nn.Conv*d``
    does before an unpadded convolution).
    """

    def __init__(self, spatial_dims: int):
        self.spatial_dims = spatial_dims

    def check(self, module, name):  # noqa: D102
        if module.groups != 1:
            raise UnsupportedError(f"{module_label(name, module)}: groups={module.groups}, only 1")
        if module.padding_mode not in PADDING_MODES:
            raise UnsupportedError(
                f"{module_label(name, module)}: padding_mode={module.padding_mode!r}, "
                f"supported: {', '.join(map(repr, PADDING_MODES))}"
            )

    @staticmethod
    def _padding(module) -> list[tuple[int, int]]:
        """(before, after) padding per spatial dim; string paddings as ``F.conv*d`` applies them.

        ``"same"`` pads d·(k − 1) in all, the odd one on the far side (torch's rule,
        ``nn.modules.conv._ConvNd``); ``"valid"`` pads nothing.
        """
        if module.padding == "valid":
            return [(0, 0)] * len(module.kernel_size)
        if module.padding == "same":
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            return [(total // 2, total - total // 2) for total in totals]
        return [(p, p) for p in module.padding]

    def _as_2d(self, module, x):
        padding = self._padding(module)
        if self.spatial_dims == 2:
            return x, module.kernel_size, module.dilation, padding, module.stride
        return (
            x.unsqueeze(-2),
            (1, module.kernel_size[0]),
            (1, module.dilation[0]),
            [(0, 0), padding[0]],
            (1, module.stride[0]),
        )

    def input_vectors(self, module, x, append_one=False):  # noqa: D102
        # The patches are gathered by one strided copy straight into a d-major buffer
        # (d_in [+ 1], N, R): second moments then read contiguous rows, and no
        # (N, R, d) transpose of an unfold is ever made.
        x2d, (kh, kw), (dh, dw), ((top, bottom), (left, right)), (sh, sw) = self._as_2d(module, x)
        pads = (left, right, top, bottom)
        if not any(pads):
            padded = x2d.contiguous()
        else:  # "zeros" is F.pad's "constant"; the other modes have F.pad's names
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            padded = F.pad(x2d, pads, mode=mode)
        N, C, H, W = padded.shape
        Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
        sN, sC, sH, sW = padded.stride()
        patches = padded.as_strided((C, kh, kw, N, Ho, Wo), (sC, dh * sH, dw * sW, sN, sh * sH, sw * sW))
        d = C * kh * kw  # ordered (C_in, k…) like weight.reshape(out, -1)
        buffer = padded.new_empty(d + int(append_one), N, Ho * Wo)
        buffer[:d].view(C, kh, kw, N, Ho, Wo).copy_(patches)
        if append_one:
            buffer[d] = 1
        return buffer.permute(1, 2, 0)

    def output_vectors(self, module, g):  # noqa: D102
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)


REGISTRY: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
}


def rule_for(module: nn.Module, name: str) -> LayerRule:
    """The rule of ``module`` or an ``UnsupportedError`` naming it."""
    rule = REGISTRY.get(type(module))
    if rule is None:
        supported = ", ".join(cls.__name__ for cls in REGISTRY)
        raise UnsupportedError(
            f"{module_label(name, module)} has parameters but no Kronecker rule; "
            f"supported layers: {supported}"
        )
    changing = [hook for hook in module._forward_hooks.values() if not getattr(hook, "observes_only", False)]
    if module._forward_pre_hooks or changing:  # curvlab's own recording hooks change nothing
        # A hook may change the layer's input or output, so the statistics taken
        # from them would not be those of W a + b (and the plain-MLP pass skips hooks).
        raise UnsupportedError(
            f"{module_label(name, module)} has forward hooks, which may change what it computes; "
            "its Kronecker factors would not describe the model"
        )
    rule.check(module, name)
    return rule


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


def factor_sizes(layer: Layer, params: list[Tensor]) -> tuple[int, int]:
    """``(d_out, d_A)`` of a layer's Kronecker factors G and A (d_A counts the bias column)."""
    if layer.weight is None:
        return params[layer.bias].shape[0], 1
    weight = params[layer.weight]
    return weight.shape[0], weight[0].numel() + (layer.bias is not None)
