"""Spectra: Lanczos top-k, traces, SLQ densities and diagnostics against dense linear algebra."""

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.errors import DataError
from curvlab.sampling import probe_buffer, rademacher
from curvlab.spectra import lanczos
from curvlab.spectra.lanczos import _random_unit, _start_vector, lanczos_tridiagonal
from curvlab.spectra.trace import _project_out, orthonormal_basis
from tests.cases import CASES
from tests.helpers import assert_close_rel

SPECTRA_CASES = [
    c for c in CASES if c.name in ("mlp_tanh_mse_mean", "mlp_relu_ce_mean_3batches", "conv2d_ce_mean")
]


def _dense_operator(eigenvalues: torch.Tensor, seed: int = 0) -> cl.DenseOperator:
    generator = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return cl.DenseOperator((Q * eigenvalues) @ Q.T, [(n,)])


def _assert_residuals_match(reported, true, norm):
    """Reported residual norms are the true ones: to 1e-6 relative, or to rounding (1e3 · eps · ‖C‖).

    The guard pairs (``top_eigen(guard=...)``) keep Lanczos going after the k have
    converged, so these often end at rounding level, where only the floor is meaningful.
    """
    floor = 1e3 * torch.finfo(true.dtype).eps * norm
    assert ((reported - true).abs() <= 1e-6 * true + floor).all(), (reported, true)


@pytest.fixture(params=SPECTRA_CASES, ids=lambda c: c.name)
def spectra_problem(request):
    return request.param.build(torch.float64)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigen_hessian_matches_eigvalsh(spectra_problem, which, k):
    H = cl.Hessian(spectra_problem)
    exact = torch.linalg.eigvalsh(reference.hessian_matrix(spectra_problem))
    key = {"largest": -exact, "smallest": exact, "magnitude": -exact.abs()}[which]
    expected = exact[torch.argsort(key)[:k]]
    result = cl.top_eigen(H, k, which, progress=False)
    assert result.converged
    assert_close_rel(result.values, expected, 1e-8, f"top-{k} {which}")
    assert (result.residuals <= 1e-6 * exact.abs().max()).all()
    H_dense = reference.hessian_matrix(spectra_problem)
    true_residuals = (H_dense @ result.vectors - result.vectors * result.values).norm(dim=0)
    _assert_residuals_match(result.residuals, true_residuals, exact.abs().max())
    assert_close_rel(
        result.vectors.T @ result.vectors, torch.eye(k, dtype=torch.float64), 1e-10, "orthonormal"
    )


def test_top_eigen_unpacks_to_values_and_vectors(spectra_problem):
    G = cl.GGN(spectra_problem)
    values, vectors = cl.top_eigen(G, 2, progress=False)
    assert values.shape == (2,) and vectors.shape == (G.shape[0], 2)


@pytest.mark.parametrize("basis_size", [6, 12])
def test_top_eigen_thick_restart_finds_clustered_eigenvalues(basis_size):
    eigenvalues = torch.cat(
        [
            torch.linspace(0, 1, 196, dtype=torch.float64),
            torch.tensor([1.5, 1.51, 1.52, 3.0], dtype=torch.float64),
        ]
    )
    D = _dense_operator(eigenvalues)
    result = cl.top_eigen(D, 4, basis_size=basis_size, tol=1e-9, progress=False)
    assert result.converged
    assert result.num_matvecs > basis_size  # it did restart
    assert_close_rel(result.values, torch.tensor([3.0, 1.52, 1.51, 1.5], dtype=torch.float64), 1e-12)


def test_top_eigen_default_basis_spans_a_small_space_without_restarts():
    """Smallest eigenvalues of a small singular PSD matrix with a cluster near zero.

    A thick-restarted 20-vector basis ran out of its 1000 products here without converging;
    the default basis of a small problem holds the whole space, so at most n products.
    """
    eigenvalues = torch.cat(
        [
            torch.zeros(30, dtype=torch.float64),
            torch.logspace(-8, -5, 30, dtype=torch.float64),
            torch.linspace(1, 40, 30, dtype=torch.float64),
        ]
    )
    tol = 1e-10
    result = cl.top_eigen(_dense_operator(eigenvalues), 4, which="smallest", tol=tol, progress=False)
    assert result.converged
    assert result.num_matvecs <= len(eigenvalues) + 4  # the basis, plus the residual check
    distance = (result.values[:, None] - eigenvalues[None, :]).abs().min(1).values
    assert (distance <= tol * 40).all(), distance  # |θ − λ| ≤ residual ≤ tol · ‖C‖
    assert result.values[0].abs() <= tol * 40


