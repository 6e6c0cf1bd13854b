"""HDF5 store: round trips, plain-h5py readability, validation, crash safety."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
        assert first["data/values"].shape == (39,)
        assert json.loads(first.attrs["provenance"])["loss"] == "MSELoss"
        second = f["records/00000001"]
        assert second["data/overall"].attrs["rel_frobenius"] > 0
        assert second["data/blocks/000"].attrs["name"] == "0.weight + 0.bias"

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
        del f["records/00000000/data/value"]
    with pytest.raises(StoreError, match="00000000.*needs a 0-d dataset 'value', found missing"):
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


# ---------------------------------------------------------------- data apart from record attributes
def test_data_keys_named_like_record_attributes_are_kept(tmp_path):
    """A record's data has its own namespace: "curvature" or "step" is a number like any other."""
    store = Store(tmp_path / "run.h5")
    store.save("metrics", {"loss": 0.25, "curvature": 1.5, "step": 7.0})
    store.save("table", {name: np.arange(3.0) for name in ("kind", "name", "settings", "method", "created")})
    store.append(Record("scalars", "raw", 3, {"step": np.float64(9.0), "provenance": np.float64(1.0)}))
    metrics, table, raw = store.records()
    assert {k: float(v) for k, v in metrics.data.items()} == {"loss": 0.25, "curvature": 1.5, "step": 7.0}
    assert metrics.step is None and metrics.kind == "scalars"
    assert sorted(table.data) == ["created", "kind", "method", "name", "settings"]
    assert table.kind == "arrays" and table.name == "table"
    assert raw.step == 3 and float(raw.data["step"]) == 9.0 and float(raw.data["provenance"]) == 1.0


def _write_version_1(path):
    """A schema-1 file as curvlab 0.1 wrote it: data beside the record's attributes."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format="curvlab", schema_version=1, created="2026-01-01", curvlab_version="0.1.0")
        group = f.create_group("records").create_group("00000000")
        group.attrs.update(kind="scalars", name="metrics", step=4, created="", curvature="", method="")
        group.attrs.update(settings="{}", provenance="{}")
        group["loss"] = np.float64(0.5)
        group["curvature"] = np.float64(1.5)  # a dataset beside the attribute of that name


def test_version_1_files_are_read_and_rewritten_on_append(tmp_path):
    path = tmp_path / "old.h5"
    _write_version_1(path)
    (old,) = read(path)
    assert old.step == 4 and {k: float(v) for k, v in old.data.items()} == {"loss": 0.5, "curvature": 1.5}
    Store(path).save("new", {"x": 2.0}, step=5)
    records = read(path)
    assert [r.name for r in records] == ["metrics", "new"]
    assert {k: float(v) for k, v in records[0].data.items()} == {"loss": 0.5, "curvature": 1.5}
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and f.attrs["created"] == "2026-01-01"
        assert float(f["records/00000000/data/curvature"][()]) == 1.5


# ---------------------------------------------------------------- malformed records
def _tamper(path, change):
    with h5py.File(path, "a") as f:
        change(f["records/00000000"])


MALFORMED = {
    "step is a fraction": (lambda g: g.attrs.__setitem__("step", 2.5), "step must be an integer, got 2.5"),
    "step is text": (lambda g: g.attrs.__setitem__("step", "seven"), "step must be an integer, got 'seven'"),
    "a scalar is text": (
        lambda g: (g["data"].__delitem__("loss"), g["data"].attrs.__setitem__("loss", "high")),
        "'loss' must be numeric, got str",
    ),
    "settings are a list": (
        lambda g: g.attrs.__setitem__("settings", "[1, 2]"),
        "settings and provenance must be JSON objects",
    ),
    "no data group": (lambda g: g.__delitem__("data"), "missing its 'data' group"),
}


@pytest.mark.parametrize("change, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_record_is_a_store_error_naming_it(tmp_path, change, message):
    path = tmp_path / "run.h5"
    Store(path).save("metrics", {"loss": 0.25}, step=1)
    _tamper(path, change)
    with pytest.raises(StoreError, match=f"00000000: {message}"):
        read(path)


def test_a_comparison_without_overall_metrics_is_a_store_error(tmp_path, objects):
    _, _, G, K = objects
    path = tmp_path / "run.h5"
    Store(path).save("kfac_vs_ggn", cl.compare(K, G, k=2))
    _tamper(path, lambda g: g["data"].__delitem__("overall"))
    with pytest.raises(StoreError, match="a comparison needs its 'overall' metrics group"):
        read(path)


# ---------------------------------------------------------------- stray files and locking
def test_stray_cleanup_leaves_other_stores_temporaries_alone(tmp_path):
    """``.run.h5.*.tmp`` also matched ``.run.h5.x.h5.<pid>.tmp``, a live writer's file of another store."""
    other = tmp_path / ".run.h5.x.h5.12345.tmp"
    other.write_bytes(b"another store's append in flight")
    stray = tmp_path / ".run.h5.999999.tmp"
    stray.write_bytes(b"left by a killed writer of run.h5")
    Store(tmp_path / "run.h5").save("x", torch.ones(2))
    assert other.exists() and not stray.exists()


