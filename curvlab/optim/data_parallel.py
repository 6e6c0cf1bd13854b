r"""Optimizer steps under a process group: one global step, taken identically on every rank.

Each rank runs the closure on its share of the global minibatch. The step then

* averages the gradients once (one all-reduce of P numbers plus a few flags):
  Σ_r w_r g_r / Σ_r w_r with w_r the rank's number of loss terms for a mean
  loss (the gradient of the global minibatch), Σ_r g_r for a sum loss. A model
  wrapped in ``DistributedDataParallel`` has had its gradients averaged by DDP
  (the plain mean over ranks, the same when every rank's minibatch is as large;
  curvlab multiplies it by the number of ranks for a sum loss);
* shares the loss the same way, and every rank's data check, so a step skipped on
  one rank is skipped on all (``agree_on_outcome``);
* builds the curvature of the global minibatch (``Problem`` with the group) and,
  with ``distribute_inverses``, inverts each Kronecker block on one rank only and
  gathers the inverses (the KAISA idea: Pauloski et al. 2021), so inversion time
  per step falls with the number of ranks.

Every rank then holds the same numbers and applies the same update: parameters
stay bit-identical (tested).
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from curvlab.distributed import Group, RankFailure
from curvlab.errors import NonFiniteError
from curvlab.losses import rule_for
from curvlab.optim import state as curvature_state
from curvlab.structured.block_diagonal import BlockDiagonalOperator

_BAD_PARTS = (None, "inputs", "targets")


def share_step(group: Group, loss_fn, loss: Tensor | None, batch, bad_data: str | None, gradients):
    """The global loss and gradient, and which rank has bad data; one all-reduce.

    ``gradients``: this rank's gradient tensors, replaced in place by the global
    gradient; ``None`` when ``DistributedDataParallel`` has averaged them already
    (``ddp_gradients`` then rescales them for a sum loss). Returns ``(loss,
    bad_data)``: the global loss as a tensor (``None`` without a closure) and, if a
    rank's batch has NaN or Inf, ``"the inputs of rank 1's batch"`` (and the like)
    on every rank, else ``None``.
    """
    rule = rule_for(loss_fn)
    weight = 1.0
    if rule.reduction == "mean" and batch is not None and bad_data is None:
        weight = float(rule.count(batch[1]))
    gradients = gradients or []
    if bad_data is not None:  # its NaN would reach every rank's gradient; the step is skipped anyway
        for g in gradients:
            g.zero_()
    elif weight != 1.0:
        for g in gradients:
            g.mul_(weight)
    facts = torch.zeros(2 + group.size, dtype=torch.float64)
    facts[0] = weight * (float(loss) if loss is not None else 0.0)
    facts[1] = weight
    facts[2 + group.rank] = _BAD_PARTS.index(bad_data)
    # One buffer in the gradients' dtype: counts and flags are exact in it (below 2²⁴ in float32).
    group.sum_([*gradients, facts])
    total_weight = float(facts[1])
    if rule.reduction == "mean":
        for g in gradients:
            g.div_(total_weight)
    bad = [(rank, int(code)) for rank, code in enumerate(facts[2:].tolist()) if code]
    if bad:
        rank, code = bad[0]
        return loss, f"the {_BAD_PARTS[code]} of rank {rank}'s batch"
    if loss is None:
        return None, None
    value = float(facts[0]) / total_weight if rule.reduction == "mean" else float(facts[0])
    return torch.tensor(value, dtype=loss.dtype, device=loss.device), None


def ddp_gradients(group: Group, loss_fn, params) -> None:
    """DDP's averaged gradients as the global gradient: × the number of ranks for a sum loss."""
    if rule_for(loss_fn).reduction == "sum":
        for p in params:
            if p.grad is not None:
                p.grad.mul_(group.size)


def gradients_to_share(model, params) -> list[Tensor] | None:
    """The ``p.grad`` tensors ``share_step`` averages (zeros where missing), or ``None`` under DDP."""
    if isinstance(model, DistributedDataParallel):
        return None
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def share_loss(group: Group, loss_fn, loss: Tensor, batch) -> Tensor:
    """The global minibatch loss of every rank's ``loss`` (``share_step`` without gradients)."""
    return share_step(group, loss_fn, loss, batch, None, None)[0]


SKIPPABLE = 1  # this rank would skip the step (non-finite curvature, direction, update)
FATAL = 2  # this rank raises


