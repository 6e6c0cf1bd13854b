"""When an optimizer's work is due: Martens & Grosse's T₁ (statistics), T₂ (damping), T₃ (inverses)."""

from __future__ import annotations

from curvlab.options import check_count


class Schedule:
    """Due at step 0 and every ``every``-th step after it.

    Args:
        every: Steps between two firings (a positive integer).
        name: The option's name, for the error on a bad ``every``.
    """

    def __init__(self, every: int = 1, name: str = "every"):
        self.every = int(check_count(name, every))

    def due(self, step: int) -> bool:
        """Whether the work is due at ``step`` (0-based)."""
        return step % self.every == 0

    def state_dict(self) -> dict:
        """``{"every": …}``."""
        return {"every": self.every}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s ``every``."""
        self.every = int(state["every"])

    def __repr__(self) -> str:
        return f"Schedule(every={self.every})"
