"""The main job and the data loaders."""

import gzip
import struct

import numpy as np
import pytest
import torch

from curvlab import cli
from curvlab.data import load_digits, load_mnist_idx, load_npz, read_idx
from curvlab.errors import DataError


def test_analyze_runs_and_checks_fisher_equals_ggn(capsys):
    code = cli.main(["analyze", "--steps", "20", "--hidden", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("Hessian", "GGN", "Fisher", "EmpiricalFisher"):
        assert name in out
    assert "OK" in out and "310" in out  # 64·4 + 4 + 4·10 + 10 parameters


def test_digits_are_real_and_split():
    (X, y), (X_test, y_test) = load_digits()
    assert X.shape[1] == 64 and X.shape[0] + X_test.shape[0] == 1797
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert set(y.tolist()) == set(range(10))


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_loader(tmp_path, suffix):
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    labels = np.array([1, 7, 3], dtype=np.uint8)
    _write_idx(tmp_path / f"images.idx{suffix}", images, 0x08)
    _write_idx(tmp_path / f"labels.idx{suffix}", labels, 0x08)
    X, y = load_mnist_idx(tmp_path / f"images.idx{suffix}", tmp_path / f"labels.idx{suffix}")
    assert X.shape == (3, 16) and torch.allclose(X[0, 5], torch.tensor(5 / 255.0))
    assert y.tolist() == [1, 7, 3]


def test_idx_loader_rejects_foreign_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_npz_loader(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((4, 2, 2)), y=np.array([0, 1, 1, 0]))
    X, y = load_npz(tmp_path / "d.npz")
    assert X.shape == (4, 4) and y.dtype == torch.long
    np.savez(tmp_path / "e.npz", inputs=np.ones(3))
    with pytest.raises(DataError, match="named 'X' and 'y'"):
        load_npz(tmp_path / "e.npz")