class _CountingOperator(cl.DenseOperator):
    """A dense operator that counts the vectors it multiplies (its matrix need not be symmetric)."""

    def __init__(self, matrix):
        super().__init__(matrix, [(matrix.shape[0],)])
        self.steps, self.confirming = 0, 0  # Lanczos steps' products, others

    def _matmat(self, Vs):
        self.confirming += Vs[0].shape[0]
        return super()._matmat(Vs)

    def _matvec_into(self, v, out):
        self.steps += 1
        return torch.mv(self.matrix, v, out=out)


def _true_residuals(matrix, result):
    return (matrix @ result.vectors - result.vectors * result.values).norm(dim=0)


@pytest.mark.parametrize("basis_size, restarts", [(None, False), (8, True)])
def test_top_eigen_residuals_are_those_of_the_products(basis_size, restarts):
    """Without a restart the residuals cost no product; with one, k confirming products. Both true."""
    top = torch.tensor([1.4, 1.6, 2.0, 3.0], dtype=torch.float64)
    eigenvalues = torch.cat([torch.linspace(0, 1, 56, dtype=torch.float64), top])
    D = _dense_operator(eigenvalues)
    counting = _CountingOperator(D.matrix)
    # No guard pairs: with them the 60-vector basis runs to n, residuals at rounding.
    result = cl.top_eigen(counting, 3, basis_size=basis_size, tol=1e-8, guard=0, progress=False)
    assert result.converged
    assert result.num_matvecs == counting.steps + counting.confirming
    assert counting.confirming == (3 if restarts else 0)
    assert (counting.steps > (basis_size or 60)) == restarts
    assert_close_rel(result.values, torch.tensor([3.0, 2.0, 1.6], dtype=torch.float64), 1e-10)
    assert_close_rel(result.residuals, _true_residuals(D.matrix, result), 1e-6, "reported residuals")


def test_recorded_residuals_include_what_an_asymmetric_product_adds():
    """A product that is not quite symmetric (say, rounding in a reduced-precision matmul).

    The three-term recurrence's estimate |β s| assumes the symmetric projection and
    misses the asymmetric part; the recorded coefficients carry it, so the reported
    residuals are the products' true ones and the run does not pass as converged.
    """
    n, tol = 200, 1e-10
    eigenvalues = torch.cat([torch.linspace(1, 2, n - 1, dtype=torch.float64), torch.tensor([3.0])])
    D = _dense_operator(eigenvalues)
    generator = torch.Generator().manual_seed(1)
    skew = torch.randn(n, n, generator=generator, dtype=torch.float64)
    matrix = D.matrix + 1e-6 * (skew - skew.T)
    counting = _CountingOperator(matrix)
    with pytest.warns(RuntimeWarning, match="not converged"):
        result = cl.top_eigen(counting, 1, tol=tol, max_matvecs=40, progress=False)
    assert counting.confirming == 0  # the basis holds all 40: no restart
    assert_close_rel(result.values, torch.tensor([3.0], dtype=torch.float64), 1e-8)
    true = _true_residuals(matrix, result)
    assert (true > 100 * tol * 3.0).all()
    assert_close_rel(result.residuals, true, 1e-6, "residuals of the asymmetric products")


@pytest.mark.parametrize("budget", [64, 10**9])
def test_restart_combines_basis_rows_in_place_in_column_blocks(monkeypatch, budget):
    monkeypatch.setattr(lanczos, "block_budget", lambda device: budget)  # 64 B: two columns a block
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(7, 13, generator=generator, dtype=torch.float64)
    Q = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    expected = torch.cat([Q.T @ V[:6], V[4:]])
    lanczos._combine_rows_in_place(V, 6, Q)
    assert_close_rel(V, expected, 1e-14, "combined rows")


def test_top_eigen_is_reproducible_and_seed_dependent():
    D = _dense_operator(torch.linspace(-1, 2, 120, dtype=torch.float64))
    first = cl.top_eigen(D, 2, seed=3, progress=False)
    again = cl.top_eigen(D, 2, seed=3, progress=False)
    other = cl.top_eigen(D, 2, seed=4, progress=False)
    assert torch.equal(first.values, again.values) and torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.vectors, other.vectors)