SAVER = textwrap.dedent(
    """
    import sys, torch
    from curvlab.storage import Store
    store = Store(sys.argv[1])
    for step in range(int(sys.argv[2])):
        store.save("x", torch.ones(100_000), step=step)
    """
)


def test_two_stores_whose_names_share_a_prefix_append_side_by_side(tmp_path):
    saves = 15
    paths = [tmp_path / "run.h5", tmp_path / "run.h5.x.h5"]
    writers = [subprocess.Popen([sys.executable, "-c", SAVER, str(p), str(saves)]) for p in paths]
    assert [w.wait() for w in writers] == [0, 0]
    for path in paths:
        assert [r.step for r in read(path)] == list(range(saves)), path.name


IMPORT_WITHOUT_FCNTL = textwrap.dedent(
    """
    import sys, types
    sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
    import torch, curvlab as cl
    calls = []  # msvcrt after the imports: the standard library reads its presence as Windows
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_LOCK, msvcrt.LK_UNLCK = 1, 0
    msvcrt.locking = lambda fd, mode, size: calls.append((mode, size))
    sys.modules["msvcrt"] = msvcrt
    store = cl.Store(sys.argv[1])
    store.save("x", torch.ones(2), step=1)
    assert [r.step for r in store.records()] == [1]
    assert calls == [(1, 1), (0, 1)], calls
    print("ok")
    """
)


