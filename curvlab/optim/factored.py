r"""Kronecker preconditioning of a minibatch gradient from its factors.

The weight gradient of an ``nn.Linear`` layer on a minibatch is a sum of outer
products, ∇[W b] = Uᵀ X with U ``(n, d_out)`` the loss' gradients w.r.t. the
layer's outputs and X = [h 1] ``(n, d_A)`` its inputs. A Kronecker block applies
to it as (G ⊗ A) vec(UᵀX) = vec((UG)ᵀ(XA)): for a minibatch smaller than the
layer's widths this costs n(d_out² + d_A² + d_out·d_A) multiply-adds instead of
d_out·d_A·(d_out + d_A) (ACP: n·d_A·(d_A + d_out) instead of d_out·d_A²).

U and X are recorded while the optimizer runs the user's closure (hooks on the
Linear modules, always removed). The factored route is taken for a block only
when it provably gives the same result: the layer ran exactly once forward and
once backward, and the gradient the optimizer holds agrees with UᵀX on a random
probe (so gradients accumulated over several closures, clipped, rescaled or with
weight decay added take the ordinary route).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from curvlab.passes.capture import Calls, record_calls
from curvlab.structured.kronecker import LayerMatrixBlock

_PROBE_TOLERANCE = 1e3  # × machine epsilon × ‖U‖_F ‖X r‖


def record_linear_factors(model: nn.Module, params: list[Tensor], user_passes_only: bool = False):
    """Record the inputs and output gradients of ``model``'s Linear layers that own ``params``.

    A context manager yielding ``{module: Calls}`` (``curvlab.passes.capture``),
    filled while the block runs forward and backward passes. The inputs are the
    tensors autograd keeps anyway (no copy); the hooks change nothing and are
    removed on exit, also after an error. ``user_passes_only``: neither passes
    with gradients disabled (evaluation) nor curvlab's own passes are recorded.
    """
    owned = {id(p) for p in params}
    linear = {
        module: module
        for module in model.modules()
        if type(module) is nn.Linear and any(id(p) in owned for p in module.parameters(recurse=False))
    }
    return record_calls(linear, output_gradients=True, user_passes_only=user_passes_only)


@functools.lru_cache(maxsize=64)
def _probe(length: int, dtype, device) -> Tensor:
    """A fixed random vector (seeded, drawn on the CPU: the same on every device)."""
    generator = torch.Generator().manual_seed(length)
    return torch.randn(length, generator=generator, dtype=torch.float64).to(device, dtype)


def _factors_of(module: nn.Module, roles: list[str], record: Calls | None):
    """``(U, X)`` of the block's gradient over ``roles`` of ``module``, or ``None``."""
    if record is None or len(record.inputs) != 1 or len(record.output_grads) != 1:
        return None  # not used, or used several times (shared weights, accumulation)
    h, U = record.inputs[0], record.output_grads[0]
    if h.shape[-1] != module.in_features or U.shape[-1] != module.out_features:
        return None
    h, U = h.reshape(-1, module.in_features), U.reshape(-1, module.out_features)
    if h.shape[0] != U.shape[0] or h.dtype != U.dtype:
        return None
    ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
    if roles == ["weight", "bias"]:
        return U, torch.cat([h, ones], dim=1)
    if roles == ["weight"]:
        return U, h
    if roles == ["bias"]:
        return U, ones
    return None


def _matches(gradient: list[Tensor], roles: list[str], U: Tensor, X: Tensor) -> bool:
    """Whether the held gradient equals UᵀX, checked on one random probe r: (UᵀX) r = Uᵀ(X r)."""
    r = _probe(X.shape[1], X.dtype, X.device)
    held = torch.zeros(U.shape[1], dtype=X.dtype, device=X.device)
    column = 0
    for g, role in zip(gradient, roles):
        if g.dtype != X.dtype or g.device != X.device:
            return False
        if role == "weight":
            held += g @ r[column : column + g.shape[1]]
            column += g.shape[1]
        else:  # the bias: the last column of X, as in the folded A
            held += g * r[column]
            column += 1
    Xr = X @ r
    factored = U.T @ Xr
    scale = U.norm() * Xr.norm()
    tolerance = _PROBE_TOLERANCE * torch.finfo(X.dtype).eps * scale
    return bool((held - factored).norm() <= tolerance)