def test_top_eigen_of_a_low_rank_matrix_exhausts_the_krylov_space():
    eigenvalues = torch.zeros(50, dtype=torch.float64)
    eigenvalues[:3] = torch.tensor([2.0, 1.0, 0.5])
    result = cl.top_eigen(_dense_operator(eigenvalues), 3, progress=False)
    assert_close_rel(result.values, eigenvalues[:3], 1e-12)


def test_guard_pairs_find_an_eigenvalue_a_cluster_hides():
    """A cluster of 12 within 2e-3 below the top, spacings near the tolerance 1e-4.

    Without guard pairs this start reports all ten converged and misses one of the
    cluster (the k-th place goes to the next eigenvalue, 9.6e-4 off); the default two
    guard pairs must converge too and resolve it. (Misses are made rarer, not
    impossible: SciPy's ARPACK at the same tolerance missed one on 12 of 30 such
    spectra, curvlab on 24 without a guard, 18 with 2, none with 5.)
    """
    generator = torch.Generator().manual_seed(105)
    n = 600
    eigenvalues = torch.cat(
        [
            torch.tensor([1.0], dtype=torch.float64),
            0.976 + 2e-3 * torch.rand(12, generator=generator, dtype=torch.float64),
            0.3 * torch.rand(n - 13, generator=generator, dtype=torch.float64),
        ]
    )
    exact = eigenvalues.sort(descending=True).values[:10]
    D = _dense_operator(eigenvalues, seed=5)
    unguarded = cl.top_eigen(D, 10, tol=1e-4, basis_size=30, guard=0, seed=5, progress=False)
    assert unguarded.converged and (unguarded.values - exact).abs().max() > 5e-4  # the miss
    guarded = cl.top_eigen(D, 10, tol=1e-4, basis_size=30, seed=5, progress=False)
    assert guarded.converged
    assert (guarded.values - exact).abs().max() <= 1e-8


