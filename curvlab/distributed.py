"""Curvature over data spread across processes (``torch.distributed``), one global matrix on every rank.

When ``torch.distributed`` is initialised with more than one process, a ``Problem``
treats each process' data as its shard of one global data set
(``process_group="auto"``): the risk, its gradient and every curvature object are
those of the union of the shards, with the global reduction factor. Each product
sums the ranks' contributions with one all-reduce (per product, or per chunk of
columns); the approximations all-reduce their factor sums once per build. The
engine is ``torch.distributed`` itself: gloo on CPUs, NCCL on GPUs, processes
started by ``torchrun``.

Collectives never hang on a failure of one rank: every all-reduce of a product
carries one flag per rank, so a rank whose shard raises (NaN in its data, say)
still takes part, and every rank then raises, naming the failed ranks. Decisions
of the iterative algorithms (Lanczos convergence, CG stopping) are taken on rank 0
and broadcast, so the ranks never take different branches; their results are
broadcast from rank 0 too, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.errors import CurvlabError, DataError, UnsupportedError


class RankFailure(CurvlabError):
    """Another rank of the process group failed in the same collective step."""


class Group:
    """The processes a problem's data is spread over: one ``torch.distributed`` process group.

    Attributes:
        group: The process group.
        rank: This process' rank in it.
        size: Its number of processes.
        backend: ``"gloo"`` or ``"nccl"``.
    """

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def __repr__(self) -> str:
        return f"Group(rank {self.rank} of {self.size}, {self.backend})"

    def _device(self, like: Tensor | None = None) -> torch.device:
        """Where collective buffers live: NCCL needs the current CUDA device, gloo the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu") if like is None or like.device.type != "cpu" else like.device

    def sum_(self, tensors: list[Tensor], error: BaseException | None = None) -> list[Tensor]:
        """Sum ``tensors`` over the ranks in place, in one all-reduce, with every rank's failure flag.

        A rank that failed passes its ``error`` (and tensors of the right shapes, any
        values): it raises ``error`` after the collective; every other rank raises
        ``RankFailure`` naming the failed ranks. Returns ``tensors``.
        """
        reference = tensors[0] if tensors else None
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float64
        device = self._device(reference)
        flags = torch.zeros(self.size, dtype=dtype, device=device)
        if error is not None:
            flags[self.rank] = 1
        pieces = [t.detach().reshape(-1).to(device, dtype) for t in tensors]
        flat = torch.cat([*pieces, flags])
        dist.all_reduce(flat, group=self.group)
        failed = [rank for rank, flag in enumerate(flat[-self.size :].tolist()) if flag]
        if error is not None:
            raise error
        if failed:
            raise RankFailure(
                f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of the process group "
                "failed in this step (their own error says why); this rank stops too"
            )
        offset = 0
        for t in tensors:
            count = t.numel()
            t.copy_(flat[offset : offset + count].reshape(t.shape))
            offset += count
        return tensors

    def sum_symmetric_(self, matrices: list[Tensor], error: BaseException | None = None) -> list[Tensor]:
        """``sum_`` of symmetric square matrices, sending their upper triangles only (half the bytes).

        Each rank's triangle is summed and mirrored, so every rank gets the same exactly
        symmetric sum. Failures as in ``sum_``. Returns ``matrices``.
        """
        rows_columns = [torch.triu_indices(m.shape[0], m.shape[0], device=m.device) for m in matrices]
        triangles = [m[rows, columns] for m, (rows, columns) in zip(matrices, rows_columns)]
        self.sum_(triangles, error)
        for m, (rows, columns), triangle in zip(matrices, rows_columns, triangles):
            m[rows, columns] = triangle
            m[columns, rows] = triangle
        return matrices

    def max_(self, tensor: Tensor) -> Tensor:
        """The elementwise maximum over the ranks, in place."""
        buffer = tensor.to(self._device(tensor))
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group)
        tensor.copy_(buffer)
        return tensor

    def broadcast_(self, tensor: Tensor, source: int = 0) -> Tensor:
        """``tensor`` of rank ``source`` on every rank, in place."""
        buffer = tensor.to(self._device(tensor)).contiguous()
        dist.broadcast(buffer, src=dist.get_global_rank(self.group, source), group=self.group)
        tensor.copy_(buffer)
        return tensor

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: one decision for all (no rank takes another branch)."""
        decision = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.broadcast_(decision)[0])

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values


def resolve(process_group) -> Group | None:
    """The ``Group`` a problem's data is spread over, or ``None`` for this process' data alone.

    ``"auto"``: the default group when ``torch.distributed`` is initialised with more
    than one process, else ``None``. ``None``: this process' data alone. A process
    group: that group (``None`` if it has one process).
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be 'auto', None or a process group, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    group = Group(process_group)
    return group if group.size > 1 else None