def agree_on_outcome(group: Group, error: BaseException | None, skippable: tuple) -> BaseException | None:
    """Every rank's outcome of a step, agreed: ``None`` to go on, or the error to skip or raise on.

    One 1-number all-reduce. If any rank raised an error that is not ``skippable``,
    every rank raises (its own error, or ``RankFailure``); else if any rank would
    skip, every rank skips (with its own reason, or "rank r skipped").
    """
    code = 0 if error is None else (SKIPPABLE if isinstance(error, skippable) else FATAL)
    outcome = torch.zeros(group.size, dtype=torch.float64)
    outcome[group.rank] = code
    group.sum_([outcome])
    codes = outcome.tolist()
    worst = max(codes)
    if worst == 0:
        return None
    ranks = ", ".join(str(rank) for rank, c in enumerate(codes) if c == worst)
    if worst == FATAL:
        if error is not None and code == FATAL:
            raise error
        raise RankFailure(f"rank {ranks} of the process group raised in this optimizer step; this rank stops")
    if error is not None:
        return error
    return NonFiniteError(f"rank {ranks} of the process group could not take this step")


def owners(costs: list[float], size: int) -> list[int]:
    """The rank that inverts each block: longest first, each to the least loaded rank (deterministic)."""
    load = [(0.0, rank) for rank in range(size)]
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        busy, rank = heapq.heappop(load)
        owner[index] = rank
        heapq.heappush(load, (busy + costs[index], rank))
    return owner


def inversion_cost(block) -> float:
    """Flops of inverting one block, up to a constant.

    d_G³ + d_A³ for a Kronecker block (two eigendecompositions), d³ for a dense
    one, the number of entries for a diagonal or an eigenbasis block (EKFAC).
    """
    tensors = curvature_state.block_tensors(block)
    if "D" in tensors or "diagonal" in tensors:
        return float(next(t for name, t in tensors.items() if name in ("D", "diagonal")).numel())
    return float(sum(t.shape[0] ** 3 for t in tensors.values()))


def spread_inverse(group: Group, C: BlockDiagonalOperator, invert, failures: tuple) -> BlockDiagonalOperator:
    """``invert(C)`` with each block inverted on one rank (``owners``) and gathered on all.

    ``invert`` maps a block-diagonal operator to its damped inverse (the optimizer's
    ``make_inverse``); it is called on a one-block operator per owned block. A
    failure on any rank (one of ``failures``) is raised on every rank, so the
    optimizer's retry with more damping stays in step (``ValueError``; any other
    error is raised by its rank, ``RankFailure`` by the others). The gathered blocks
    travel pickled through the CPU (``all_gather_object``).
    """
    costs = [inversion_cost(block) for block in C.block_operators]
    owner = owners(costs, group.size)
    mine, failure = {}, None
    for index, (indices, block) in enumerate(zip(C.block_indices, C.block_operators)):
        if owner[index] != group.rank:
            continue
        names = [C.param_names[i] for i in indices] if C.param_names else None
        one = BlockDiagonalOperator(
            [(range(len(indices)), block)], [C.param_shapes[i] for i in indices], C.dtype, C.device, names
        )
        try:
            (entry,) = curvature_state.snapshot(invert(one))["blocks"]
        except Exception as error:  # every rank must reach the gather below, whatever happened
            failure = error
            break
        mine[index] = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in entry.items()}
    report = None
    if failure is not None:
        report = (f"{type(failure).__name__}: {failure}", isinstance(failure, failures))
    everyone = group.gather((mine, report))
    failed = [(rank, report) for rank, (_, report) in enumerate(everyone) if report is not None]
    if failed:
        rank, (message, retriable) = failed[0]
        if not all(retriable for _, (_, retriable) in failed):
            if failure is not None and not isinstance(failure, failures):
                raise failure
            raise RankFailure(f"rank {rank} failed while inverting its curvature blocks ({message})")
        raise ValueError(f"rank {rank} could not invert its share of the curvature blocks ({message})")
    gathered = {index: entry for blocks, _ in everyone for index, entry in blocks.items()}
    blocks = []
    for index, indices in enumerate(C.block_indices):
        entry = dict(gathered[index])
        entry["indices"] = list(indices)
        blocks.append(entry)
    return curvature_state.restore(
        {"type": "BlockDiagonal", "blocks": blocks}, C.param_shapes, C.param_names, C.dtype, C.device
    )
