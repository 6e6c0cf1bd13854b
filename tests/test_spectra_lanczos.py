"""Lanczos top-k (``cl.top_eigen``) against dense eigendecompositions: starts, restarts, guards, float32."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.errors import DataError
from curvlab.spectra import lanczos
from curvlab.spectra.lanczos import _random_unit, _start_vector, lanczos_tridiagonal
from tests.cases import CASES
from tests.helpers import assert_close_rel
from tests.spectra_helpers import assert_residuals_match, dense_operator


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
    assert_residuals_match(result.residuals, true_residuals, exact.abs().max())
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
    D = dense_operator(eigenvalues)
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
    result = cl.top_eigen(dense_operator(eigenvalues), 4, which="smallest", tol=tol, progress=False)
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
    D = dense_operator(eigenvalues)
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
    D = dense_operator(eigenvalues)
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
    D = dense_operator(torch.linspace(-1, 2, 120, dtype=torch.float64))
    first = cl.top_eigen(D, 2, seed=3, progress=False)
    again = cl.top_eigen(D, 2, seed=3, progress=False)
    other = cl.top_eigen(D, 2, seed=4, progress=False)
    assert torch.equal(first.values, again.values) and torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.vectors, other.vectors)


def test_top_eigen_of_a_low_rank_matrix_exhausts_the_krylov_space():
    eigenvalues = torch.zeros(50, dtype=torch.float64)
    eigenvalues[:3] = torch.tensor([2.0, 1.0, 0.5])
    result = cl.top_eigen(dense_operator(eigenvalues), 3, progress=False)
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
    D = dense_operator(eigenvalues, seed=5)
    unguarded = cl.top_eigen(D, 10, tol=1e-4, basis_size=30, guard=0, seed=5, progress=False)
    assert unguarded.converged and (unguarded.values - exact).abs().max() > 5e-4  # the miss
    guarded = cl.top_eigen(D, 10, tol=1e-4, basis_size=30, seed=5, progress=False)
    assert guarded.converged
    assert (guarded.values - exact).abs().max() <= 1e-8


def test_guard_is_checked_and_clipped():
    D = dense_operator(torch.linspace(1, 2, 8, dtype=torch.float64))
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
    D = dense_operator(torch.linspace(0, 1, 300, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="not converged"):
        result = cl.top_eigen(D, 1, max_matvecs=5, tol=1e-12, progress=False)
    assert not result.converged


def test_top_eigen_rejects_bad_arguments():
    D = dense_operator(torch.ones(5, dtype=torch.float64))
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
    D = dense_operator(torch.linspace(1, 2, 5, dtype=torch.float64))
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
