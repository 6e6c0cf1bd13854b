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

Layout: the records live in a parts folder beside the file, ``run.h5.parts-<8 hex>/``,
one HDF5 file per append (``00000012.h5`` holds that append's records under the same
``/records/<index>`` names); ``run.h5`` is the index: the header and one HDF5 external
link per record into its part. Plain h5py follows the links (``f["records/00000012"]``).
A store is the file *and* its folder: ``move`` and ``remove`` handle both; ``pack``
makes one self-contained file (records held in the file itself, also a valid store).

Nothing is lost on a crash, and an append costs O(its records): the new part is
written to a temporary, flushed and renamed into the folder; then a new index (links
only: about 100 bytes a record) is written the same way and renamed over the old one
(``os.replace``). Parts are never written again. A killed writer leaves the previous
index, which references only whole parts, and at worst a temporary or a part no index
references: the next append removes them. Readers never see a part of a write.
Appends are serialised by a lock file (``fcntl`` on POSIX, ``msvcrt`` on
Windows), so several processes may append to one file. Single-file stores (from
``pack``, version 1, or older curvlab) are read as they are; an append moves their
records into a parts folder once. Only arrays, numbers and JSON strings are
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
import uuid
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


PARTS_MARK = ".parts-"  # run.h5's records live in run.h5.parts-<8 hex digits>/
PART_NAME = re.compile(r"\d{8}\.h5")  # a part: named after its first record


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _remove_strays(path: Path) -> None:
    """Temporaries of ``path`` left by killed writers (call under its lock)."""
    if not path.parent.exists():
        return
    ours = _temporary_name(path)
    for stray in path.parent.iterdir():
        if ours.fullmatch(stray.name):
            stray.unlink(missing_ok=True)


def _write_atomically(path: Path, write, base: Path | None = None) -> None:
    """``write(h5py.File)`` into a temporary beside ``path`` (a copy of ``base``), flushed, renamed over it.

    A reader sees the old file or the new one, never a part of one; a killed writer
    leaves the old file and a temporary (``_remove_strays``).
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if base is not None:
            shutil.copyfile(base, temporary)
        with h5py.File(temporary, "a" if base is not None else "w") as f:
            write(f)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _write_records(f: h5py.File, numbered: list[tuple[int, Record]]) -> None:
    """``numbered`` records into ``/records`` (a part, or a single-file store's index)."""
    group = f.require_group("records")
    for index, record in numbered:
        _write_record(group, index, record)


def _write_index(f: h5py.File, created, folder: str | None, links: dict, numbered=()) -> None:
    """The index: the header, every linked record as an external link into its part, ``numbered`` in it."""
    _write_header(f, created)
    if folder is not None:
        f.attrs["parts"] = folder
    _add_links(f, links)
    _write_records(f, numbered)
    if folder is not None and not numbered:  # links only: the next append copies this index
        f.attrs["next_record"] = 1 + max((int(key) for key in links), default=-1)


def _add_links(f: h5py.File, links: dict) -> None:
    """External links into the parts; with them, the number of the next record (links only)."""
    for key in sorted(links):
        filename, target = links[key]
        f["records"][key] = h5py.ExternalLink(filename, target)
    if "next_record" in f.attrs and links:
        following = max(int(key) for key in links) + 1
        f.attrs["next_record"] = max(following, int(f.attrs["next_record"]))


def _linked_index(path: Path) -> tuple[int, str | None] | None:
    """``(next record's number, parts folder)`` of an index that holds links only; ``None`` otherwise."""
    if not path.exists():
        return None
    with _open(path) as f:
        _check_header(f, path)
        following = f.attrs.get("next_record")
        if following is None or _schema_version(f) != SCHEMA_VERSION:
            return None
        return int(following), _parts_attribute(f)


def _layout(path: Path) -> tuple[dict, list, object, str | None]:
    """What an append builds on: ``(links, earlier, created, folder)``.

    ``links``: record name → (part file relative to the index, object path);
    ``earlier``: ``(index, Record)`` of records held in the index itself (a version-1
    file, or a single-file store from ``pack`` or an older curvlab): moved into the
    next part; ``created``: the store's creation time; ``folder``: its parts folder.
    """
    if not path.exists():
        return {}, [], None, None
    with _open(path) as f:
        _check_header(f, path)
        version = _schema_version(f)
        links, earlier = {}, []
        for key in sorted(f["records"]):
            link = f["records"].get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                links[key] = (link.filename, link.path)
            else:
                earlier.append((int(key), _read_record(f["records"][key], path, version)))
        return links, earlier, f.attrs.get("created"), _parts_attribute(f)


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
        with _locked(_lock_path(self.path)):
            _remove_strays(self.path)
            linked = _linked_index(self.path)
            if linked is None:  # new, or a single-file store: every record into a parts folder
                links, earlier, created, folder = _layout(self.path)
                following = 1 + max([-1, *(int(key) for key in links), *(index for index, _ in earlier)])
            else:  # the index holds links only: it is copied and the new ones added (O(its size))
                (following, folder), links, earlier, created = linked, {}, [], None
            folder = folder or f"{self.path.name}{PARTS_MARK}{uuid.uuid4().hex[:8]}"
            directory = self.path.parent / folder
            directory.mkdir(exist_ok=True)
            for stray in os.scandir(directory):  # temporaries and unreferenced parts of killed writers
                temporary = stray.name.startswith(".") and stray.name.endswith(".tmp")
                if temporary or (PART_NAME.fullmatch(stray.name) and int(stray.name[:8]) >= following):
                    os.unlink(stray.path)
            numbered = [*earlier, *((following + i, record) for i, record in enumerate(records))]
            part = directory / f"{numbered[0][0]:08d}.h5"
            _write_atomically(part, lambda f: _write_records(f, numbered))
            for index, _ in numbered:
                links[f"{index:08d}"] = (f"{folder}/{part.name}", f"/records/{index:08d}")
            if earlier or not self.path.exists():
                _write_atomically(self.path, lambda f: _write_index(f, created, folder, links))
            else:
                _write_atomically(self.path, lambda f: _add_links(f, links), base=self.path)

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
            input_side = "Z" if isinstance(factors, dict) and "Z" in factors else "A"  # A = ZᵀZ
            if not isinstance(factors, dict) or any(
                not isinstance(factors.get(f), np.ndarray) or factors[f].ndim != 2 for f in (input_side, "G")
            ):
                raise StoreError(f"{where}: layer {layer!r} needs 2-d factors 'A' (or its root 'Z') and 'G'")
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


def _check_parts(f: h5py.File, path: Path) -> None:
    """A record whose part file is missing: a StoreError that says how a store is kept together."""
    for key in f["records"]:
        link = f["records"].get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink) and not (path.parent / link.filename).exists():
            raise StoreError(
                f"{path}: record {key} is in {path.parent / link.filename}, which is missing. A store is "
                f"its index file and its parts folder {Path(link.filename).parent}/ beside it: copy or "
                "move them together (curvlab.storage.move), or make one file of them (curvlab.storage.pack)"
            )