def test_curvlab_imports_and_stores_without_fcntl(tmp_path):
    """Windows has no fcntl: the package imports, and appends lock with msvcrt."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_FCNTL, str(tmp_path / "run.h5")], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_keys_hdf5_cannot_name_are_encoded_and_nul_is_refused(tmp_path):
    store = Store(tmp_path / "run.h5")
    keys = {"a/b": 1.0, ".": 2.0, "..x": 3.0, "100%": 4.0, "x\x00y": 5.0}
    store.save("odd", keys)
    assert {k: float(v) for k, v in store.records()[0].data.items()} == keys
    with pytest.raises(StoreError, match="the record name .* contains a NUL character"):
        store.save("a\x00", {"x": 1.0})


# ---------------------------------------------------------------- records back to results
def test_every_result_comes_back_from_its_record(tmp_path, objects):
    problem, H, G, K = objects
    results = {
        "eigenvalues": cl.eigvalsh(H),
        "top": cl.top_eigen(H, 2, progress=False),
        "density": cl.spectral_density(H, 3, 8, progress=False),
        "trace": cl.trace(G, "hutch++", 30),
        "report": cl.compare(K, G, k=2),
        "dense": G.to_dense(),
    }
    store = Store(tmp_path / "run.h5")
    with store.transaction():
        for name, result in results.items():
            store.save(name, result, settings={"save_vectors": True} if name == "top" else None)
    back = {r.name: r.result() for r in store.records()}
    assert torch.equal(back["eigenvalues"], results["eigenvalues"])
    assert torch.equal(back["dense"], results["dense"])
    for name in ("values", "vectors", "residuals", "num_matvecs", "converged"):
        assert torch.equal(
            torch.as_tensor(getattr(back["top"], name)), torch.as_tensor(getattr(results["top"], name))
        )
    for name in ("grid", "density", "nodes", "weights"):
        assert torch.equal(getattr(back["density"], name), getattr(results["density"], name))
    assert back["density"].sigma == results["density"].sigma and back["density"].seed == 0
    assert back["trace"] == results["trace"]
    assert back["report"].overall["rel_frobenius"] == results["report"].overall["rel_frobenius"]
    assert [b["name"] for b in back["report"].blocks] == [b["name"] for b in results["report"].blocks]
    assert (back["report"].approx_name, back["report"].exact_name) == ("KFAC", "GGN")


@pytest.mark.parametrize("separate", [False, True])
def test_kfac_comes_back_as_an_operator_from_its_factors(tmp_path, objects, separate):
    problem = objects[0]
    K = cl.KFAC(problem, separate_weight_and_bias=separate)
    store = Store(tmp_path / "run.h5")
    store.save("kfac", K, step=3)
    (record,) = store.records()
    assert record.provenance["curvature"]["separate_weight_and_bias"] is separate
    again = record.result()
    assert torch.equal(again.to_dense(), K.to_dense()) and again.param_names == K.param_names


def test_an_incomplete_kfac_record_says_what_it_holds(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    problem = cl.Problem(model, torch.nn.MSELoss(), (torch.randn(6, 3).double(), torch.randn(6, 2).double()))
    store = Store(tmp_path / "run.h5")
    store.save("kfac", cl.KFAC(problem, other_structure="exact"))
    (record,) = store.records()
    assert sorted(record.data) == ["0", "2"]
    with pytest.raises(StoreError, match="holds only the Kronecker blocks"):
        record.result()
    with pytest.raises(StoreError, match="without Kronecker blocks has no factors"):
        store.save("ekfac", cl.EKFAC(problem, other_structure="exact"))


# ---------------------------------------------------------------- appends in O(the new records)
def _part_folder(path):
    (folder,) = path.parent.glob(f"{path.name}.parts-*")
    return folder


def test_an_append_writes_its_records_and_a_small_index_only(tmp_path):
    path = tmp_path / "run.h5"
    store = Store(path)
    store.save("first", torch.zeros(100_000), step=0)
    folder = _part_folder(path)
    (first,) = folder.iterdir()
    before = (first.stat().st_ino, first.stat().st_mtime_ns, first.stat().st_size)
    for step in range(1, 20):
        with store.transaction():
            store.save("x", torch.full((100_000,), float(step)), step=step)
            store.save("y", torch.full((10,), float(step)), step=step)
    assert (first.stat().st_ino, first.stat().st_mtime_ns, first.stat().st_size) == before  # never rewritten
    assert len(list(folder.iterdir())) == 20  # one part per append
    assert path.stat().st_size < 40 * 1024  # links only: 39 records, 800 kB of data elsewhere
    with h5py.File(path, "r") as f:  # plain h5py follows the links
        links = [f["records"].get(key, getlink=True) for key in f["records"]]
        assert all(isinstance(link, h5py.ExternalLink) for link in links) and len(links) == 39
        assert (f["records/00000037/data/values"][()] == 19).all()
    assert [r.step for r in read(path)] == [0] + [s for s in range(1, 20) for _ in range(2)]


KILLED_TRIALS = 30

READER = textwrap.dedent(
    """
    import sys, pathlib, numpy as np
    from curvlab.storage import read
    path, stop = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    reads = 0
    print("ready", flush=True)
    while not stop.exists():
        if path.exists():
            records = read(path)
            assert [r.step for r in records] == list(range(len(records)))
            assert all((r.data["values"] == r.step).all() for r in records[-3:])
            reads += 1
    print(reads)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked writers: POSIX")
