r"""HDF5 store of curvature results: a versioned schema, atomic appends, validated reads.

Schema (version 2), readable with plain h5py::

    /                      attrs: format="curvlab", schema_version=2, created, curvlab_version
    /records/00000000      one group per record, numbered in write order
        attrs: kind, name, step (-1: none), created, curvature, method,
               settings (JSON), provenance (JSON)
        data/              the record's data, by kind (its own namespace: a data key
                           may be called "step" or "curvature"; "%", "/", NUL and a
                           leading "." in keys are percent-encoded):
          eigenvalues       values (n,)
          top_eigen         values (k,), residuals (k,), [vectors (n, k)]
          spectral_density  grid (g,), density (g,), nodes (p, m), weights (p, m)
          trace             value (), standard_error ()
          scalars           one 0-d dataset per named scalar
          arrays            one dataset per named array (e.g. an analysis' table)
          dense_block       matrix (n, n)
          kfac_factors      <layer>/A (a, a), <layer>/G (g, g) subgroups
          comparison        overall/ and blocks/000.../: scalar metrics as attrs,
                            list metrics as datasets; attrs approx, exact

Version 1 files (the data beside the record's attributes) are read as well; an
append to one rewrites it in version 2.

Every record carries provenance: curvature kind and options, method and its
settings, seed, dtype, device, parameter count, model, loss and reduction, data
set name and size, training step, curvlab/torch/h5py versions and the time.

Nothing is lost on a crash: an append copies the file, writes the new records
into the copy, flushes it to disk and atomically renames it over the original
(``os.replace``). A killed writer leaves the previous file untouched (and at
worst a stray hidden ``.<name>.<pid>.tmp`` file, removed by the next append).
Appends are serialised by a lock file (``fcntl`` on POSIX, ``msvcrt`` on
Windows), so several processes may append to one file.
Cost: one copy of the file per append; group a checkpoint's records with
``Store.transaction()`` to pay it once. Only arrays, numbers and JSON strings are
written: no pickle anywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from curvlab import distributed
from curvlab._version import __version__
from curvlab.errors import CurvlabError
from curvlab.operators.base import CurvatureOperator
from curvlab.records import KINDS, REQUIRED, RESULT_TYPES, numpy, parts_of

FORMAT = "curvlab"
SCHEMA_VERSION = 2
DATA_GROUP = "data"  # version 2: a record's data, apart from its attributes
RECORD_ATTRIBUTES = ("kind", "name", "step", "created", "curvature", "method", "settings", "provenance")


class StoreError(CurvlabError):
    """A file that is not a valid curvlab store, or a record that cannot be stored."""


@dataclass
class Record:
    """One stored result.

    Attributes:
        kind: One of ``KINDS``.
        name: A label, e.g. ``"hessian"`` or ``"kfac_vs_ggn"``.
        step: Training step, or ``None``.
        data: Arrays (and for ``comparison``/``kfac_factors`` nested dicts).
        settings: The method's settings (JSON-serialisable).
        provenance: Where the result came from (JSON-serialisable).
        index: Position in the file (set when read).
    """

    kind: str
    name: str
    step: int | None = None
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    index: int | None = None

    @property
    def method(self) -> str:
        """The method that produced it (from the settings)."""
        return str(self.settings.get("method", ""))

    def result(self):
        """The result this record was saved from (``EigenResult``, ``SpectralDensity``, …).

        Kinds without a result class give their data: a tensor for ``eigenvalues``
        and ``dense_block``, the dict for ``scalars`` and ``arrays``.
        """
        if self.kind in RESULT_TYPES:
            try:
                return RESULT_TYPES[self.kind].from_record(self)
            except (KeyError, ValueError) as error:
                raise StoreError(f"record {self.index} ({self.kind} {self.name!r}): {error}") from error
        if self.kind in ("eigenvalues", "dense_block"):
            return torch.as_tensor(self.data["values" if self.kind == "eigenvalues" else "matrix"])
        return dict(self.data)


# ---------------------------------------------------------------- provenance
def _jsonable(value):
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.generic, Tensor)) and np.ndim(value) == 0:
        return _jsonable(value.item())
    return str(value)


def provenance(curvature=None, problem=None, dataset: str | None = None, **extra) -> dict:
    """Provenance of a result: curvature, problem, data, versions, time, and ``extra``."""
    problem = problem if problem is not None else getattr(curvature, "problem", None)
    record = {
        "curvlab_version": __version__,
        "torch_version": torch.__version__,
        "h5py_version": h5py.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **distributed.describe(),
    }
    if curvature is not None:
        record["curvature"] = _jsonable(curvature.description())
    if problem is not None:
        record.update(
            model=str(problem.model),
            loss=problem.loss_rule.name,
            reduction=problem.loss_rule.reduction,
            num_examples=problem.num_examples,
            num_batches=problem.num_batches,
            num_params=problem.num_params,
            processes=problem.group.size if problem.group is not None else 1,
            dtype=str(problem.dtype),
            device=str(problem.device),
        )
    if dataset is not None:
        record["dataset"] = dataset
    record.update({k: _jsonable(v) for k, v in extra.items()})
    return record


# ---------------------------------------------------------------- results → records
def to_record(name: str, result, step: int | None = None, settings: dict | None = None, **provenance_options):
    """A ``Record`` from a curvlab result (``curvlab.records``: what can be stored, and how).

    Args:
        name: The record's label.
        result: A 1-d tensor (eigenvalues), 2-d tensor (dense block), a result that
            knows its record (``EigenResult``, ``SpectralDensity``, ``TraceEstimate``,
            ``ComparisonReport``, a KFAC or other operator of Kronecker blocks), a
            dataclass of numbers or a dict of numbers (scalars), or a dict holding
            arrays (arrays).
        step: Training step.
        settings: The method's settings, e.g. ``{"method": "lanczos", "tol": 1e-6}``.
        **provenance_options: Passed to ``provenance`` (curvature, problem, dataset, ...).
    """
    try:
        parts = parts_of(result, settings)
    except TypeError as error:
        raise StoreError(str(error)) from error
    if isinstance(result, CurvatureOperator):
        provenance_options.setdefault("curvature", result)
    return Record(
        parts.kind, name, step, parts.data, _jsonable(parts.settings), provenance(**provenance_options)
    )


# ---------------------------------------------------------------- writing
def _encode(key) -> str:
    """A data key as an HDF5 name: ``%``, ``/``, NUL and a leading ``.`` percent-encoded (``_decode``)."""
    key = str(key)
    if not key:
        raise StoreError("data keys must be non-empty text")
    encoded = key.replace("%", "%25").replace("/", "%2F").replace("\x00", "%00")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _decode(name: str) -> str:
    return urllib.parse.unquote(name)


def _text(value: str, what: str) -> str:
    if "\x00" in value:
        raise StoreError(f"{what} {value!r} contains a NUL character, which HDF5 strings cannot hold")
    return value


def _write_tree(group: h5py.Group, tree: dict) -> None:
    """Nested dicts → subgroups; scalars/strings → attrs; arrays/lists → datasets (keys ``_encode``d)."""
    for key, value in tree.items():
        key = _encode(key)
        if isinstance(value, dict):
            _write_tree(group.create_group(key), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            rows = group.create_group(key)
            for i, row in enumerate(value):
                _write_tree(rows.create_group(f"{i:03d}"), row)
        elif isinstance(value, (np.ndarray, np.generic, Tensor)):
            group.create_dataset(key, data=numpy(value))
        elif isinstance(value, str):
            group.attrs[key] = _text(value, f"the text of {key!r}")
        elif isinstance(value, (bool, int, float)):
            group.attrs[key] = value
        elif value is None:
            continue
        else:
            group.create_dataset(key, data=numpy(value))


def _write_record(records: h5py.Group, index: int, record: Record) -> None:
    """The record as group ``index``: its attributes on the group, its data in ``data/``."""
    group = records.create_group(f"{index:08d}")
    group.attrs["kind"] = record.kind
    group.attrs["name"] = _text(str(record.name), "the record name")
    group.attrs["step"] = -1 if record.step is None else int(record.step)
    group.attrs["created"] = record.provenance.get("time", "")
    group.attrs["curvature"] = record.provenance.get("curvature", {}).get("kind", "")
    group.attrs["method"] = record.method
    group.attrs["settings"] = json.dumps(_jsonable(record.settings))
    group.attrs["provenance"] = json.dumps(_jsonable(record.provenance))
    _write_tree(group.create_group(DATA_GROUP), record.data)


def _fsync(path: Path) -> None:
    """Flush a file to disk; a directory too where the platform can (POSIX: the rename)."""
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open a directory for fsync; its rename is journalled
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive lock on ``lock_path`` for the block: ``fcntl`` on POSIX, ``msvcrt`` on Windows.

    Imported here, not with the package: ``import curvlab`` works on every platform.
    """
    with open(lock_path, "a+b") as lock:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
            return
        try:
            import msvcrt
        except ImportError as error:
            raise StoreError("no file locking on this platform (neither fcntl nor msvcrt)") from error
        lock.seek(0)
        while True:
            try:
                msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                break
            except OSError:
                continue
        try:
            yield
        finally:
            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)