def _read_records(f: h5py.File, path: Path) -> list[Record]:
    version = _schema_version(f)
    _check_parts(f, path)
    try:
        return [_read_record(f["records"][key], path, version) for key in sorted(f["records"])]
    except (OSError, KeyError) as error:
        raise StoreError(f"{path}: corrupt record data: {error}") from error


# ---------------------------------------------------------------- whole stores
def remove(path) -> None:
    """Delete a store: its index file and its parts folder (nothing if it does not exist).

    Under ``torch.distributed`` only rank 0 deletes; the other ranks do nothing.
    """
    path = Path(path)
    if not distributed.is_writer() or not path.exists():
        return
    with _locked(_lock_path(path)):
        folder = _folder_of(path)
        path.unlink(missing_ok=True)
        if folder is not None:
            shutil.rmtree(path.parent / folder, ignore_errors=True)
        _remove_strays(path)


def move(source, target) -> None:
    """Rename a store (index and parts folder) to ``target``, replacing any store there.

    ``target`` is replaced atomically: a crash leaves either the old store at
    ``target`` or the new one, each whole (``curvlab analyze`` writes its run beside
    the previous one and moves it over it when finished). Rank 0 alone under
    ``torch.distributed``.
    """
    source, target = Path(source), Path(target)
    if not distributed.is_writer():
        return
    if not source.exists():
        raise StoreError(f"{source}: no such store to move")
    if source.resolve() == target.resolve():
        return
    with _locked(_lock_path(source)), _locked(_lock_path(target)):
        links, earlier, created, folder = _layout(source)
        old = _folder_of(target) if target.exists() else None
        renamed = None
        if folder is not None:
            renamed = f"{target.name}{PARTS_MARK}{uuid.uuid4().hex[:8]}"
            links = {key: (f"{renamed}/{Path(name).name}", obj) for key, (name, obj) in links.items()}
        if folder is not None:  # the source index points nowhere from here on; the target is still whole
            os.replace(source.parent / folder, target.parent / renamed)
        _write_atomically(target, lambda f: _write_index(f, created, renamed, links, earlier))
        source.unlink(missing_ok=True)
        if old is not None and old != renamed:
            shutil.rmtree(target.parent / old, ignore_errors=True)


def pack(source, target) -> None:
    """One self-contained HDF5 file holding every record of the store ``source`` (to share or archive).

    The packed file is a store too (its records in the file itself); appending to it
    moves them into a parts folder again. ``target`` may be ``source``: the store
    becomes one file, and its parts folder goes.
    """
    source, target = Path(source), Path(target)
    if not distributed.is_writer():
        return
    with _locked(_lock_path(source)):
        records = read(source)
        with _open(source) as f:
            created = f.attrs.get("created")
        folder = _folder_of(source) if source.resolve() == target.resolve() else None
        numbered = [(record.index, record) for record in records]
        _write_atomically(target, lambda f: _write_index(f, created, None, {}, numbered))
        if folder is not None:  # the store is its own packed file now: its parts are unreferenced
            shutil.rmtree(source.parent / folder, ignore_errors=True)


def _folder_of(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            return _parts_attribute(f)
    except OSError:
        return None


def _parts_attribute(f: h5py.File) -> str | None:
    """The index's parts folder (a name beside it), or ``None``."""
    folder = f.attrs.get("parts")
    folder = folder.decode() if isinstance(folder, bytes) else folder
    return folder if isinstance(folder, str) and PARTS_MARK in folder and "/" not in folder else None


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
