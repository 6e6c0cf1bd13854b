"""Curvature state of an optimizer: running averages, snapshots for ``state_dict``, restore.

An optimizer's curvature is one of the library's structured objects: a
``BlockDiagonalOperator`` of ``KroneckerBlock`` / ``EigenbasisBlock`` /
``DenseOperator`` blocks (KFAC, EKFAC, ACP, BlockDiagonal) or a ``Diagonal``.
Snapshots hold only tensors and plain metadata, so they travel in
``Optimizer.state_dict()`` (and ``torch.save``) and rebuild an equal object.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.base import CurvatureOperator
from curvlab.operators.dense import DenseOperator
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.diagonal import Diagonal
from curvlab.structured.kfac import KFAC
from curvlab.structured.kronecker import (
    EigenbasisBlock,
    KroneckerBlock,
    LowRankKroneckerBlock,
    average_input_factors,
)

_FIELDS = {
    KroneckerBlock: ("G", "A"),
    LowRankKroneckerBlock: ("G", "Z"),
    EigenbasisBlock: ("Q_G", "Q_A", "D", "complement"),
    DenseOperator: ("matrix",),
}


def block_tensors(block) -> dict[str, Tensor]:
    """The tensors that define one block of a structured curvature, by field name."""
    for kind, fields in _FIELDS.items():
        if type(block) is kind:
            return {field: getattr(block, field) for field in fields}
    if isinstance(block, Diagonal):
        return {"diagonal": block.diagonal}
    raise TypeError(f"cannot snapshot a {type(block).__name__} block")


def is_snapshotable(C: CurvatureOperator) -> bool:
    """Whether ``snapshot`` supports ``C``."""
    try:
        snapshot(C)
    except TypeError:
        return False
    return True


def snapshot(C: CurvatureOperator) -> dict:
    """Tensors and metadata that rebuild ``C`` (see ``restore``)."""
    if isinstance(C, Diagonal):
        return {"type": "Diagonal", "diagonal": C.diagonal.clone()}
    if not isinstance(C, BlockDiagonalOperator):
        raise TypeError(f"cannot snapshot a {type(C).__name__}")
    blocks = []
    for indices, block in zip(C.block_indices, C.block_operators):
        blocks.append(
            {
                "type": type(block).__name__,
                "indices": list(indices),
                "bias_folded": getattr(block, "bias_folded", False),
                **{name: t.clone() for name, t in block_tensors(block).items() if t is not None},
            }
        )
    return {"type": "BlockDiagonal", "blocks": blocks}


def restore(state: dict, param_shapes, param_names, dtype, device) -> CurvatureOperator:
    """The curvature object of a ``snapshot`` (on ``device``, in ``dtype``)."""
    shapes = [torch.Size(s) for s in param_shapes]

    def move(t: Tensor) -> Tensor:
        return t.to(device, dtype)

    if state["type"] == "Diagonal":
        return Diagonal.from_tensor(move(state["diagonal"]), shapes, param_names)
    blocks = []
    for entry in state["blocks"]:
        indices = entry["indices"]
        sub_shapes = [shapes[i] for i in indices]
        sub_names = [param_names[i] for i in indices] if param_names else None
        kind = entry["type"]
        if kind == "KroneckerBlock":
            block = KroneckerBlock(
                move(entry["G"]), move(entry["A"]), sub_shapes, entry["bias_folded"], sub_names
            )
        elif kind == "LowRankKroneckerBlock":
            block = LowRankKroneckerBlock(
                move(entry["G"]), move(entry["Z"]), sub_shapes, entry["bias_folded"], sub_names
            )
        elif kind == "EigenbasisBlock":
            complement = entry.get("complement")
            block = EigenbasisBlock(
                move(entry["Q_G"]),
                move(entry["Q_A"]),
                move(entry["D"]),
                sub_shapes,
                entry["bias_folded"],
                sub_names,
                None if complement is None else move(complement),
            )
        elif kind == "DenseOperator":
            block = DenseOperator(move(entry["matrix"]), sub_shapes, sub_names)
        elif kind == "Diagonal":
            block = Diagonal.from_tensor(move(entry["diagonal"]), sub_shapes, sub_names)
        else:
            raise ValueError(f"unknown block type {kind!r} in an optimizer state")
        blocks.append((indices, block))
    return BlockDiagonalOperator(blocks, shapes, dtype, device, param_names)


def running_average(old: CurvatureOperator | None, new: CurvatureOperator, decay: float) -> CurvatureOperator:
    """The running average decay · old + (1 − decay) · new, factor by factor (KFAC: A and G).

    Kronecker factors, dense blocks and diagonals are averaged; eigenbasis
    blocks (EKFAC) are not averaged (their bases change), the new ones are taken.
    Without an ``old`` of the same structure, ``new`` is returned.
    """
    if old is None or decay == 0.0:
        return new
    try:
        before, after = snapshot(old), snapshot(new)
    except TypeError:
        return new
    if before["type"] != after["type"]:
        return new
    if after["type"] == "Diagonal":
        after["diagonal"] = decay * before["diagonal"] + (1 - decay) * after["diagonal"]
    else:
        if [b["indices"] for b in before["blocks"]] != [b["indices"] for b in after["blocks"]]:
            return new
        for b_old, b_new in zip(before["blocks"], after["blocks"]):
            if "Z" in b_old or "Z" in b_new:
                _average_low_rank(b_old, b_new, decay)
                continue
            if b_old["type"] != b_new["type"] or b_new["type"] == "EigenbasisBlock":
                continue
            for field in ("G", "A", "matrix", "diagonal"):
                if field in b_new:
                    b_new[field] = decay * b_old[field] + (1 - decay) * b_new[field]
    averaged = restore(after, new.param_shapes, new.param_names, new.dtype, new.device)
    return _of_the_same_class(old, new, averaged, decay)


def _of_the_same_class(old, new, averaged: CurvatureOperator, decay: float) -> CurvatureOperator:
    """``averaged`` as a ``cl.KFAC`` where both estimates are KFACs of the same layers.

    KFAC averages its layers' factors (so ``to_record`` stores the averaged A and G);
    otherwise (other classes, or an estimate restored from a ``state_dict`` snapshot)
    the average is a plain ``BlockDiagonalOperator`` of the same blocks and numbers.
    """
    same_layers = (
        type(new) is KFAC
        and type(old) is KFAC
        and [layer.name for layer in old.layers] == [layer.name for layer in new.layers]
    )
    if not same_layers:
        return averaged
    kronecker = len(new.block_sources)  # the other_structure blocks follow the Kronecker ones
    others = list(zip(averaged.block_indices[kronecker:], averaged.block_operators[kronecker:]))
    return new.running_average(old, decay, others)


def _average_low_rank(old: dict, new: dict, decay: float) -> None:
    """Average two Kronecker blocks' snapshots in place of ``new``, one of them low-rank (A = ZᵀZ).

    The input factors as ``kronecker.average_input_factors`` averages them (also KFAC's).
    """
    if old["type"] not in ("KroneckerBlock", "LowRankKroneckerBlock"):
        return
    new["G"] = decay * old["G"] + (1 - decay) * new["G"]
    old_root, new_root = "Z" in old, "Z" in new
    factor, is_root = average_input_factors(
        old["Z" if old_root else "A"], old_root, new.pop("Z" if new_root else "A"), new_root, decay
    )
    new["Z" if is_root else "A"] = factor
    new["type"] = "LowRankKroneckerBlock" if is_root else "KroneckerBlock"


def all_finite(C: CurvatureOperator) -> bool:
    """Whether every stored tensor of a structured curvature is finite (True if unknown)."""
    try:
        state = snapshot(C)
    except TypeError:
        return True
    tensors = [state["diagonal"]] if state["type"] == "Diagonal" else []
    for block in state.get("blocks", []):
        tensors += [v for v in block.values() if isinstance(v, Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