def precondition(inverse, params: list[Tensor], gradient: list[Tensor], records: dict | None):
    """``inverse @ gradient``, Linear blocks from the recorded factors where that is cheaper.

    Args:
        inverse: A ``BlockDiagonalOperator`` (other operators: the ordinary product).
        params: The optimizer's parameters (the operator's tensor order).
        gradient: The gradient the step preconditions, one tensor per parameter.
        records: What ``record_linear_factors`` recorded in this step's closure, or ``None``.

    Returns:
        ``(direction, factored)``: the direction, and how many blocks used the factors.
    """
    blocks = getattr(inverse, "block_operators", None)
    if not records or blocks is None:
        return inverse @ gradient, 0
    owner = owners(records)
    direction: list[Tensor | None] = [None] * len(gradient)
    factored = 0
    for indices, block in zip(inverse.block_indices, blocks):
        parts = [gradient[i] for i in indices]
        result = _factored_block(block, [params[i] for i in indices], parts, owner, records)
        if result is None:
            result = [r.squeeze(0) for r in block._matmat([g.unsqueeze(0) for g in parts])]
        else:
            factored += 1
        for i, r in zip(indices, result):
            direction[i] = r
    return direction, factored


def owners(records: dict) -> dict[int, tuple[nn.Module, str]]:
    """``id(parameter) → (module, "weight" | "bias")`` for the recorded modules."""
    return {id(p): (module, role) for module in records for role, p in module.named_parameters(recurse=False)}


def verified_factors(module: nn.Module, roles: list[str], records: dict, gradient: list[Tensor]):
    """``(U, X)`` with ``gradient`` (of ``roles`` of ``module``, weight first) = UᵀX, or ``None``.

    X ends in a column of ones when the bias is among ``roles``; ``None`` when the
    module was not used exactly once or the gradient is not UᵀX (see the module doc).
    """
    factors = _factors_of(module, roles, records.get(module))
    if factors is None or not _matches(gradient, roles, *factors):
        return None
    return factors


def _factored_block(block, params, parts, owner, records) -> list[Tensor] | None:
    """One block's preconditioned gradient from the factors, or ``None`` (take the ordinary route)."""
    if not isinstance(block, LayerMatrixBlock):
        return None
    found = [owner.get(id(p)) for p in params]
    if any(o is None for o in found) or len({id(o[0]) for o in found}) != 1:
        return None
    module, roles = found[0][0], [role for _, role in found]
    if roles == ["weight", "bias"] and not block.bias_folded:
        return None
    record = records.get(module)
    if record is None or len(record.inputs) != 1:
        return None
    if not block.prefers_factors(record.inputs[0].numel() // module.in_features):
        return None  # decided before the factors are assembled and checked
    factors = verified_factors(module, roles, records, parts)
    if factors is None:
        return None
    matrix = block.outer_sum_product(*factors)
    return [r.squeeze(0) for r in block._from_matrix(matrix.unsqueeze(0))]


def pass_statistics(
    problem, records: dict, gradient: list[Tensor], second_moments: bool = True
) -> dict | None:
    """Layer statistics of the training pass the records saw: ``{layer name: (A, UᵀU, max U²)}``.

    A = XᵀX / (N R) is the input factor of KFAC (expand) and ACP (X the layer inputs with
    a trailing 1 for the bias, R rows per example); U are the output gradients of the
    pass' loss, c times those of the loss terms (c the reduction factor). ``None`` unless
    every layer of the problem is an ``nn.Linear`` used once in that pass, its gradient in
    ``gradient`` (in ``problem.params`` order) is UᵀX (the probe check of
    ``verified_factors``), and every example has loss terms. ``second_moments=False``
    leaves UᵀU out (``None``: ACP needs only max U²).
    """
    from curvlab.passes.layers import find_layers

    if problem.num_counted_examples != problem.num_examples or problem.group is not None:
        return None
    try:
        layers = find_layers(problem)
    except Exception:  # noqa: BLE001 (a layer without a Kronecker rule: no own-pass statistics)
        return None
    statistics = {}
    for layer in layers:
        if type(layer.module) is not nn.Linear:
            return None
        indices = [i for i in (layer.weight, layer.bias) if i is not None]
        roles = ["weight", "bias"][: len(indices)] if layer.weight is not None else ["bias"]
        factors = verified_factors(layer.module, roles, records, [gradient[i] for i in indices])
        if factors is None:
            return None
        U, X = factors
        rows_per_example = X.shape[0] // problem.num_examples
        A = (X.T @ X) / (problem.num_examples * rows_per_example)
        statistics[layer.name] = (A, U.T @ U if second_moments else None, U.pow(2).max())
    return statistics