def _temporary_name(path: Path) -> re.Pattern:
    """The writers' temporary files of ``path`` (``.run.h5.<pid>.tmp``), and of no other file."""
    return re.compile(rf"\.{re.escape(path.name)}\.\d+\.tmp")


class Store:
    """An HDF5 file of curvature records: ``save`` appends, ``records`` reads.

    Args:
        path: The ``.h5`` file (created on the first save).

    Under ``torch.distributed`` only rank 0 writes: ``save`` on another rank does
    nothing (every rank may call it, no race), and the provenance records the
    world size and backend. A rank that reads the file after rank 0's save waits
    for it first (``dist.barrier()``).

    Example:
        >>> store = Store("run.h5")                                   # doctest: +SKIP
        >>> store.save("hessian", cl.top_eigen(H, 5), step=100, curvature=H)  # doctest: +SKIP
        >>> [r.name for r in store.records(kind="top_eigen")]         # doctest: +SKIP
    """

    def __init__(self, path):
        self.path = Path(path)
        self._pending: list[Record] | None = None

    # ---------------------------------------------------------------- append
    def save(
        self, name: str, result, step: int | None = None, settings: dict | None = None, **provenance_options
    ):
        """Append one result (see ``to_record`` for what can be stored)."""
        self.append(to_record(name, result, step, settings, **provenance_options))

    def append(self, *records: Record) -> None:
        """Append records atomically (all or none)."""
        for record in records:
            if record.kind not in KINDS:
                raise StoreError(f"unknown record kind {record.kind!r}; known: {KINDS}")
        if self._pending is not None:
            self._pending.extend(records)
            return
        self._commit(list(records))

    @contextlib.contextmanager
    def transaction(self):
        """Group saves into one atomic append (e.g. everything of one checkpoint)."""
        if self._pending is not None:
            raise StoreError("transactions do not nest")
        self._pending = []
        try:
            yield self
            pending, self._pending = self._pending, None
            if pending:
                self._commit(pending)
        finally:
            self._pending = None

    def _commit(self, records: list[Record]) -> None:
        if not distributed.is_writer():  # under torch.distributed rank 0 writes, the others do nothing
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(f".{self.path.name}.lock")):
            ours = _temporary_name(self.path)
            for stray in self.path.parent.iterdir():
                if ours.fullmatch(stray.name):
                    stray.unlink(missing_ok=True)  # left by a writer that was killed
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                earlier = self._copy_to(temporary)
                with h5py.File(temporary, "a") as f:
                    if "format" not in f.attrs:
                        _write_header(f)
                    group = f["records"]
                    start = len(group)
                    for offset, record in enumerate([*earlier, *records]):
                        _write_record(group, start + offset, record)
                _fsync(temporary)
                os.replace(temporary, self.path)
                _fsync(self.path.parent)
            finally:
                temporary.unlink(missing_ok=True)

    def _copy_to(self, temporary: Path) -> list[Record]:
        """Copy the file to ``temporary``; a version-1 file's records are returned to rewrite instead."""
        if not self.path.exists():
            return []
        with _open(self.path) as f:
            _check_header(f, self.path)
            if _schema_version(f) == SCHEMA_VERSION:
                earlier = None
            else:
                earlier = _read_records(f, self.path)
                created = f.attrs.get("created")
        if earlier is None:
            shutil.copyfile(self.path, temporary)
            return []
        with h5py.File(temporary, "w") as f:
            _write_header(f, created)
        return earlier

    # ---------------------------------------------------------------- read
    def records(self, kind: str | None = None, name: str | None = None) -> list[Record]:
        """All records (validated), optionally only of one kind and/or name, in write order."""
        return [
            r
            for r in read(self.path)
            if (kind is None or r.kind == kind) and (name is None or r.name == name)
        ]

    def __len__(self) -> int:
        return len(read(self.path)) if self.path.exists() else 0


