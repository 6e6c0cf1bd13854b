"""Figures: every plot function draws from live objects and from stored records."""

import pytest
import torch
from matplotlib.figure import Figure

import curvlab as cl
from curvlab import plot
from curvlab.storage import Store
from tests.cases import CASES


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory):
    problem = CASES[0].build(torch.float64)
    H, G, K = cl.Hessian(problem), cl.GGN(problem), cl.KFAC(problem)
    store = Store(tmp_path_factory.mktemp("plots") / "run.h5")
    for step in (0, 5):
        with store.transaction():
            store.save("hessian", cl.eigvalsh(H), step)
            store.save("hessian", cl.top_eigen(H, 3, progress=False), step, settings={"learning_rate": 0.1})
            store.save("ggn", cl.trace(G, "hutch++", 30, seed=step), step)
            store.save("hessian", cl.spectral_density(H, 4, 10, progress=False), step)
            store.save("ggn", cl.spectral_density(G, 4, 10, progress=False), step)
            store.save("KFAC", cl.compare(K, G, k=2, approx_name="KFAC", exact_name="GGN"), step)
            store.save("2/exact", G.blocks("layer")[-1].to_dense(), step)
            store.save("2/KFAC", K.blocks()[-1].to_dense(), step)
    return problem, store


def _png(fig, tmp_path, name):
    path = plot.save(fig, tmp_path / f"{name}.png")
    assert isinstance(fig, Figure) and path.stat().st_size > 5_000
    return path


def test_histograms_of_signed_and_psd_spectra(filled_store, tmp_path):
    problem, _ = filled_store
    hessian = cl.eigvalsh(cl.Hessian(problem))
    fig = plot.spectrum_histogram(hessian)
    assert fig.axes[0].get_xscale() == "symlog"
    _png(fig, tmp_path, "signed")
    fig = plot.spectrum_histogram(cl.eigvalsh(cl.GGN(problem)))
    assert fig.axes[0].get_xscale() == "log"
    _png(fig, tmp_path, "psd")


def test_every_figure_from_records(filled_store, tmp_path):
    _, store = filled_store
    records = store.records()
    _png(plot.spectrum_histogram(store.records(kind="eigenvalues")[-1]), tmp_path, "hist")
    densities = {r.name: r for r in records if r.kind == "spectral_density" and r.step == 5}
    _png(plot.densities(densities), tmp_path, "densities")
    fig = plot.evolution(store.records(name="hessian"), "top_eigen", learning_rate=0.1)
    assert len(fig.axes[0].lines) == 4  # three eigenvalues and 2/lr
    _png(fig, tmp_path, "evolution")
    _png(plot.evolution(store.records(name="ggn"), "trace"), tmp_path, "trace")
    _png(plot.approximation_errors({"KFAC": store.records(kind="comparison")[-1]}), tmp_path, "errors")
    blocks = store.records(kind="dense_block")
    _png(plot.block_heatmaps(blocks[-2], blocks[-1], ("exact", "KFAC")), tmp_path, "blocks")


def test_plot_store_writes_the_standard_figures(filled_store, tmp_path):
    _, store = filled_store
    written = plot.plot_store(store.path, tmp_path / "figures")
    names = {p.name for p in written}
    assert {"spectrum_hessian.png", "top_eigen_hessian.png", "trace_ggn.png", "densities.png"} <= names
    assert {"approximation_errors_ggn.png", "block_2_kfac.png"} <= names
    assert len(written) == len(names)


def test_heatmaps_reject_mismatched_blocks():
    with pytest.raises(ValueError, match="differ in shape"):
        plot.block_heatmaps(torch.eye(3), torch.eye(4))


def test_heatmaps_of_live_blocks_match_those_of_their_dense_matrices(filled_store, tmp_path):
    problem, _ = filled_store
    exact, kfac = cl.GGN(problem).blocks("layer")[-1], cl.KFAC(problem).blocks()[-1]
    live = plot.block_heatmaps(exact, kfac)
    dense = plot.block_heatmaps(exact.to_dense(), kfac.to_dense())
    for a, b in zip(live.axes[:3], dense.axes[:3]):
        assert (a.images[0].get_array() == b.images[0].get_array()).all()
    _png(live, tmp_path, "live_blocks")
