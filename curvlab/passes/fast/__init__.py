"""Structure-exploiting passes ("fast paths"), chosen once when an operator or approximation is built.

A fast path recognises a model family and computes the same numbers as the
general routes with less work (``FastPath`` in ``base.py`` is the interface). The
exact operators take their forms, products and gradient from it, KFAC, EKFAC and
the exact diagonal their statistics; every model outside the families takes the
general routes (torch.func products, ``curvlab.passes.autograd``).

Families: ``mlp.PlainMLP`` (an ``nn.Sequential`` of ``nn.Linear`` and elementwise
activations on ``(N, d)`` inputs). Adding one means a module here, registered in
``FAST_PATHS``, and its tests against the general routes.
"""

from __future__ import annotations

import contextlib
import threading

from curvlab.passes.fast.base import FastPath
from curvlab.passes.fast.mlp import PlainMLP
from curvlab.problem import Problem

FAST_PATHS: list[type[FastPath]] = [PlainMLP]

_switch = threading.local()


def compile(problem: Problem) -> FastPath | None:  # noqa: A001 (the verb fits)
    """The first fast path whose family ``problem``'s model belongs to, or ``None``."""
    if getattr(_switch, "disabled", False):
        return None
    for fast_path in FAST_PATHS:
        compiled = fast_path.compile(problem)
        if compiled is not None:
            return compiled
    return None


@contextlib.contextmanager
def disabled():
    """Operators and approximations built inside take the general routes (to compare, or to debug)."""
    before = getattr(_switch, "disabled", False)
    _switch.disabled = True
    try:
        yield
    finally:
        _switch.disabled = before


__all__ = ["FAST_PATHS", "FastPath", "PlainMLP", "compile", "disabled"]