def _write_header(f: h5py.File, created=None) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["created"] = created or datetime.datetime.now(datetime.timezone.utc).isoformat()
    f.attrs["curvlab_version"] = __version__
    if "records" not in f:
        f.create_group("records")


# ---------------------------------------------------------------- reading and validation
def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {error}") from error


def _check_header(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a curvlab file (no format='curvlab' attribute)")
    version = _schema_version(f)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written with schema version {version} by a newer curvlab; "
            f"this curvlab reads versions ≤ {SCHEMA_VERSION}: upgrade curvlab"
        )
    if version < 1:
        raise StoreError(f"{path}: invalid schema_version {version}")
    if "records" not in f:
        raise StoreError(f"{path}: missing /records group")


def _schema_version(f: h5py.File) -> int:
    return int(f.attrs.get("schema_version", -1))


def _read_tree(group: h5py.Group, skip=(), decode=_decode) -> dict:
    """Attributes and members of a group as nested dicts (members win over attributes).

    ``decode`` turns stored names back into keys (version 1 stored them as given).
    """
    tree = {
        decode(key): (value.decode() if isinstance(value, bytes) else value)
        for key, value in group.attrs.items()
        if key not in skip
    }
    for key, item in group.items():
        tree[decode(key)] = _read_tree(item, decode=decode) if isinstance(item, h5py.Group) else item[()]
    return tree


