"""Embedded default data (scikit-learn's digits) and loaders for files users have."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError


def load_digits(dtype: torch.dtype = torch.float32, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8×8 handwritten digits (1,797 images, shipped inside scikit-learn).

    Pixels are scaled to [0, 1] and flattened to 64 features; labels are 0–9.

    Returns:
        ``((X_train, y_train), (X_test, y_test))`` with X of shape (N, 64).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    X = torch.as_tensor(digits.data / 16.0, dtype=dtype)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    X, y = X[order], y[order]
    num_test = int(round(test_fraction * X.shape[0]))
    return (X[num_test:], y[num_test:]), (X[:num_test], y[:num_test])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def load_mnist_idx(images: str | Path, labels: str | Path, dtype: torch.dtype = torch.float32):
    """MNIST-style images and labels from IDX files the user already has.

    Returns:
        ``(X, y)`` with X of shape (N, rows·cols) scaled to [0, 1] and y long.
    """
    X = read_idx(images)
    y = read_idx(labels)
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{images} holds {X.shape[0]} images but {labels} {y.shape[0]} labels")
    X = torch.as_tensor(X.reshape(X.shape[0], -1).astype(np.float64) / 255.0, dtype=dtype)
    return X, torch.as_tensor(y.astype(np.int64))


def load_npz(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Arrays ``X`` and ``y`` from a ``.npz`` file (no pickle: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as archive:
        if "X" not in archive or "y" not in archive:
            raise DataError(f"{path} must hold arrays named 'X' and 'y', has {list(archive.keys())}")
        X, y = archive["X"], archive["y"]
    X = torch.as_tensor(X.reshape(X.shape[0], -1).astype(np.float64), dtype=dtype)
    y = torch.as_tensor(y)
    return X, (y.long() if not y.is_floating_point() else y.to(dtype))
