"""The main job and the data loaders."""

import gzip
import struct

import h5py
import numpy as np
import pytest
import torch

from curvlab import analysis, cli
from curvlab.analysis import analyse_checkpoint
from curvlab.data import load_digits, load_mnist_idx, load_npz, read_idx
from curvlab.errors import DataError
from curvlab.storage import Store, read


def _analyze(tmp_path, *extra):
    out = tmp_path / "out"
    code = cli.main(
        ["analyze", "--steps", "20", "--checkpoints", "2", "--hidden", "4", "--k", "3", "--no-progress"]
        + ["--examples", "300", "--out", str(out), *extra]
    )
    return code, out


def test_analyze_writes_hdf5_and_figures(tmp_path, capsys):
    code, out = _analyze(tmp_path)
    text = capsys.readouterr().out
    assert code == 0
    assert "OK" in text and "310 parameters" in text  # 64·4 + 4 + 4·10 + 10
    records = read(out / "analysis.h5")
    assert {r.step for r in records} == {0, 20}
    names = {r.name for r in records}
    for name in ("hessian", "ggn", "fisher", "empirical_fisher"):
        assert name in names
        assert {r.kind for r in records if r.name == name} >= {
            "eigenvalues",
            "top_eigen",
            "trace",
            "spectral_density",
        }
    compared = {r.data["approx"] for r in records if r.kind == "comparison"}
    assert compared >= {"KFAC", "KFAC (MC)", "EKFAC", "ACP", "diagonal", "empirical Fisher", "GGN"}
    for figure in (
        "densities.png",
        "approximation_errors_ggn.png",
        "spectrum_hessian.png",
        "top_eigen_hessian.png",
    ):
        assert (out / "figures" / figure).stat().st_size > 10_000, figure
    first = records[0].provenance
    assert first["dataset"] == "digits (scikit-learn)" and first["num_examples"] == 300


def test_analyze_matrix_free_path(tmp_path, capsys):
    code, out = _analyze(tmp_path, "--exact-limit", "100")
    assert code == 0
    assert "Lanczos top-k" in capsys.readouterr().out
    kinds = {r.kind for r in read(out / "analysis.h5")}
    assert "eigenvalues" not in kinds and {"top_eigen", "trace", "spectral_density"} <= kinds


def test_analyze_on_an_npz_file(tmp_path, capsys):
    generator = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=generator.normal(size=(60, 6)), y=generator.integers(0, 3, 60))
    code, out = _analyze(tmp_path, "--npz", str(tmp_path / "d.npz"))
    assert code == 0
    assert "6-4-3" in capsys.readouterr().out
    assert read(out / "analysis.h5")[0].provenance["dataset"] == "npz d.npz"


