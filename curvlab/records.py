"""How a result becomes a store record and back: one small protocol, and the kinds that use it.

A result type implements ``to_record(settings) -> RecordParts`` (its kind, its
data as nested dicts of arrays, numbers and text, and its settings merged with
the caller's) and ``from_record(record)`` (a classmethod rebuilding it), and is
registered for its kind with ``@recordable("kind")``. ``curvlab.storage`` writes
and validates records without knowing any result class; ``Record.result()``
reads one back through this registry.

Plain values need no class: a 1-d tensor is an ``eigenvalues`` record, a 2-d
tensor a ``dense_block``, a dataclass or dict of numbers ``scalars``, a dict
holding arrays ``arrays``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

# kind → the dims of its required datasets (validated on read)
REQUIRED = {
    "eigenvalues": {"values": 1},
    "top_eigen": {"values": 1, "residuals": 1},
    "spectral_density": {"grid": 1, "density": 1, "nodes": 2, "weights": 2},
    "trace": {"value": 0, "standard_error": 0},
    "scalars": {},
    "arrays": {},
    "dense_block": {"matrix": 2},
    "kfac_factors": {},
    "comparison": {},
}
KINDS = tuple(REQUIRED)

RESULT_TYPES: dict[str, type] = {}  # kind → the result class that reads it back


@dataclass
class RecordParts:
    """What a result stores: its kind, its data and its settings."""

    kind: str
    data: dict
    settings: dict = field(default_factory=dict)


@runtime_checkable
class Recordable(Protocol):
    """A result that knows its record (see the module docstring)."""

    def to_record(self, settings: dict) -> RecordParts:
        """Kind, data and settings (``settings``: the caller's, merged in; options like ``save_vectors``)."""
        ...


def recordable(kind: str):
    """Class decorator: the class writes and reads back records of ``kind``."""
    if kind not in REQUIRED:
        raise ValueError(f"unknown record kind {kind!r}; known: {KINDS}")

    def register(cls):
        RESULT_TYPES[kind] = cls
        return cls

    return register


def numpy(value) -> np.ndarray:
    """A tensor or array-like as a NumPy array (on the CPU)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def parts_of(result, settings: dict | None = None) -> RecordParts:
    """The ``RecordParts`` of any storable result.

    Raises:
        TypeError: for anything else (the store turns it into a ``StoreError``).
    """
    settings = dict(settings or {})
    if isinstance(result, Tensor) and result.dim() == 1:
        settings.setdefault("method", "exact")
        return RecordParts("eigenvalues", {"values": numpy(result)}, settings)
    if isinstance(result, Tensor) and result.dim() == 2:
        return RecordParts("dense_block", {"matrix": numpy(result)}, settings)
    if isinstance(result, Recordable):
        return result.to_record(settings)
    if isinstance(result, dict) and any(np.ndim(numpy(v)) > 0 for v in result.values()):
        return RecordParts("arrays", {str(key): numpy(value) for key, value in result.items()}, settings)
    if (dataclasses.is_dataclass(result) and not isinstance(result, type)) or isinstance(result, dict):
        values = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
        data = {}
        for key, value in values.items():
            if isinstance(value, str):
                settings[key] = value
            elif value is not None:
                data[key] = np.float64(float(value))
        return RecordParts("scalars", data, settings)
    raise TypeError(f"cannot store a {type(result).__name__}; see curvlab.records for the kinds")
