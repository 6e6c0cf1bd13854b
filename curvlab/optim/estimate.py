"""The curvature estimate of an optimizer: which object, refreshed when, averaged how, and its inverse.

Statistics are refreshed on one schedule (T₁), the damped inverse on another (T₃): a
curvature refreshed between two inverses is used from the next inverse on, as in
K-FAC. With ``ema_decay > 0`` the estimate is the running average
decay · old + (1 − decay) · new, factor by factor (a KFAC's average is a ``cl.KFAC``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from curvlab.operators.base import CurvatureOperator
from curvlab.optim import state as curvature_state
from curvlab.optim.safety import Safety, SkipStep
from curvlab.optim.schedule import Schedule


class CurvatureEstimate:
    """One curvature object, its refresh schedules and running average, and its damped inverse.

    The optimizer passes what builds and inverts its curvature with each call (``build(problem,
    step)`` → the curvature on one minibatch; ``make_inverse(C, λ)`` → (C + λI)⁻¹ as an
    operator, or ``None`` for a matrix-free solve per step): the estimate holds no reference
    to the optimizer, so an optimizer is freed as soon as it is dropped.

    Args:
        statistics: When the curvature is refreshed (T₁).
        inverses: When the inverse is refreshed (T₃); also whenever there is none.
        ema_decay: Running-average weight of the previous estimate (0: none).
    """

    def __init__(self, statistics: Schedule, inverses: Schedule, ema_decay: float):
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.statistics = statistics
        self.inverses = inverses
        self.ema_decay = float(ema_decay)
        self.curvature: CurvatureOperator | None = None
        self.inverse = None
        self.inverse_damping: float | None = None
        self.inverse_curvature: CurvatureOperator | None = None  # what the inverse was built from
        self.source: tuple | None = None  # (step, batch) the curvature was built from
        self.counts = {"curvature": 0, "inverse": 0}

    def refresh(
        self, step: int, build: Callable, problem_of: Callable, batch, fresh: CurvatureOperator | None = None
    ) -> None:
        """Refresh the curvature if due at ``step``: ``build(problem_of(batch), step)``.

        ``fresh``: the new estimate if the caller has it (from the training pass itself).
        Raises ``SkipStep`` where the new estimate is not finite (nothing is changed).
        """
        if not self.statistics.due(step):
            return
        if fresh is None:
            with torch.enable_grad():
                fresh = build(problem_of(batch), step)
        self.source = (step, tuple(t.detach() for t in batch))
        self.counts["curvature"] += 1
        if not curvature_state.all_finite(fresh):
            raise SkipStep("the curvature is not finite")
        self.curvature = curvature_state.running_average(self.curvature, fresh, self.ema_decay)

    def inverse_due(self, step: int) -> bool:
        """Whether the inverse is to be (re)built at ``step``."""
        return self.inverse is None or self.inverses.due(step)

    def refresh_inverse(
        self,
        make_inverse: Callable,
        damping: float,
        safety: Safety,
        curvature: CurvatureOperator | None = None,
    ):
        """Build the damped inverse of ``curvature`` (default: the current one); returns the damping used.

        A failure is retried in float64 with more damping (``Safety.robust_inverse``).
        """
        built_from = self.curvature if curvature is None else curvature
        self.inverse, self.inverse_damping = safety.robust_inverse(make_inverse, built_from, damping)
        self.inverse_curvature = built_from
        self.counts["inverse"] += 1
        return self.inverse_damping

    def drop_inverse(self) -> None:
        """Forget the inverse (rebuilt at the next step, e.g. with a raised damping)."""
        self.inverse = None

    def state_dict(self) -> dict:
        """The curvature as a snapshot of its factors (or the batch that rebuilds it), counts, schedules."""
        state = {
            "counts": dict(self.counts),
            "inverse_damping": self.inverse_damping,
            "statistics": self.statistics.state_dict(),
            "inverses": self.inverses.state_dict(),
            "curvature": None,
        }
        if self.curvature is not None and curvature_state.is_snapshotable(self.curvature):
            state["curvature"] = curvature_state.snapshot(self.curvature)
        elif self.curvature is not None:  # a matrix-free operator: keep what rebuilds it
            step, batch = self.source
            state["curvature_source"] = {"step": step, "batch": list(batch)}
        built_from = self.inverse_curvature
        if built_from is not None and built_from is not self.curvature and self.inverse is not None:
            # Curvature refreshed since the last inverse (inverses less often than statistics).
            state["inverse_curvature"] = curvature_state.snapshot(built_from)
        return state

    def load_state_dict(
        self, state: dict, build: Callable, make_inverse: Callable, problem_of: Callable, like, safety: Safety
    ) -> None:
        """Restore ``state_dict()``; the inverse is rebuilt identically.

        ``build(problem_of(batch), step)`` rebuilds a matrix-free curvature from its batch;
        ``like = (shapes, names, dtype, device)`` of the parameters.
        """
        shapes, names, dtype, device = like
        self.statistics.load_state_dict(state["statistics"])
        self.inverses.load_state_dict(state["inverses"])
        self.curvature, self.inverse = None, None
        if state["curvature"] is not None:
            self.curvature = curvature_state.restore(state["curvature"], shapes, names, dtype, device)
        elif state.get("curvature_source") is not None:
            source = state["curvature_source"]
            with torch.enable_grad():
                self.curvature = build(problem_of(source["batch"]), source["step"])
            self.source = (source["step"], tuple(source["batch"]))
        if self.curvature is not None and state["inverse_damping"] is not None:
            built_from = None
            if state.get("inverse_curvature") is not None:
                C = self.curvature
                built_from = curvature_state.restore(
                    state["inverse_curvature"], C.param_shapes, C.param_names, C.dtype, C.device
                )
            self.refresh_inverse(make_inverse, state["inverse_damping"], safety, built_from)
        self.counts = dict(state["counts"])
