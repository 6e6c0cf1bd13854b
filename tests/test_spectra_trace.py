"""Traces (exact, Hutchinson, Hutch++) and the probes they draw."""

import pytest
import torch

import curvlab as cl
from curvlab import reference
from curvlab.sampling import probe_buffer, rademacher
from curvlab.spectra.trace import _project_out, orthonormal_basis
from tests.helpers import assert_close_rel
from tests.spectra_helpers import dense_operator


def test_exact_trace_matches_dense(spectra_problem):
    G = cl.GGN(spectra_problem)
    estimate = cl.trace(G, "exact")
    assert estimate.value == pytest.approx(reference.ggn(spectra_problem).trace().item(), rel=1e-10)
    assert estimate.standard_error == 0.0
    K = cl.KFAC(spectra_problem)
    assert cl.trace(K, "exact").value == pytest.approx(K.to_dense().trace().item(), rel=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimate_within_its_standard_error(spectra_problem, method):
    G = cl.GGN(spectra_problem)
    exact = reference.ggn(spectra_problem).trace().item()
    estimate = cl.trace(G, method, num_matvecs=60, seed=0, progress=False)
    assert estimate.num_matvecs == 60
    assert abs(estimate.value - exact) <= 4 * estimate.standard_error + 1e-10 * abs(exact)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_standard_error_is_calibrated(method):
    D = dense_operator(1.0 / torch.arange(1, 101, dtype=torch.float64))
    exact = D.trace().item()
    z = torch.tensor(
        [(lambda t: (t.value - exact) / t.standard_error)(cl.trace(D, method, 30, seed=s)) for s in range(60)]
    )
    assert (z.abs() < 2).double().mean() >= 0.8, z


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_is_reproducible(method):
    D = dense_operator(torch.linspace(0, 1, 80, dtype=torch.float64))
    assert cl.trace(D, method, 30, seed=2).value == cl.trace(D, method, 30, seed=2).value
    assert cl.trace(D, method, 30, seed=2).value != cl.trace(D, method, 30, seed=3).value


def test_hutchpp_has_lower_variance_than_hutchinson_at_equal_matvecs():
    # A decaying spectrum, where the sketch of Hutch++ captures the dominant part.
    D = dense_operator(1.0 / torch.arange(1, 201, dtype=torch.float64) ** 2)
    exact = D.trace().item()
    errors = {
        method: torch.tensor([cl.trace(D, method, 30, seed=s).value - exact for s in range(40)])
        for method in ("hutchinson", "hutch++")
    }
    mse = {method: (e**2).mean().item() for method, e in errors.items()}
    assert mse["hutch++"] < 0.2 * mse["hutchinson"], mse


def test_trace_rejects_too_few_matvecs():
    D = dense_operator(torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="hutch\\+\\+ needs"):
        cl.trace(D, "hutch++", 5)
    with pytest.raises(ValueError, match="method"):
        cl.trace(D, "girard")


def test_rademacher_probes_are_balanced_signs_and_chunk_independent():
    V = rademacher(1001, 6, torch.Generator().manual_seed(0), torch.float64, "cpu")
    assert set(V.unique().tolist()) == {-1.0, 1.0} and abs(V.mean().item()) < 0.05
    first = rademacher(1001, 2, torch.Generator().manual_seed(0), torch.float64, "cpu")
    assert torch.equal(first, V[:, :2])


def test_rademacher_probes_written_into_a_reused_buffer():
    generator = torch.Generator().manual_seed(0)
    expected = rademacher(1001, 5, torch.Generator().manual_seed(0), torch.float64, "cpu")
    # Each byte's eight signs are its bits, lowest first: the bit unpacking, written out.
    seeded = torch.Generator().manual_seed(0)
    random_bytes = torch.randint(0, 256, (5, 126), generator=seeded, dtype=torch.uint8)
    bits = torch.stack([(random_bytes.int() >> j) & 1 for j in range(8)], -1).reshape(5, -1)[:, :1001]
    assert torch.equal(expected, (2.0 * bits - 1).double().T)
    buffer = probe_buffer(1001, 3, torch.float64, "cpu")
    chunks = [rademacher(1001, k, generator, torch.float64, "cpu", out=buffer).clone() for k in (3, 2)]
    assert torch.equal(torch.cat(chunks, 1), expected)
    assert rademacher(1001, 2, generator, torch.float64, "cpu", out=buffer).data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="buffer"):
        rademacher(1001, 4, generator, torch.float64, "cpu", out=buffer)  # 3 rows only
    with pytest.raises(ValueError, match="buffer"):
        rademacher(1001, 2, generator, torch.float32, "cpu", out=buffer)


@pytest.mark.parametrize("layout", ["row-major", "probe-major"])
def test_orthonormal_basis_spans_the_columns(layout):
    Y = torch.randn(500, 7, dtype=torch.float64) @ torch.diag(torch.logspace(0, 4, 7, dtype=torch.float64))
    if layout == "probe-major":
        Y = Y.T.contiguous().T
    Q = orthonormal_basis(Y)
    assert_close_rel(Q.T @ Q, torch.eye(7, dtype=torch.float64), 1e-12, "orthonormal")
    assert_close_rel(Q @ (Q.T @ Y), Y, 1e-12, "same span")
    rank_deficient = torch.cat([Y[:, :3], Y[:, :3]], 1)
    Q = orthonormal_basis(rank_deficient)  # falls back to Householder QR
    assert_close_rel(Q @ (Q.T @ rank_deficient), rank_deficient, 1e-10, "span")


def test_projecting_out_a_basis():
    Q = orthonormal_basis(torch.randn(300, 4, dtype=torch.float64))
    V = torch.randn(5, 300, dtype=torch.float64).T  # probe-major, as rademacher draws them
    projected = _project_out(Q, V)
    assert_close_rel(projected, V - Q @ (Q.T @ V), 1e-13, "V − Q Qᵀ V")
    assert (Q.T @ projected).abs().max() < 1e-12
