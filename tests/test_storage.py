"""HDF5 store: round trips, plain-h5py readability, validation, crash safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.storage import SCHEMA_VERSION, Record, Store, StoreError, read
from tests.cases import CASES


@pytest.fixture(scope="module")
def objects():
    problem = CASES[0].build(torch.float64)
    return problem, cl.Hessian(problem), cl.GGN(problem), cl.KFAC(problem)


def test_round_trip_of_every_kind(tmp_path, objects):
    problem, H, G, K = objects
    store = Store(tmp_path / "run.h5")
    eigenvalues = cl.eigvalsh(H)
    top = cl.top_eigen(H, 2, progress=False)
    density = cl.spectral_density(H, 3, 8, progress=False)
    trace = cl.trace(G, "hutch++", 30)
    report = cl.compare(K, G, k=2)
    condition = cl.condition_number(G)
    with store.transaction():
        store.save("hessian", eigenvalues, step=3, curvature=H, dataset="toy")
        store.save("hessian", top, step=3, curvature=H, settings={"save_vectors": True, "tol": 1e-6})
        store.save("hessian", density, step=3, curvature=H)
        store.save("ggn", trace, step=3, curvature=G)
        store.save("kfac_vs_ggn", report, step=3, curvature=K)
        store.save("kfac", K, step=3)
        store.save("ggn", condition, curvature=G)
        store.save("ggn", G.to_dense(), step=3)
    records = store.records()
    assert [r.kind for r in records] == [
        "eigenvalues",
        "top_eigen",
        "spectral_density",
        "trace",
        "comparison",
        "kfac_factors",
        "scalars",
        "dense_block",
    ]
    assert [r.index for r in records] == list(range(8))
    np.testing.assert_array_equal(records[0].data["values"], eigenvalues.numpy())
    np.testing.assert_array_equal(records[1].data["vectors"], top.vectors.numpy())
    np.testing.assert_array_equal(records[1].data["residuals"], top.residuals.numpy())
    assert records[1].settings["tol"] == 1e-6 and records[1].settings["num_matvecs"] == top.num_matvecs
    np.testing.assert_array_equal(records[2].data["density"], density.density.numpy())
    assert records[2].settings["num_probes"] == 3
    assert float(records[3].data["value"]) == trace.value
    assert records[3].method == "hutch++"
    assert records[4].data["overall"]["rel_frobenius"] == report.overall["rel_frobenius"]
    assert [b["name"] for b in records[4].data["blocks"]] == [b["name"] for b in report.blocks]
    for layer, (A, G_factor) in K.factors.items():
        np.testing.assert_array_equal(records[5].data[layer]["A"], A.numpy())
        np.testing.assert_array_equal(records[5].data[layer]["G"], G_factor.numpy())
    assert float(records[6].data["value"]) == condition.value and records[6].step is None
    np.testing.assert_array_equal(records[7].data["matrix"], G.to_dense().numpy())
    assert store.records(kind="trace", name="ggn")[0].index == 3


def test_provenance_is_complete(tmp_path, objects):
    problem, H, G, K = objects
    store = Store(tmp_path / "run.h5")
    store.save("kfac", cl.top_eigen(K, 1, progress=False), step=7, curvature=K, dataset="toy", seed=0)
    origin = store.records()[0].provenance
    assert origin["curvature"]["kind"] == "KFAC" and origin["curvature"]["fisher_type"] == "type-2"
    assert origin["curvature"]["kfac_approx"] == "expand"
    for key in ("model", "loss", "reduction", "num_examples", "num_params", "dtype", "device", "dataset"):
        assert key in origin, key
    for key in ("curvlab_version", "torch_version", "time", "seed"):
        assert key in origin, key
    assert origin["loss"] == "MSELoss" and origin["reduction"] == "mean" and origin["num_params"] == 39


def test_file_is_readable_with_plain_h5py(tmp_path, objects):
    problem, H, G, K = objects
    path = tmp_path / "run.h5"
    Store(path).save("hessian", cl.eigvalsh(H), step=1, curvature=H)
    Store(path).save("kfac_vs_ggn", cl.compare(K, G, k=2), step=1)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "curvlab" and f.attrs["schema_version"] == SCHEMA_VERSION
        first = f["records/00000000"]
        assert first.attrs["kind"] == "eigenvalues" and first.attrs["name"] == "hessian"
        assert first.attrs["step"] == 1 and first.attrs["curvature"] == "Hessian"
        assert first["values"].shape == (39,)
        assert json.loads(first.attrs["provenance"])["loss"] == "MSELoss"
        second = f["records/00000001"]
        assert second["overall"].attrs["rel_frobenius"] > 0
        assert second["blocks/000"].attrs["name"] == "0.weight + 0.bias"

        def no_objects(name, item):
            if isinstance(item, h5py.Dataset):
                assert item.dtype.kind != "O", name  # no pickled or object data

        f.visititems(no_objects)


def test_append_over_training_steps(tmp_path, objects):
    _, H, _, _ = objects
    store = Store(tmp_path / "run.h5")
    for step in range(5):
        store.save("hessian", cl.trace(H, "hutchinson", 10, seed=step), step=step * 10)
    assert [r.step for r in store.records(kind="trace")] == [0, 10, 20, 30, 40]
    assert len(store) == 5


def test_transaction_is_all_or_nothing(tmp_path, objects):
    _, H, _, _ = objects
    store = Store(tmp_path / "run.h5")
    store.save("hessian", cl.eigvalsh(H))
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            store.save("hessian", cl.eigvalsh(H), step=1)
            raise RuntimeError("boom")
    assert len(store.records()) == 1


def test_foreign_hdf5_file_is_rejected(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a curvlab file"):
        read(path)
    with pytest.raises(StoreError, match="not a curvlab file"):
        Store(path).save("x", torch.ones(2))


def test_newer_schema_is_rejected(tmp_path, objects):
    path = tmp_path / "run.h5"
    Store(path).save("hessian", cl.eigvalsh(objects[1]))
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer curvlab"):
        read(path)


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_file_is_rejected(tmp_path, objects, keep):
    path = tmp_path / "run.h5"
    Store(path).save("hessian", torch.randn(5000, dtype=torch.float64))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(StoreError, match="truncated or corrupt|corrupt record"):
        read(path)


def test_text_file_and_missing_file_are_rejected(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        read(text)
    with pytest.raises(StoreError, match="no such file"):
        read(tmp_path / "absent.h5")


def test_malformed_record_is_named(tmp_path, objects):
    path = tmp_path / "run.h5"
    Store(path).save("ggn", cl.trace(objects[2], "hutchinson", 10))
    with h5py.File(path, "a") as f:
        del f["records/00000000/value"]
    with pytest.raises(StoreError, match="00000000.*needs dataset 'value'"):
        read(path)


def test_unknown_results_and_kinds_are_refused(tmp_path):
    store = Store(tmp_path / "run.h5")
    with pytest.raises(StoreError, match="cannot store a object"):
        store.save("x", object())
    with pytest.raises(StoreError, match="unknown record kind"):
        store.append(Record("histogram", "x"))


WRITER = textwrap.dedent(
    """
    import sys, torch
    from curvlab.storage import Store
    store = Store(sys.argv[1])
    for step in range(1000):
        store.save("big", torch.full((400_000,), float(step), dtype=torch.float64), step=step)
        print(step, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.9])
def test_killed_writer_leaves_a_valid_file(tmp_path, delay):
    path = tmp_path / "run.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    # Wait for a few complete appends, then kill the writer mid-flight.
    for _ in range(3):
        writer.stdout.readline()
    time.sleep(delay)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    records = read(path)
    assert len(records) >= 3
    for index, record in enumerate(records):
        assert record.step == index
        values = record.data["values"]
        assert values.shape == (400_000,) and (values == index).all()
    Store(path).save("after", torch.ones(3))  # appending goes on; stray temporaries are cleaned
    assert read(path)[-1].name == "after"
    assert not list(tmp_path.glob(".run.h5.*.tmp"))


def test_arrays_and_scalars_records(tmp_path):
    store = Store(tmp_path / "run.h5")
    store.save("table", {"kappa": np.array([10.0, 100.0]), "iterations": np.array([5, 50])})
    store.save("numbers", {"a": 1.5, "b": 2})
    table, numbers = store.records()
    assert table.kind == "arrays" and table.data["iterations"].tolist() == [5, 50]
    assert numbers.kind == "scalars" and float(numbers.data["a"]) == 1.5
