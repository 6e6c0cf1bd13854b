r"""Damping policies: the λ of (C + λI)⁻¹, constant or adapted by Levenberg–Marquardt.

Both raise λ when a step or an inverse fails (``increase``); Levenberg–Marquardt also
adapts it from the reduction ratio ρ = (L(θ + s) − L(θ)) / M(s) of the actual to the
model's predicted decrease (Martens 2010, §4.1): λ ← ωλ if ρ > 3/4, λ ← λ/ω if ρ < 1/4.
"""

from __future__ import annotations

import math

from curvlab.optim.schedule import Schedule
from curvlab.options import check_nonnegative

LOWEST_RAISED = 1e-8  # a failure raises a damping of 0 to this, then tenfold


class ConstantDamping:
    """λ as given; raised tenfold only where a step or an inverse fails.

    Args:
        value: The damping λ ≥ 0.
    """

    reject_uphill = False  # only Levenberg–Marquardt tests steps
    rejected = 0

    def __init__(self, value: float):
        self.value = float(check_nonnegative("damping", value))
        self.last_rho = math.nan

    def increase(self, factor: float = 10.0, at_least: float = LOWEST_RAISED) -> None:
        """λ ← max(factor · λ, at_least) (after a failed step or inverse)."""
        self.value = max(self.value * factor, at_least)

    def due(self, step: int) -> bool:
        """Whether ``adapt`` wants a reduction ratio at ``step`` (never for a constant λ)."""
        return False

    def adapt(self, rho: float) -> None:
        """Take the reduction ratio ρ of a step (a constant λ ignores it)."""
        self.last_rho = rho

    def state_dict(self) -> dict:
        """λ and the last ratio."""
        return {"value": self.value, "last_rho": self.last_rho}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
        self.value, self.last_rho = float(state["value"]), float(state.get("last_rho", math.nan))


class LevenbergMarquardt(ConstantDamping):
    """λ adapted from the reduction ratio every ``every`` steps (Martens 2010, §4.1).

    Args:
        value: The initial λ.
        factor: ω in (0, 1): λ ← ωλ when ρ > 3/4, λ/ω when ρ < 1/4.
        minimum: λ never goes below this by adaptation.
        every: Steps between adaptations (Martens & Grosse's T₂; each costs a loss evaluation).
        reject_uphill: Take back a step that raised the minibatch loss (the trust-region
            acceptance test with η = 0, Nocedal & Wright 2006, Alg. 4.1); only the steps
            with an adaptation are tested. ``rejected`` counts them.
    """

    def __init__(
        self,
        value: float,
        factor: float = 2 / 3,
        minimum: float = 1e-8,
        every: int = 1,
        reject_uphill: bool = False,
    ):
        super().__init__(value)
        if not isinstance(reject_uphill, bool):
            raise TypeError(f"reject_uphill must be True or False, got {reject_uphill!r}")
        self.reject_uphill = reject_uphill
        self.rejected = 0
        if not 0 < factor < 1:
            raise ValueError(f"damping_factor must be in (0, 1), got {factor}")
        self.factor = float(factor)
        self.minimum = float(check_nonnegative("min_damping", minimum))
        self.schedule = Schedule(every, "damping_every")

    def adapt(self, rho: float) -> None:  # noqa: D102
        if rho > 0.75:
            self.value = max(self.value * self.factor, self.minimum)
        elif rho < 0.25:
            self.value = self.value / self.factor
        self.last_rho = rho

    def state_dict(self) -> dict:  # noqa: D102
        return {**super().state_dict(), "schedule": self.schedule.state_dict(), "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        super().load_state_dict(state)
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        self.rejected = state.get("rejected", 0)

    def due(self, step: int) -> bool:  # noqa: D102
        return self.schedule.due(step)


def reduction_ratio(actual: float, predicted: float) -> float:
    """ρ = actual / predicted decrease; −∞ where the model predicts no decrease."""
    return actual / predicted if predicted < 0 else -math.inf
