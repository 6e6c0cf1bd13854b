r"""One optimizer = a curvature estimate + a damping policy + an update rule.

``CurvatureOptimizer`` is a ``torch.optim.Optimizer``. Every ``curvature_every``
steps it builds its curvature estimate on the current minibatch with the very
classes of the diagnostics (``cl.KFAC``, ``cl.ACP``, ``cl.GGN``, …; averaged with
the previous estimate when ``ema_decay > 0``), every ``inverse_every`` steps it
refreshes the damped inverse, and each step it applies

    d = (C + λI)⁻¹ (g + weight_decay · θ),   m ← momentum · m + d,   θ ← θ − lr · m.

Damping λ is constant or adapted by Levenberg–Marquardt from the ratio ρ of the
actual to the predicted decrease of the loss (Martens 2010, §4.1): λ ← λ·ω if
ρ > 3/4, λ ← λ/ω if ρ < 1/4 (ω = 2/3; one extra loss evaluation, and one
curvature product, per adapted step).

Safety: a step whose loss, gradient, curvature or update is not finite is
skipped with a warning and the damping raised tenfold, so parameters are never
left NaN; a non-finite loss at the start of a step also undoes the previous
update (a finite update can still blow the loss up), as does Levenberg–Marquardt
when the step it just took makes the loss non-finite; more than 10 skipped steps
in a row are an error; a failed inverse (a factorisation that fails, an indefinite damped
matrix) is retried in float64 with more damping before a clear error.
Everything needed to continue bit-identically — momentum buffers, step count,
damping, the curvature (snapshot) and the damping its inverse was built with —
is in ``state_dict()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.errors import CurvlabError, NotPositiveDefiniteError
from curvlab.operators.base import CurvatureOperator
from curvlab.optim import state as curvature_state
from curvlab.problem import Problem

DAMPING_POLICIES = ("constant", "levenberg-marquardt")
MAX_SKIPPED_IN_ROW = 10  # then a clear error instead of raising the damping forever
_INVERSE_FAILURES = (torch.linalg.LinAlgError, NotPositiveDefiniteError, ValueError, RuntimeError)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite.

    One sum per tensor (any NaN/Inf entry makes the sum non-finite); the elementwise
    check runs only where a sum is not finite (finite entries whose sum overflows).
    """
    for t in tensors:
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: preconditioned steps with a curvature object of the library.

    Args:
        model: The model (its forward is used to build curvature on a batch).
        loss_fn: Its loss (``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``).
        params: Parameters or parameter groups (default ``model.parameters()``);
            groups may set ``lr``, ``momentum`` and ``weight_decay``.
        lr: Learning rate.
        momentum: Momentum on the preconditioned direction.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        damping: Initial Tikhonov damping λ.
        damping_policy: ``"constant"`` or ``"levenberg-marquardt"``.
        curvature_every: Steps between curvature estimates (amortisation).
        inverse_every: Steps between inverses (default ``curvature_every``).
        ema_decay: Running-average weight of the previous curvature (0: none).
        min_damping: Lower bound for the adapted damping.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params=None,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        damping_policy: str = "constant",
        curvature_every: int = 1,
        inverse_every: int | None = None,
        ema_decay: float = 0.0,
        min_damping: float = 1e-8,
    ):
        if lr <= 0 or momentum < 0 or weight_decay < 0 or damping < 0:
            raise ValueError("lr must be > 0; momentum, weight_decay and damping ≥ 0")
        if damping_policy not in DAMPING_POLICIES:
            raise ValueError(f"damping_policy must be one of {DAMPING_POLICIES}, got {damping_policy!r}")
        if curvature_every < 1 or (inverse_every is not None and inverse_every < 1):
            raise ValueError("curvature_every and inverse_every must be ≥ 1")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.damping = float(damping)
        self.damping_policy = damping_policy
        self.curvature_every = int(curvature_every)
        self.inverse_every = int(inverse_every or curvature_every)
        self.ema_decay = float(ema_decay)
        self.min_damping = float(min_damping)
        self.steps = 0
        self.curvature: CurvatureOperator | None = None
        self._inverse = None
        self._inverse_damping: float | None = None
        self._curvature_source: tuple | None = None  # (step, batch) the curvature was built from
        self.counts = {"curvature": 0, "inverse": 0, "skipped": 0}
        self._skipped_in_row = 0

    # ------------------------------------------------------------ subclass hooks
    def build_curvature(self, problem: Problem) -> CurvatureOperator:
        """The curvature estimate on one minibatch problem."""
        raise NotImplementedError

    def direction(self, gradient: list[Tensor]) -> list[Tensor]:
        """(C + λI)⁻¹ g with the cached inverse; g and the result are parameter-shaped lists."""
        return self._inverse @ gradient

    def make_inverse(self, C: CurvatureOperator, damping: float):
        """The damped inverse of ``C`` (an operator); exact operators override ``direction``."""
        return C.inverse(damping)

    # ------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _problem(self, batch) -> Problem:
        if batch is None:
            raise ValueError(
                f"{type(self).__name__} builds curvature from the minibatch: call step(closure, batch=(X, y))"
            )
        return Problem(self.model, self.loss_fn, tuple(batch), params=self._params())

    def _refresh_inverse(self, damping: float) -> None:
        """Damped inverse; on failure retry in float64 with 10× more damping (3 times)."""
        C, attempt_damping = self.curvature, damping
        last_error = None
        for attempt in range(4):
            try:
                inverse = self.make_inverse(C, attempt_damping)
            except _INVERSE_FAILURES as error:
                last_error = error
            else:
                if inverse is None or curvature_state.all_finite(inverse):
                    if inverse is not None and inverse.dtype != self.curvature.dtype:
                        inverse = curvature_state.restore(  # back to the parameters' dtype
                            curvature_state.snapshot(inverse),
                            inverse.param_shapes,
                            inverse.param_names,
                            self.curvature.dtype,
                            inverse.device,
                        )
                    self._inverse, self._inverse_damping = inverse, attempt_damping
                    self.counts["inverse"] += 1
                    if attempt:
                        self.damping = max(self.damping, attempt_damping)
                    return
                last_error = FloatingPointError("non-finite inverse")
            if attempt == 0 and C.dtype != torch.float64 and curvature_state.is_snapshotable(C):
                C = curvature_state.restore(
                    curvature_state.snapshot(C), C.param_shapes, C.param_names, torch.float64, C.device
                )
            attempt_damping = max(attempt_damping * 10, 1e-8)
        raise CurvlabError(
            f"{type(self).__name__}: the damped curvature could not be inverted even in float64 with "
            f"damping {attempt_damping / 10:.1e}: {last_error}"
        )

    def _skip(self, reason: str) -> None:
        self.counts["skipped"] += 1
        self._skipped_in_row += 1
        if self._skipped_in_row > MAX_SKIPPED_IN_ROW:
            raise CurvlabError(
                f"{type(self).__name__}: {self._skipped_in_row} steps in a row skipped, the last one "
                f"because {reason}; the damping is {self.damping:.1e}. Check the data and lower the "
                "learning rate or raise the initial damping."
            )
        self.damping = max(self.damping * 10, 1e-8)
        self._inverse = None  # rebuilt with the new damping
        warnings.warn(
            f"{type(self).__name__}: step skipped ({reason}); damping raised to {self.damping:.1e}",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, batch=None):
        """One update; returns the closure's loss (``None`` without a closure).

        ``closure`` re-evaluates the loss and its gradient (it must call
        ``backward``); ``batch = (X, y)`` is the minibatch curvature is built on.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        if loss is not None and not _all_finite([loss]):
            # The model (after the last update) or the batch is bad: undo the last update.
            undone = self._undo_last_update(params)
            self._skip(f"loss is {loss.item()}" + ("; the previous update was undone" if undone else ""))
            return loss
        gradient = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if not _all_finite(gradient):
            self._skip("the gradient is not finite")
            return loss
        decays = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        if any(decays):
            gradient = [g + decay * p if decay else g for g, p, decay in zip(gradient, params, decays)]
        if self.steps % self.curvature_every == 0:
            with torch.enable_grad():
                fresh = self.build_curvature(self._problem(batch))
            self._curvature_source = (self.steps, tuple(t.detach() for t in batch))
            self.counts["curvature"] += 1
            if not curvature_state.all_finite(fresh):
                self._skip("the curvature is not finite")
                self.steps += 1
                return loss
            self.curvature = curvature_state.running_average(self.curvature, fresh, self.ema_decay)
            self._inverse = None
        if self._inverse is None or self.steps % self.inverse_every == 0:
            self._refresh_inverse(self.damping)
        with torch.enable_grad():
            direction = self.direction(gradient)
        if not _all_finite(direction):
            self._skip("the preconditioned direction is not finite")
            self.steps += 1
            return loss
        updates = []
        for group in self.param_groups:
            for p in group["params"]:
                d = direction[len(updates)].reshape_as(p)
                state = self.state[p]
                if group["momentum"] > 0:
                    buffer = state.get("momentum_buffer")
                    buffer = d.clone() if buffer is None else buffer.mul_(group["momentum"]).add_(d)
                    state["momentum_buffer"] = buffer
                    d = buffer
                updates.append(d * -group["lr"])
        if not _all_finite(updates):
            self._skip("the update is not finite")
            self.steps += 1
            return loss
        for p, u in zip(params, updates):
            # Kept for an exact undo (θ + u − u need not be θ); the buffer is reused.
            previous = self.state[p].get("previous_value")
            if previous is None:
                self.state[p]["previous_value"] = p.detach().clone()
            else:
                previous.copy_(p)
            p.add_(u)
        self._skipped_in_row = 0
        if self.damping_policy == "levenberg-marquardt" and closure is not None and loss is not None:
            self._adapt_damping(closure, loss, gradient, updates)
        self.steps += 1
        return loss

    def _undo_last_update(self, params: list[Tensor]) -> bool:
        """θ back to its value before the last update, momentum cleared; whether there was one."""
        undone = False
        for p in params:
            state = self.state[p]
            if "previous_value" in state:
                p.copy_(state.pop("previous_value"))
                state.pop("momentum_buffer", None)
                undone = True
        return undone

    def _adapt_damping(self, closure, loss: Tensor, gradient: list[Tensor], step: list[Tensor]) -> None:
        """Levenberg–Marquardt: ρ = (L(θ + s) − L(θ)) / (gᵀs + ½ sᵀCs)."""
        with torch.enable_grad():
            new_loss = closure()
        if not _all_finite([new_loss]):  # the step made the loss non-finite: take it back
            self._undo_last_update(self._params())
            self.damping = self.damping * 10
            self._inverse = None
            self.last_rho = -math.inf
            return
        g, s = _flat(gradient), _flat(step)
        curvature_product = self.curvature @ s if self.curvature is not None else torch.zeros_like(s)
        predicted = (g @ s + 0.5 * s @ curvature_product).item()
        actual = (new_loss - loss).item()
        rho = actual / predicted if predicted < 0 else -math.inf
        if rho > 0.75:
            self.damping = max(self.damping * (2 / 3), self.min_damping)
        elif rho < 0.25:
            self.damping = self.damping * 1.5
        self.last_rho = rho

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``torch.optim`` state plus step count, damping and the curvature snapshot."""
        state = super().state_dict()
        extra = {
            "steps": self.steps,
            "damping": self.damping,
            "inverse_damping": self._inverse_damping,
            "counts": dict(self.counts),
            "skipped_in_row": self._skipped_in_row,
            "curvature": None,
        }
        if self.curvature is not None and curvature_state.is_snapshotable(self.curvature):
            extra["curvature"] = curvature_state.snapshot(self.curvature)
        elif self.curvature is not None:  # a matrix-free operator: keep what rebuilds it
            step, batch = self._curvature_source
            extra["curvature_source"] = {"step": step, "batch": list(batch)}
        state["curvlab"] = extra
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore everything ``state_dict`` saved; the inverse is rebuilt identically."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.steps, self.damping, self.counts = extra["steps"], extra["damping"], dict(extra["counts"])
        self._skipped_in_row = extra.get("skipped_in_row", 0)
        params = self._params()
        self.curvature, self._inverse = None, None
        if extra["curvature"] is not None:
            shapes = [p.shape for p in params]
            names = Problem._names_of(self.model, params)
            self.curvature = curvature_state.restore(
                extra["curvature"], shapes, names, params[0].dtype, params[0].device
            )
        elif extra.get("curvature_source") is not None:
            source = extra["curvature_source"]
            steps, self.steps = self.steps, source["step"]  # the MC seed of that step
            with torch.enable_grad():
                self.curvature = self.build_curvature(self._problem(source["batch"]))
            self.steps = steps
            self._curvature_source = (source["step"], tuple(source["batch"]))
        if self.curvature is not None and extra["inverse_damping"] is not None:
            self._refresh_inverse(extra["inverse_damping"])
            self.counts = dict(extra["counts"])
