"""Torch settings that curvature passes need, in one place, for the duration of a pass.

Curvature takes forward-mode derivatives (GGN, Fisher, EF products) and second
derivatives (the Hessian) of the user's model. A few of torch's fast kernels have
neither, or a wrong one, so while any curvature pass runs:

* **Attention** runs its math path: the fused kernels of
  ``F.scaled_dot_product_attention`` (flash, memory-efficient, cuDNN) have no
  forward-mode derivative and no double backward, and neither has the eval-mode
  fast path of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``.
* **cuDNN is off for recurrent models** (``nn.RNN``/``LSTM``/``GRU``): its RNN
  kernels have no backward in eval mode and no double backward.
* **Weight normalization** (``nn.utils.parametrizations.weight_norm`` and the
  older ``nn.utils.weight_norm``) is computed from its parts, g · v / ‖v‖, as torch
  itself does where its fused kernel does not apply: the fused kernel has no
  forward-mode derivative, and its double backward gives wrong second derivatives
  (tested against finite differences in ``tests/test_fused_kernels.py``).

These are process-wide switches of torch. ``curvature_pass()`` applies them when
the first pass starts and restores the user's settings when the last one ends,
under a lock: passes in several threads at once share one application, and none
restores settings another still needs. While a pass runs, other code in the
process sees the same switches (attention without its fused kernels, say).
Threads may compute curvature at once on different models; one model object must
not be shared by two threads computing at once (``torch.func.functional_call``
puts the problem's parameters into the model for the length of a forward pass).

**Forward-mode AD** keeps its dual level in process-wide state too: ``torch.func.jvp``
in two threads at once raises ("no level exists") or, silently, gives wrong
tangents (an empirical Fisher of zeros, seen here). curvlab's forward-mode
products hold ``FORWARD_MODE`` for their length, so curvlab's own passes in
several threads are serialized there (reverse mode needs no lock). Forward-mode
AD that other code runs in another thread at the same time is not covered.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch
from torch import Tensor

_lock = threading.Lock()
_passes = 0  # curvature passes running now
_recurrent = 0  # of them, passes of models with recurrent modules
_saved: dict = {}  # the user's settings, while a pass runs
_saved_cudnn: bool | None = None  # the user's cuDNN switch, while a recurrent pass runs

FORWARD_MODE = threading.RLock()  # held by every forward-mode (torch.func.jvp) product of curvlab

_SDP_SWITCHES = ("flash", "mem_efficient", "cudnn", "math")  # attention kernels: all but math off


def _weight_norm_from_parts(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """The weight g · v / ‖v‖ (norm over all dims but ``dim``), as torch computes it unfused."""
    if dim == -1:  # one norm for the whole tensor (weight_norm(dim=None))
        return v * (g / torch.linalg.vector_norm(v))
    others = [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=others, keepdim=True))


def _sdp_switch(name: str):
    """``(getter, setter)`` of torch's switch for one attention kernel, or ``None`` if absent."""
    getter = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
    setter = getattr(torch.backends.cuda, f"enable_{name}_sdp", None)
    return None if getter is None or setter is None else (getter, setter)


def _weight_norm_owners() -> list:
    """Where ``_weight_norm`` is looked up: torch, and the old ``nn.utils.weight_norm`` module if loaded."""
    owners = [torch]
    old_module = sys.modules.get("torch.nn.utils.weight_norm")
    if old_module is not None and hasattr(old_module, "_weight_norm"):
        owners.append(old_module)
    return owners


def _apply() -> None:
    """Save the user's settings and switch to those of curvature passes (the first pass starts)."""
    _saved["fast_path"] = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    for name in _SDP_SWITCHES:
        switch = _sdp_switch(name)
        if switch is not None:
            _saved[name] = switch[0]()
            switch[1](name == "math")  # the math path on, every fused kernel off
    _saved["weight_norm"] = [(owner, owner._weight_norm) for owner in _weight_norm_owners()]
    for owner, _ in _saved["weight_norm"]:
        owner._weight_norm = _weight_norm_from_parts


def _restore() -> None:
    """Put the user's settings back (the last pass ended)."""
    torch.backends.mha.set_fastpath_enabled(_saved.pop("fast_path"))
    for name in _SDP_SWITCHES:
        if name in _saved:
            _sdp_switch(name)[1](_saved.pop(name))
    for owner, original in _saved.pop("weight_norm"):
        owner._weight_norm = original


@contextlib.contextmanager
def curvature_pass(recurrent: bool = False):
    """Torch switched for curvature (module docstring) for the block; restored after the last pass.

    Args:
        recurrent: The model has recurrent modules: cuDNN is switched off too.
    """
    global _passes, _recurrent, _saved_cudnn
    with _lock:
        if _passes == 0:
            _apply()
        _passes += 1
        if recurrent:
            if _recurrent == 0:
                _saved_cudnn = torch.backends.cudnn.enabled
                torch.backends.cudnn.enabled = False
            _recurrent += 1
    try:
        yield
    finally:
        with _lock:
            if recurrent:
                _recurrent -= 1
                if _recurrent == 0:
                    torch.backends.cudnn.enabled = _saved_cudnn
            _passes -= 1
            if _passes == 0:
                _restore()