def _is_number(value) -> bool:
    """A real number or a numeric (bool, int, float) array: what a record's data may hold."""
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def _check_numbers(tree: dict, where: str, strings=()) -> None:
    """``StoreError`` unless every leaf of ``tree`` is numeric (``strings``: keys that hold text)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _check_numbers(value, f"{where}/{key}", strings)
        elif key in strings:
            if not isinstance(value, str):
                raise StoreError(f"{where}: {key!r} must be text, got {type(value).__name__}")
        elif not _is_number(value):
            raise StoreError(f"{where}: {key!r} must be numeric, got {type(value).__name__} {value!r:.60}")


def _check_data(kind: str, data: dict, where: str) -> None:
    """The data of a record of ``kind``: required arrays with their dims, numbers, the right parts."""
    for name, ndim in REQUIRED[kind].items():
        value = data.get(name)
        if not isinstance(value, (np.ndarray, np.number)) or np.ndim(value) != ndim:
            found = "missing" if value is None else f"{np.ndim(value)}-d {type(value).__name__}"
            raise StoreError(f"{where}: kind {kind!r} needs a {ndim}-d dataset {name!r}, found {found}")
    if kind == "comparison":
        if not isinstance(data.get("overall"), dict):
            raise StoreError(f"{where}: a comparison needs its 'overall' metrics group")
        if not isinstance(data.get("blocks", {}), dict):
            raise StoreError(f"{where}: a comparison's 'blocks' must be a group of blocks")
        _check_numbers(data, where, strings=("approx", "exact", "name"))
    elif kind == "kfac_factors":
        for layer, factors in data.items():
            if not isinstance(factors, dict) or any(
                not isinstance(factors.get(f), np.ndarray) or factors[f].ndim != 2 for f in ("A", "G")
            ):
                raise StoreError(f"{where}: layer {layer!r} needs 2-d factors 'A' and 'G'")
        _check_numbers(data, where)
    else:
        _check_numbers(data, where)


def _read_record(group: h5py.Group, path: Path, version: int) -> Record:
    where = f"{path}: record {group.name}"
    for attribute in ("kind", "name", "step", "settings", "provenance"):
        if attribute not in group.attrs:
            raise StoreError(f"{where}: missing attribute {attribute!r}")
    kind = group.attrs["kind"]
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind not in KINDS:
        raise StoreError(f"{where}: unknown kind {kind!r}")
    step = group.attrs["step"]
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        shown = step.item() if isinstance(step, np.generic) else step
        raise StoreError(f"{where}: step must be an integer, got {shown!r}")
    name = group.attrs["name"]
    if not isinstance(name, (str, bytes)):
        raise StoreError(f"{where}: name must be text, got {name!r}")
    try:
        settings = json.loads(group.attrs["settings"])
        origin = json.loads(group.attrs["provenance"])
    except (json.JSONDecodeError, TypeError) as error:
        raise StoreError(f"{where}: invalid JSON in settings/provenance: {error}") from error
    if not isinstance(settings, dict) or not isinstance(origin, dict):
        raise StoreError(f"{where}: settings and provenance must be JSON objects")
    if version >= 2:
        if not isinstance(group.get(DATA_GROUP), h5py.Group):
            raise StoreError(f"{where}: missing its {DATA_GROUP!r} group")
        data = _read_tree(group[DATA_GROUP])
    else:  # version 1: the data beside the record's attributes
        data = _read_tree(group, skip=RECORD_ATTRIBUTES, decode=str)
    _check_data(kind, data, where)
    if kind == "comparison":
        data["blocks"] = [data["blocks"][k] for k in sorted(data.get("blocks", {}))]
    step = int(step)
    return Record(
        kind,
        name.decode() if isinstance(name, bytes) else str(name),
        None if step < 0 else step,
        data,
        settings,
        origin,
        int(group.name.rsplit("/", 1)[1]),
    )


def _read_records(f: h5py.File, path: Path) -> list[Record]:
    version = _schema_version(f)
    try:
        return [_read_record(f["records"][key], path, version) for key in sorted(f["records"])]
    except (OSError, KeyError) as error:
        raise StoreError(f"{path}: corrupt record data: {error}") from error


def read(path) -> list[Record]:
    """All records of a store file, validated.

    Raises:
        StoreError: for a missing, foreign, truncated or newer-version file, or a
            malformed record (naming it and what is wrong).
    """
    path = Path(path)
    with _open(path) as f:
        _check_header(f, path)
        return _read_records(f, path)