def test_writers_killed_at_random_moments_lose_only_the_records_in_flight(tmp_path):
    """30 writers SIGKILLed at random moments, a reader reading all along: every file whole."""
    path, stop = tmp_path / "run.h5", tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(stop)], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout.readline() == "ready\n"
    chance = np.random.default_rng(0)
    kept = 0
    for _ in range(KILLED_TRIALS):
        acknowledgements, acknowledge = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: appends until it is killed, one byte down the pipe per commit
            try:
                os.close(acknowledgements)
                store = Store(path)
                for step in range(kept, kept + 10_000):
                    store.append(Record("arrays", "x", step, {"values": np.full(20_000, float(step))}))
                    os.write(acknowledge, b".")
            finally:
                os._exit(0)
        os.close(acknowledge)
        time.sleep(chance.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        acknowledged = 0
        while chunk := os.read(acknowledgements, 4096):
            acknowledged += len(chunk)
        os.close(acknowledgements)
        records = read(path) if path.exists() else []
        # every acknowledged append is there; at most the one in flight besides
        assert kept + acknowledged <= len(records) <= kept + acknowledged + 1
        assert [r.step for r in records] == list(range(len(records)))
        assert all((r.data["values"] == r.step).all() for r in records[kept:])
        kept = len(records)
    stop.touch()
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) > 0
    assert kept >= KILLED_TRIALS  # the writers got far enough to append, and to be killed mid-append
    Store(path).append(Record("arrays", "x", kept, {"values": np.full(3, float(kept))}))
    assert len(read(path)) == kept + 1
    folder = _part_folder(path)
    assert len(list(folder.iterdir())) == len({Path(r).name for r in _linked_files(path)})  # no orphans
    assert not list(tmp_path.glob(".run.h5.*.tmp")) and not list(folder.glob(".*.tmp"))


def _linked_files(path):
    with h5py.File(path, "r") as f:
        return [f["records"].get(key, getlink=True).filename for key in f["records"]]


def test_a_store_is_moved_packed_and_removed_whole(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for step in range(2):
        Store(a).save("x", torch.full((3,), float(step)), step=step)
    Store(b).save("old", torch.zeros(2))
    old_folder = _part_folder(b)
    cl.storage.move(a, b)  # as `curvlab analyze` replaces the previous run
    assert not a.exists() and not list(tmp_path.glob("a.h5.parts-*")) and not old_folder.exists()
    assert [r.step for r in read(b)] == [0, 1]
    Store(b).save("x", torch.full((3,), 2.0), step=2)
    packed = tmp_path / "elsewhere" / "one.h5"
    packed.parent.mkdir()
    cl.storage.pack(b, packed)
    alone = tmp_path / "alone.h5"
    packed.rename(alone)  # one file: it travels alone
    with h5py.File(alone, "r") as f:
        assert not any(isinstance(f["records"].get(k, getlink=True), h5py.ExternalLink) for k in f["records"])
    assert [(r.step, r.data["values"].tolist()) for r in read(alone)] == [
        (s, [float(s)] * 3) for s in range(3)
    ]
    Store(alone).save("x", torch.full((3,), 3.0), step=3)  # the packed records move into a parts folder
    assert [r.step for r in read(alone)] == [0, 1, 2, 3] and all(_linked_files(alone))
    twin = tmp_path / "twin.h5"
    for step in range(2):
        Store(twin).save("x", torch.full((3,), float(step)), step=step)
    cl.storage.pack(twin, twin)  # in place: one file, no folder left behind
    assert not list(tmp_path.glob("twin.h5.parts-*")) and [r.step for r in read(twin)] == [0, 1]
    cl.storage.move(b, b)  # onto itself: nothing to do
    assert [r.step for r in read(b)] == [0, 1, 2]
    with pytest.raises(StoreError, match="no such store to move"):
        cl.storage.move(tmp_path / "never.h5", b)
    assert [r.step for r in read(b)] == [0, 1, 2]  # the target is untouched
    cl.storage.remove(b)
    assert not b.exists() and not list(tmp_path.glob("b.h5.parts-*"))
    shutil.rmtree(_part_folder(alone))
    with pytest.raises(StoreError, match=r"record 00000000 is in .*, which is missing.*storage.pack"):
        read(alone)