def unwrap(model):
    """The module a data-parallel wrapper holds (curvature runs on it; DDP's hooks must not fire).

    ``DistributedDataParallel`` is unwrapped; ``FullyShardedDataParallel`` is refused
    (its parameters are sharded across ranks: a curvature object needs them whole).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module
    _check_unsharded(model)
    return model


def _check_unsharded(model, fsdp_classes: tuple | None = None) -> None:
    """``UnsupportedError`` for a fully sharded model (``fsdp_classes``: torch's, by default)."""
    classes = _fsdp_classes() if fsdp_classes is None else fsdp_classes
    if classes and isinstance(model, classes):
        raise UnsupportedError(
            "a FullyShardedDataParallel model shards its parameters across ranks; curvlab needs them "
            "whole on every rank: pass the unsharded module (or a DistributedDataParallel one)"
        )


def _fsdp_classes() -> tuple:
    """The fully sharded wrappers of torch (FSDP, and FSDP2's ``fully_shard`` modules) where available."""
    classes = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule

        classes.append(FSDPModule)
    except ImportError:  # a torch without distributed support, or without FSDP2
        pass
    return tuple(classes)


def check_same(group: Group, what: str, value) -> None:
    """``DataError`` on every rank unless every rank has the same ``value`` (shapes, dtypes, options)."""
    values = group.gather(value)
    different = [rank for rank, other in enumerate(values) if other != values[0]]
    if different:
        raise DataError(
            f"the ranks of the process group disagree on {what}: rank 0 has {values[0]}, rank "
            f"{different[0]} has {values[different[0]]}; every rank must hold the same model"
        )


# ---------------------------------------------------------------- scripts under torchrun
def is_writer() -> bool:
    """Whether this process writes files: always, except on ranks other than 0 under ``torch.distributed``."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def describe() -> dict:
    """World size and backend of the running ``torch.distributed`` job (``{"world_size": 1}`` if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1}
    return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}


def shard(items: list, process_group="auto") -> list:
    """This rank's contiguous share of ``items`` (rank 0 the first ones), as even as can be.

    Contiguous shares keep the global order of batches: Monte-Carlo labels, drawn
    by global batch index, are the same as in one process over ``items``.
    """
    group = resolve(process_group)
    if group is None:
        return list(items)
    base, extra = divmod(len(items), group.size)
    start = group.rank * base + min(group.rank, extra)
    return list(items[start : start + base + (group.rank < extra)])


@contextlib.contextmanager
def launched(device: str = "cpu"):
    """The process group of a ``torchrun`` launch (the environment's ``WORLD_SIZE`` > 1), or nothing.

    Initialises ``torch.distributed`` from the environment (NCCL for a CUDA
    ``device``, each rank on GPU ``LOCAL_RANK``; gloo otherwise) unless it already
    is, yields the device this rank computes on, and tears the group down after.
    """
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        dist.barrier()  # every rank done before any tears its connections down
    finally:
        dist.destroy_process_group()