def test_guard_is_checked_and_clipped():
    D = _dense_operator(torch.linspace(1, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="guard"):
        cl.top_eigen(D, 2, guard=-1, progress=False)
    result = cl.top_eigen(D, 7, guard=5, progress=False)  # at most n − k = 1 guard pair
    assert_close_rel(result.values, torch.linspace(2, 1, 8, dtype=torch.float64)[:7], 1e-10)
    result = cl.top_eigen(D, 3, basis_size=4, guard=5, progress=False)  # at most basis_size − k − 1
    assert_close_rel(result.values, torch.linspace(2, 1, 8, dtype=torch.float64)[:3], 1e-8)


def _large_float32_diagonal(n: int, top: list[float]) -> tuple[cl.Diagonal, torch.Tensor]:
    """diag(d) of n float32 entries, uniform in [0, 0.5) below a given top: (operator, d)."""
    generator = torch.Generator().manual_seed(0)
    d = 0.5 * torch.rand(n, generator=generator)
    d[: len(top)] = torch.tensor(top)
    return cl.Diagonal.from_tensor(d, [(n,)]), d


def test_top_eigen_in_float32_on_a_million_parameters_converges_to_unit_ritz_vectors():
    """Float32 reductions over 10⁶ entries: torch's vector norm was 1e-5 off there.

    Basis vectors normalised by it drifted from unit length, the Ritz vectors with
    them (‖v‖ − 1 ≈ 6e-5), so v·Cv and the residual ‖Cv − (v·Cv) v‖ stayed above
    the 1e-4 tolerance: 1000 products without convergence for what takes ~30.
    """
    top = [1.0, 0.999, 0.998, 0.997, 0.996]
    for basis_size in (None, 12):  # the default (20 vectors at this n) and a smaller one restart
        D, d = _large_float32_diagonal(1_000_000, top)
        result = cl.top_eigen(D, 3, basis_size=basis_size, progress=False)
        assert result.converged and result.num_matvecs <= 100, result.num_matvecs
        vectors = result.vectors.double()
        norms = vectors.norm(dim=0)
        assert_close_rel(norms, torch.ones(3, dtype=torch.float64), 1e-6, "unit Ritz vectors")
        rayleigh = (vectors * (d.double()[:, None] * vectors)).sum(0) / norms**2
        assert_close_rel(result.values.double(), rayleigh, 1e-6, "values are the vectors' Rayleigh quotients")
        assert_close_rel(result.values.double(), torch.tensor(top[:3], dtype=torch.float64), 1e-6)
        true_residuals = (d.double()[:, None] * vectors - vectors * result.values.double()).norm(dim=0)
        assert (true_residuals <= 1e-4).all(), true_residuals


def test_lanczos_tridiagonal_in_float32_of_several_probes_matches_float64():
    """Several probes of two million entries: T's coefficients to float32 rounding.

    ``bmm`` of (p, 1, n) by (p, n, 1) took α = v·Cv 2e-3 off here (a plainly
    accumulating kernel); the coefficients are now dots (``lanczos._row_dots``).
    """
    D, d = _large_float32_diagonal(2_000_000, [1.0])
    V0 = torch.randn(d.numel(), 2, generator=torch.Generator().manual_seed(1))
    alpha, beta, _ = lanczos_tridiagonal(D, V0, 4)
    D64 = cl.Diagonal.from_tensor(d.double(), [(d.numel(),)])
    alpha64, beta64, _ = lanczos_tridiagonal(D64, V0.double(), 4)
    assert_close_rel(alpha.double(), alpha64, 1e-5, "alpha")
    assert_close_rel(beta.double(), beta64, 1e-5, "beta")


def test_top_eigen_warns_when_not_converged():
    D = _dense_operator(torch.linspace(0, 1, 300, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="not converged"):
        result = cl.top_eigen(D, 1, max_matvecs=5, tol=1e-12, progress=False)
    assert not result.converged


def test_top_eigen_rejects_bad_arguments():
    D = _dense_operator(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="which"):
        cl.top_eigen(D, 1, "biggest")
    with pytest.raises(ValueError, match="between 1 and n"):
        cl.top_eigen(D, 6)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_top_eigen_start_vectors_all_reach_the_exact_top_eigenvalues(spectra_problem, curvature):
    C = cl.Hessian(spectra_problem) if curvature == "hessian" else cl.GGN(spectra_problem)
    dense = (
        reference.hessian_matrix(spectra_problem)
        if curvature == "hessian"
        else reference.ggn(spectra_problem)
    )
    expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
    given = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = {
        start: cl.top_eigen(C, 3, start=start, progress=False) for start in ("auto", "gradient", "random")
    }
    results["tensor"] = cl.top_eigen(C, 3, start=given, progress=False)
    for start, result in results.items():
        assert result.converged, start
        assert_close_rel(result.values, expected, 1e-8, f"start={start}")
    # "auto" is the gradient start for a problem operator's largest eigenvalues.
    assert torch.equal(results["auto"].values, results["gradient"].values)


def test_gradient_start_mixes_the_gradient_with_an_equal_random_part(spectra_problem):
    H = cl.Hessian(spectra_problem)
    g = spectra_problem.gradient()
    n = H.shape[0]
    random = _random_unit(n, torch.float64, "cpu", torch.Generator().manual_seed(7))
    start = _start_vector(H, "gradient", "largest", n, torch.float64, "cpu", torch.Generator().manual_seed(7))
    expected = g / g.norm() + random
    assert_close_rel(start, expected / expected.norm(), 1e-12, "start")
    smallest = _start_vector(H, "auto", "smallest", n, torch.float64, "cpu", torch.Generator().manual_seed(7))
    assert torch.equal(smallest, random)  # the gradient does not point at the smallest eigenvalues


def test_gradient_start_falls_back_to_random_where_the_gradient_vanishes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(X)  # zero residuals: ∇R = 0 exactly
    problem = cl.Problem(model, nn.MSELoss(), (X, y))
    H = cl.Hessian(problem)
    assert H.gradient().abs().max() == 0
    n = H.shape[0]
    start = _start_vector(H, "gradient", "largest", n, torch.float64, "cpu", torch.Generator().manual_seed(1))
    assert torch.equal(start, _random_unit(n, torch.float64, "cpu", torch.Generator().manual_seed(1)))
    exact = torch.linalg.eigvalsh(reference.hessian_matrix(problem)).flip(0)[:2]
    assert_close_rel(cl.top_eigen(H, 2, progress=False).values, exact, 1e-8)


def test_top_eigen_rejects_bad_start_vectors(spectra_problem):
    D = _dense_operator(torch.linspace(1, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a curvature object of a problem"):
        cl.top_eigen(D, 1, start="gradient")
    with pytest.raises(ValueError, match="start must be one of"):
        cl.top_eigen(D, 1, start="ones")
    with pytest.raises(DataError, match="flat"):
        cl.top_eigen(D, 1, start=torch.ones(4, dtype=torch.float64))
    with pytest.raises(DataError, match="nonzero"):
        cl.top_eigen(D, 1, start=torch.zeros(5, dtype=torch.float64))


def test_hessian_gradient_read_off_the_cached_graph(spectra_problem):
    # Cached graphs are those of c · loss: the gradient and the products carry the
    # reduction factor once, with one batch or several.
    H = cl.Hessian(spectra_problem, cache_graph=True)
    assert_close_rel(H.gradient(), spectra_problem.gradient(), 1e-12, "gradient")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_close_rel(H @ V, reference.hessian_matrix(spectra_problem) @ V, 1e-10, "products")
    assert_close_rel(H @ V[:, 0], reference.hessian_matrix(spectra_problem) @ V[:, 0], 1e-10, "one column")


def test_matvec_into_writes_the_product_in_place(spectra_problem):
    v = torch.randn(
        cl.GGN(spectra_problem).shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    for C in (cl.Hessian(spectra_problem), cl.GGN(spectra_problem), cl.KFAC(spectra_problem)):
        out = torch.full((2, v.numel()), float("nan"), dtype=torch.float64)
        returned = C._matvec_into(v, out[1])
        assert returned.data_ptr() == out[1].data_ptr()
        assert_close_rel(out[1], C @ v, 1e-14, type(C).__name__)
        assert torch.isnan(out[0]).all()


def test_top_eigen_on_kfac_finds_its_distinct_top_eigenvalues():
    # Kronecker products repeat eigenvalues; single-vector Lanczos finds each
    # distinct eigenvalue once (documented), so compare with the distinct ones.
    problem = CASES[0].build(torch.float64)
    K = cl.KFAC(problem)
    exact = cl.eigvalsh(K).flip(0)
    distinct = [exact[0]]
    for value in exact[1:]:
        if distinct[-1] - value > 1e-8 * exact[0]:
            distinct.append(value)
    result = cl.top_eigen(K, 3, progress=False)
    assert_close_rel(result.values, torch.stack(distinct[:3]), 1e-8)


# ------------------------------------------------------------------ traces
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
    D = _dense_operator(1.0 / torch.arange(1, 101, dtype=torch.float64))
    exact = D.trace().item()
    z = torch.tensor(
        [(lambda t: (t.value - exact) / t.standard_error)(cl.trace(D, method, 30, seed=s)) for s in range(60)]
    )
    assert (z.abs() < 2).double().mean() >= 0.8, z


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_is_reproducible(method):
    D = _dense_operator(torch.linspace(0, 1, 80, dtype=torch.float64))
    assert cl.trace(D, method, 30, seed=2).value == cl.trace(D, method, 30, seed=2).value
    assert cl.trace(D, method, 30, seed=2).value != cl.trace(D, method, 30, seed=3).value


def test_hutchpp_has_lower_variance_than_hutchinson_at_equal_matvecs():
    # A decaying spectrum, where the sketch of Hutch++ captures the dominant part.
    D = _dense_operator(1.0 / torch.arange(1, 201, dtype=torch.float64) ** 2)
    exact = D.trace().item()
    errors = {
        method: torch.tensor([cl.trace(D, method, 30, seed=s).value - exact for s in range(40)])
        for method in ("hutchinson", "hutch++")
    }
    mse = {method: (e**2).mean().item() for method, e in errors.items()}
    assert mse["hutch++"] < 0.2 * mse["hutchinson"], mse


def test_trace_rejects_too_few_matvecs():
    D = _dense_operator(torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="hutch\\+\\+ needs"):
        cl.trace(D, "hutch++", 5)
    with pytest.raises(ValueError, match="method"):
        cl.trace(D, "girard")


# ------------------------------------------------------------------ spectral density
def test_slq_density_integrates_to_one_and_is_nonnegative(spectra_problem):
    density = cl.spectral_density(cl.Hessian(spectra_problem), num_probes=8, lanczos_steps=20, progress=False)
    assert (density.density >= 0).all()
    assert torch.trapezoid(density.density, density.grid).item() == pytest.approx(1.0, abs=1e-6)
    assert_close_rel(density.weights.sum(1), torch.ones(8, dtype=torch.float64), 1e-12, "weights")


def test_slq_quadrature_reproduces_probe_moments_exactly():
    # Gauss quadrature with m nodes is exact for vᵀ C^p v, p ≤ 2m − 1, for the probe v.
    D = _dense_operator(torch.linspace(-1, 3, 60, dtype=torch.float64))
    M = D.to_dense()
    density = cl.spectral_density(D, num_probes=1, lanczos_steps=6, seed=7, progress=False)
    v = rademacher(60, 1, torch.Generator().manual_seed(7), torch.float64, "cpu").squeeze(1)
    for power in range(0, 12):
        expected = (v @ torch.linalg.matrix_power(M, power) @ v).item() / 60
        assert density.moment(power) == pytest.approx(expected, rel=1e-9, abs=1e-12), power


def test_slq_moments_match_trace_moments(spectra_problem):
    G = reference.ggn(spectra_problem)
    n = G.shape[0]
    density = cl.spectral_density(
        cl.GGN(spectra_problem), num_probes=200, lanczos_steps=10, seed=0, progress=False
    )
    for power in (1, 2):
        exact = torch.linalg.matrix_power(G, power).trace().item() / n
        # Rademacher quadratic forms: relative spread well under 1/√(probes) · 3 here.
        assert density.moment(power) == pytest.approx(exact, rel=0.25), power


def test_slq_with_full_steps_recovers_the_eigenvalues():
    eigenvalues = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    density = cl.spectral_density(_dense_operator(eigenvalues), num_probes=4, lanczos_steps=6, progress=False)
    nodes = density.nodes[density.weights > 1e-12]
    for node in nodes:
        assert (eigenvalues - node).abs().min() < 1e-10


def test_slq_is_reproducible():
    D = _dense_operator(torch.linspace(0, 1, 40, dtype=torch.float64))
    a = cl.spectral_density(D, num_probes=3, lanczos_steps=5, seed=1, progress=False)
    b = cl.spectral_density(D, num_probes=3, lanczos_steps=5, seed=1, probes_per_pass=1, progress=False)
    assert_close_rel(a.density, b.density, 1e-12, "density does not depend on batching of probes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_tridiagonal_after_an_invariant_subspace_is_zero_not_nan(dtype):
    # The zero matrix breaks down at once, diag(1, 2, 0, …) after three steps:
    # entries beyond each T's length are 0 (documented), in float32 too.
    for matrix, length in ((torch.zeros(6, 6), 1), (torch.diag(torch.tensor([1.0, 2, 0, 0, 0, 0])), 3)):
        alpha, beta, lengths = lanczos_tridiagonal(matrix.to(dtype), torch.ones(6, 2, dtype=dtype), 5)
        assert lengths.tolist() == [length, length]
        assert torch.isfinite(alpha).all() and torch.isfinite(beta).all()
        assert (alpha[:, length:] == 0).all() and (beta[:, length - 1 :] == 0).all()


def test_slq_of_a_problem_operator_does_not_depend_on_probes_per_pass(spectra_problem):
    # One probe a pass writes each product straight into the basis; several go
    # through one batched product: the same tridiagonal matrices either way.
    H = cl.Hessian(spectra_problem)
    a = cl.spectral_density(H, num_probes=3, lanczos_steps=8, seed=2, progress=False)
    b = cl.spectral_density(H, num_probes=3, lanczos_steps=8, seed=2, probes_per_pass=1, progress=False)
    assert_close_rel(b.nodes, a.nodes, 1e-10, "nodes")
    assert_close_rel(b.weights, a.weights, 1e-10, "weights")


# ------------------------------------------------------------------ diagnostics
def test_condition_number_exact_uses_the_rank_cutoff(spectra_problem):
    G = cl.GGN(spectra_problem)
    eigenvalues = torch.linalg.eigvalsh(reference.ggn(spectra_problem))
    result = cl.condition_number(G, rtol=1e-6, method="exact")
    above = eigenvalues[eigenvalues > 1e-6 * eigenvalues[-1]]
    assert result.rank == len(above)
    assert result.value == pytest.approx((eigenvalues[-1] / above[0]).item(), rel=1e-8)


def test_condition_number_by_lanczos_matches_exact_for_a_definite_matrix():
    D = _dense_operator(torch.logspace(-2, 1, 150, dtype=torch.float64))
    exact = cl.condition_number(D, method="exact")
    lanczos = cl.condition_number(D, method="lanczos", progress=False, tol=1e-8, basis_size=60)
    assert lanczos.value == pytest.approx(exact.value, rel=1e-6) and exact.value == pytest.approx(
        1000, rel=1e-10
    )


def test_condition_number_of_a_singular_matrix_by_lanczos_is_infinite():
    eigenvalues = torch.cat(
        [torch.zeros(20, dtype=torch.float64), torch.linspace(1, 2, 30, dtype=torch.float64)]
    )
    result = cl.condition_number(_dense_operator(eigenvalues), method="lanczos", progress=False)
    assert math.isinf(result.value)
    assert cl.condition_number(_dense_operator(eigenvalues), method="exact").value == pytest.approx(2.0)


def test_negative_eigenvalue_share(spectra_problem):
    H = cl.Hessian(spectra_problem)
    eigenvalues = torch.linalg.eigvalsh(reference.hessian_matrix(spectra_problem))
    expected = (eigenvalues < -1e-8 * eigenvalues.abs().max()).double().mean().item()
    assert cl.negative_eigenvalue_share(H, method="exact") == pytest.approx(expected)
    estimate = cl.negative_eigenvalue_share(H, method="slq", num_probes=100, lanczos_steps=30, progress=False)
    assert estimate == pytest.approx(expected, abs=0.08)


def test_curvature_along_the_gradient(spectra_problem):
    H = cl.Hessian(spectra_problem)
    g = spectra_problem.gradient()
    H_dense = reference.hessian_matrix(spectra_problem)
    result = cl.curvature_along_gradient(H)
    gHg = (g @ H_dense @ g).item()
    assert result.g_dot_g == pytest.approx((g @ g).item(), rel=1e-12)
    assert result.g_C_g == pytest.approx(gHg, rel=1e-10)
    if gHg > 0:
        assert result.best_step == pytest.approx((g @ g).item() / gHg, rel=1e-10)
        assert result.predicted_decrease == pytest.approx((g @ g).item() ** 2 / (2 * gHg), rel=1e-10)


def test_problem_gradient_matches_autograd_on_the_risk(spectra_problem):
    problem = spectra_problem
    total = sum(problem.batch_loss(problem.params, X, y) for X, y in problem.batches())
    grads = torch.autograd.grad(total * problem.reduction_factor, problem.params)
    assert_close_rel(problem.gradient(), torch.cat([g.reshape(-1) for g in grads]), 1e-12, "gradient")


def test_learning_rate_is_inverse_top_eigenvalue(spectra_problem):
    G = cl.GGN(spectra_problem)
    lambda_max = torch.linalg.eigvalsh(reference.ggn(spectra_problem))[-1].item()
    assert cl.learning_rate(G, progress=False) == pytest.approx(1 / lambda_max, rel=1e-8)


# ------------------------------------------------------------------ Hessian graph cache
def test_cached_hessian_follows_in_place_parameter_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    problem = cl.Problem(model, nn.MSELoss(), data)
    cached = cl.Hessian(problem)
    assert cached._caching()
    v = torch.randn(cached.shape[0], dtype=torch.float64)
    before = cached @ v
    assert_close_rel(cached @ v, before, 1e-14, "cache reused")
    with torch.no_grad():
        model[0].weight.add_(0.5)
    assert_close_rel(cached @ v, cl.Hessian(problem, cache_graph=False) @ v, 1e-12, "after the update")
    assert_close_rel(cached @ v, reference.hessian_matrix(problem) @ v, 1e-10, "reference")


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


def test_exact_spectra_of_plain_tensors_and_small_ranks():
    D = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.equal(cl.eigvalsh(D), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert cl.condition_number(D).value == pytest.approx(3.0)
    single = torch.tensor([[4.0]], dtype=torch.float64)
    assert cl.condition_number(single).value == 1.0  # one positive eigenvalue: κ = 1
    rank_one = torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 4.0)).double()
    result = cl.condition_number(rank_one)
    assert result.rank == 1 and result.value == pytest.approx(1.0)
    assert math.isinf(cl.condition_number(torch.zeros(3, 3, dtype=torch.float64)).value)
