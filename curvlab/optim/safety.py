"""The safety part of an optimizer: non-finite checks, skipped steps, the exact undo, inverse retries.

Bad data (a batch with NaN or Inf) skips the step and changes nothing. Bad weights (a
non-finite loss, gradient, curvature, direction or update on finite data) skip the
step and raise the damping tenfold; a non-finite loss at the start of a step also
restores the parameters from before the previous update. More than
``MAX_SKIPPED_IN_ROW`` skips in a row are an error. A damped inverse that fails is
retried in float64 with more damping before a clear error.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvlab.errors import CurvlabError, NotPositiveDefiniteError
from curvlab.optim import state as curvature_state

MAX_SKIPPED_IN_ROW = 10  # then a clear error instead of raising the damping forever
INVERSE_FAILURES = (torch.linalg.LinAlgError, NotPositiveDefiniteError, ValueError, RuntimeError)


class SkipStep(Exception):
    """A step cannot be taken; the message says why (the step is skipped, not an error)."""


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite.

    One sum per tensor (any NaN/Inf entry makes the sum non-finite); the elementwise
    check runs only where a sum is not finite (finite entries whose sum overflows).
    """
    for t in tensors:
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


def non_finite_part(batch) -> str | None:
    """``"inputs"`` or ``"targets"`` if that part of ``batch = (X, y)`` has NaN or Inf; else ``None``."""
    if batch is None:
        return None
    for what, t in zip(("inputs", "targets"), batch):
        if isinstance(t, Tensor) and t.is_floating_point() and not all_finite([t.detach()]):
            return what
    return None


class Safety:
    """Skipped steps and the exact undo of the last update, for one optimizer.

    Args:
        owner: The optimizer's name, for warnings and errors.
        max_in_row: Skips in a row before a ``CurvlabError``.
    """

    def __init__(self, owner: str, max_in_row: int = MAX_SKIPPED_IN_ROW):
        self.owner = owner
        self.max_in_row = max_in_row
        self.skipped_in_row = 0
        self.skipped = 0

    def skip(self, reason: str, damping, bad_weights: bool = True) -> None:
        """Count a skipped step and warn; raise the damping where the weights are at fault.

        ``damping``: the optimizer's damping policy (``curvlab.optim.damping``).
        """
        self.skipped += 1
        self.skipped_in_row += 1
        if self.skipped_in_row > self.max_in_row:
            raise CurvlabError(
                f"{self.owner}: {self.skipped_in_row} steps in a row skipped, the last one "
                f"because {reason}; the damping is {damping.value:.1e}. Check the data and lower the "
                "learning rate or raise the initial damping."
            )
        outcome = "the model is unchanged"
        if bad_weights:
            damping.increase()
            outcome = f"damping raised to {damping.value:.1e}"
        warnings.warn(f"{self.owner}: step skipped ({reason}); {outcome}", RuntimeWarning, stacklevel=4)

    def succeeded(self) -> None:
        """A step was taken: the count of skips in a row starts again."""
        self.skipped_in_row = 0

    @staticmethod
    def keep(params: list[Tensor], state: dict) -> None:
        """Copy each parameter into ``state[p]["previous_value"]`` (reused) before an update.

        The copy makes ``undo`` exact (θ + u − u need not be θ; an overflowing u loses θ).
        """
        for p in params:
            previous = state[p].get("previous_value")
            if previous is None:
                state[p]["previous_value"] = p.detach().clone()
            else:
                previous.copy_(p)

    @staticmethod
    def undo(params: list[Tensor], state: dict) -> bool:
        """θ back to its value before the last update, momentum cleared; whether there was one."""
        undone = False
        for p in params:
            entry = state[p]
            if "previous_value" in entry:
                p.copy_(entry.pop("previous_value"))
                entry.pop("momentum_buffer", None)
                entry.pop("last_update", None)
                undone = True
        return undone

    def robust_inverse(self, make, C, damping: float):
        """``(make(C, λ'), λ')``: the damped inverse, retried in float64 with 10× more damping (3 times).

        ``make(C, λ)`` returns an operator (or ``None`` for a matrix-free solve). An
        inverse computed in float64 is returned in ``C``'s dtype.
        """
        built_from, attempt_damping, last_error = C, damping, None
        for attempt in range(4):
            try:
                inverse = make(C, attempt_damping)
            except INVERSE_FAILURES as error:
                last_error = error
            else:
                if inverse is None or curvature_state.all_finite(inverse):
                    if inverse is not None and inverse.dtype != built_from.dtype:
                        inverse = curvature_state.restore(  # back to the parameters' dtype
                            curvature_state.snapshot(inverse),
                            inverse.param_shapes,
                            inverse.param_names,
                            built_from.dtype,
                            inverse.device,
                        )
                    return inverse, attempt_damping
                last_error = FloatingPointError("non-finite inverse")
            if attempt == 0 and C.dtype != torch.float64 and curvature_state.is_snapshotable(C):
                C = curvature_state.restore(
                    curvature_state.snapshot(C), C.param_shapes, C.param_names, torch.float64, C.device
                )
            attempt_damping = max(attempt_damping * 10, 1e-8)
        raise CurvlabError(
            f"{self.owner}: the damped curvature could not be inverted even in float64 with "
            f"damping {attempt_damping / 10:.1e}: {last_error}"
        )

    def state_dict(self) -> dict:
        """The skip counts."""
        return {"skipped_in_row": self.skipped_in_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
        self.skipped_in_row, self.skipped = int(state["skipped_in_row"]), int(state["skipped"])