def test_show_and_plot_commands(tmp_path, capsys):
    _, out = _analyze(tmp_path)
    capsys.readouterr()
    assert cli.main(["show", str(out / "analysis.h5")]) == 0
    text = capsys.readouterr().out
    assert "schema 2" in text and "top_eigen" in text and "MLP" not in text and "Sequential" in text
    assert cli.main(["plot", str(out / "analysis.h5"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "densities.png").exists()
    (tmp_path / "bad.h5").write_text("not hdf5")
    assert cli.main(["show", str(tmp_path / "bad.h5")]) == 2
    assert "not a readable HDF5" in capsys.readouterr().err


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


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "e.npz", inputs=np.ones(3))
    cases = [
        (["--npz", str(tmp_path / "e.npz")], "named 'X' and 'y'"),
        (["--npz", str(tmp_path / "missing.npz")], "No such file"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases.append((["--device", "cuda"], "no CUDA device is available here"))
    for flags, message in cases:
        assert cli.main(["analyze", *flags, "--steps", "1", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_failed_rerun_keeps_the_previous_results(tmp_path, capsys, monkeypatch):
    """analysis.h5 and its figures are replaced only by a run that finishes."""
    code, out = _analyze(tmp_path)
    assert code == 0
    before = (out / "analysis.h5").read_bytes()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    calls = []

    def fail_at_the_second_checkpoint(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return analyse_checkpoint(*args, **kwargs)

    monkeypatch.setattr(analysis, "analyse_checkpoint", fail_at_the_second_checkpoint)
    with pytest.raises(RuntimeError, match="killed"):
        _analyze(tmp_path)
    assert (out / "analysis.h5").read_bytes() == before
    assert sorted(p.name for p in (out / "figures").iterdir()) == figures
    assert [r.step for r in read(out / "analysis.partial.h5") if r.kind == "trace"] == [0] * 4
    assert "finished checkpoints are in" in capsys.readouterr().err


def test_a_shorter_run_leaves_no_stale_figures(tmp_path):
    code, out = _analyze(tmp_path)
    assert code == 0 and (out / "figures" / "top_eigen_hessian.png").exists()
    code, out = _analyze(tmp_path, "--checkpoints", "1")  # one step: no evolution over steps
    assert code == 0
    assert not (out / "figures" / "top_eigen_hessian.png").exists()
    assert (out / "figures" / "densities.png").exists()
    assert {r.step for r in read(out / "analysis.h5")} == {20}
    assert not (out / "analysis.partial.h5").exists()


BAD_FLAGS = {
    "--steps -5": ("--steps", "-5", "integer ≥ 0"),
    "--hidden 0": ("--hidden", "0", "integer ≥ 1"),
    "--lr nan": ("--lr", "nan", "finite number > 0"),
    "--lr -1": ("--lr", "-1", "finite number > 0"),
    "--batch-size 0": ("--batch-size", "0", "integer ≥ 1"),
    "--k 0": ("--k", "0", "integer ≥ 1"),
    "--device tpu": ("--device", "tpu", "cpu, cuda or cuda:<index>"),
    "--examples 0": ("--examples", "0", "integer ≥ 1"),
    "--examples -1": ("--examples", "-1", "integer ≥ 1"),
    "--checkpoints 0": ("--checkpoints", "0", "integer ≥ 1"),
    "--exact-limit x": ("--exact-limit", "x", "integer ≥ 0"),
    "--activation foo": ("--activation", "foo", "invalid choice"),
}


@pytest.mark.parametrize("flag, value, message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", flag, value, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"curvlab: argument {flag}: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_saturated_model_is_analysed_not_a_crash(tmp_path, capsys):
    """--lr 1e6 saturates every tanh: all curvature is 0, errors against it undefined, no division by 0."""
    code, out = _analyze(tmp_path, "--lr", "1e6", "--checkpoints", "2")
    assert code == 0
    text = capsys.readouterr().out
    assert "= 0.0e+00 (OK" in text
    (last,) = [r for r in read(out / "analysis.h5") if r.name == "hessian" and r.kind == "scalars" and r.step]
    assert float(last.data["learning_rate_1_over_lambda_max"]) == float("inf")
    densities = [r for r in read(out / "analysis.h5") if r.kind == "spectral_density" and r.step == 20]
    assert all(np.isfinite(r.data["density"]).all() for r in densities)


def test_k_larger_than_the_model_is_used_as_the_model_size(tmp_path, capsys):
    code, out = _analyze(tmp_path, "--k", "100000", "--checkpoints", "1")
    assert code == 0
    assert "--k 100000 is more than the model's 310 parameters: using k = 310" in capsys.readouterr().out


def _malformed(path, change):
    with h5py.File(path, "a") as f:
        change(f["records/00000000"])


MALFORMED_FILES = {
    "non-integer step": lambda g: g.attrs.__setitem__("step", 1.5),
    "string value": lambda g: (g["data"].__delitem__("a"), g["data"].attrs.__setitem__("a", "text")),
}


@pytest.mark.parametrize("change", MALFORMED_FILES.values(), ids=MALFORMED_FILES.keys())
@pytest.mark.parametrize("command", ["show", "plot"])
def test_show_and_plot_of_a_malformed_record_are_one_line(tmp_path, capsys, command, change):
    path = tmp_path / "run.h5"
    Store(path).save("numbers", {"a": 1.0}, step=1)
    _malformed(path, change)
    assert cli.main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "record /records/00000000" in err and err.count("\n") == 1, err
