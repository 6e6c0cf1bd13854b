"""KFAC's low-rank input factors (A = ZᵀZ kept as Z) against the dense factors, float64, ≤ 1e-10."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.optim import state as curvature_state
from curvlab.structured.kronecker import EigenbasisBlock, KroneckerBlock, LowRankKroneckerBlock
from tests.helpers import assert_close_rel

F64 = torch.float64


def _problem(kind: str, n: int = 3, batches: int = 1, loss=nn.CrossEntropyLoss):
    """A small problem whose input factors have more columns than averaged input vectors."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3)), (12,)
    else:  # a strided conv: few locations, 3·3·3 + 1 = 28 input columns
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
        shape = (3, 3, 3)
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(n, *shape, generator=generator, dtype=F64),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for _ in range(batches)
    ]
    return cl.Problem(model.double(), loss(), data if batches > 1 else data[0])


CASES = [
    ("mlp", "type-2", "expand", False),
    ("mlp", "mc", "expand", True),
    ("mlp", "empirical", "expand", False),
    ("conv", "type-2", "expand", False),
    ("conv", "type-2", "reduce", True),
    ("conv", "empirical", "expand", True),
]


def _pair(kind, fisher_type, approx, separate, **problem_options):
    problem = _problem(kind, **problem_options)
    options = {"fisher_type": fisher_type, "kfac_approx": approx, "separate_weight_and_bias": separate}
    return cl.KFAC(problem, low_rank=False, **options), cl.KFAC(problem, low_rank=True, **options)


@pytest.mark.parametrize("kind, fisher_type, approx, separate", CASES)
def test_low_rank_equals_dense_factors(kind, fisher_type, approx, separate):
    dense, low = _pair(kind, fisher_type, approx, separate)
    assert all(type(b) is KroneckerBlock for b in dense.block_operators)
    assert any(type(b) is LowRankKroneckerBlock for b in low.block_operators)
    for block in low.block_operators:
        if isinstance(block, LowRankKroneckerBlock):
            assert block.Z.shape[0] < block.Z.shape[1]
    D = dense.to_dense()
    n = D.shape[0]
    assert_close_rel(low.to_dense(), D, 1e-12, "to_dense")
    assert_close_rel(low.eigvalsh(), torch.linalg.eigvalsh(D), 1e-10, "eigvalsh")
    assert_close_rel(low.diag(), D.diagonal(), 1e-12, "diag")
    assert_close_rel(low.trace(), D.trace(), 1e-12, "trace")
    assert_close_rel(low.frobenius_norm(), D.norm(), 1e-12, "frobenius")
    v = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    for damping in (1e-3, 0.5):
        shifted = D + damping * torch.eye(n, dtype=F64)
        assert_close_rel(low.solve(v, damping), torch.linalg.solve(shifted, v), 1e-10, "solve")
        inverse = low.inverse(damping)
        assert_close_rel(inverse.to_dense(), torch.linalg.inv(shifted), 1e-10, "inverse")
        assert_close_rel(inverse.eigvalsh(), torch.linalg.eigvalsh(torch.linalg.inv(shifted)), 1e-10)
        assert_close_rel(inverse.diag(), torch.linalg.inv(shifted).diagonal(), 1e-10, "inverse diag")
        assert_close_rel(inverse.trace(), torch.linalg.inv(shifted).trace(), 1e-10, "inverse trace")
        assert_close_rel(low.logdet(damping), torch.linalg.slogdet(shifted)[1], 1e-10, "logdet")
        # π-damping: the factored inverse, the same on both representations
        assert_close_rel(
            low.inverse(damping, pi_damping=True).to_dense(),
            dense.inverse(damping, pi_damping=True).to_dense(),
            1e-10,
            "pi-damped inverse",
        )


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_compare_is_the_same_on_both_representations(kind):
    dense, low = _pair(kind, "type-2", "expand", False)
    exact = cl.GGN(dense.problem)
    expected, got = cl.compare(dense, exact, k=4).overall, cl.compare(low, exact, k=4).overall
    for key, value in expected.items():
        assert_close_rel(torch.tensor(got[key], dtype=F64), torch.tensor(value, dtype=F64), 1e-10, key)


def test_rank_deficient_block_without_damping_is_refused():
    _, low = _pair("mlp", "type-2", "expand", False)
    with pytest.raises(ValueError, match="singular"):
        low.inverse(0.0)


def test_factored_gradient_product_uses_z():
    """(G ⊗ ZᵀZ) applied to UᵀX from the factors equals the dense block's."""
    dense, low = _pair("mlp", "type-2", "expand", False)
    generator = torch.Generator().manual_seed(5)
    for d_block, l_block in zip(dense.block_operators, low.block_operators):
        d_A = d_block.A.shape[0]
        U = torch.randn(5, d_block.d_out, dtype=F64, generator=generator)
        X = torch.randn(5, d_A, dtype=F64, generator=generator)
        assert_close_rel(l_block.outer_sum_product(U, X), d_block.outer_sum_product(U, X), 1e-12)
        inverse_low, inverse_dense = l_block.inverse(0.1), d_block.inverse(0.1)
        assert_close_rel(inverse_low.outer_sum_product(U, X), inverse_dense.outer_sum_product(U, X), 1e-10)


def test_auto_keeps_wide_factors_low_rank_and_narrow_ones_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1100, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 1100, dtype=F64), torch.randint(0, 3, (8,))
    kfac = cl.KFAC(cl.Problem(model, nn.CrossEntropyLoss(), (X, y)))  # low_rank="auto"
    first, second = kfac.block_operators
    assert type(first) is LowRankKroneckerBlock and first.Z.shape == (8, 1101)
    assert type(second) is KroneckerBlock  # 7 columns: dense
    reference = cl.KFAC(kfac.problem, low_rank=False)
    v = torch.randn(kfac.shape[0], dtype=F64)
    assert_close_rel(kfac @ v, reference @ v, 1e-12)
    assert_close_rel(kfac.solve(v, 1e-2), reference.solve(v, 1e-2), 1e-10)


def test_more_input_vectors_than_columns_fall_back_to_dense():
    """Rows collected over batches past d_A − 1 are summed densely: the same A either way."""
    problem = _problem("mlp", n=5, batches=2)  # 10 input vectors: 13 columns in layer 1, 8 in layer 2
    low, dense = cl.KFAC(problem, low_rank=True), cl.KFAC(problem, low_rank=False)
    assert [type(b) for b in low.block_operators] == [LowRankKroneckerBlock, KroneckerBlock]
    assert low.block_operators[0].Z.shape == (10, 13)
    assert_close_rel(low.to_dense(), dense.to_dense(), 1e-12)


def test_store_keeps_the_root_not_the_dense_factor(tmp_path):
    _, low = _pair("conv", "type-2", "expand", True)
    store = cl.Store(tmp_path / "run.h5")
    store.save("kfac", low)
    (record,) = store.records(name="kfac")
    stored = [factors for factors in record.data.values() if "Z" in factors]
    assert stored and all("A" not in factors for factors in stored)
    restored = record.result()
    assert [type(b) for b in restored.block_operators] == [type(b) for b in low.block_operators]
    assert_close_rel(restored.to_dense(), low.to_dense(), 1e-14)


def test_snapshot_and_running_average():
    dense, low = _pair("mlp", "type-2", "expand", False)
    shapes, names = low.param_shapes, low.param_names
    copy = curvature_state.restore(curvature_state.snapshot(low), shapes, names, F64, low.device)
    assert [type(b) for b in copy.block_operators] == [type(b) for b in low.block_operators]
    assert_close_rel(copy.to_dense(), low.to_dense(), 1e-15)
    inverse = low.inverse(0.1)
    assert isinstance(inverse.block_operators[0], EigenbasisBlock)
    assert inverse.block_operators[0].complement is not None
    restored = curvature_state.restore(curvature_state.snapshot(inverse), shapes, names, F64, low.device)
    assert_close_rel(restored.to_dense(), inverse.to_dense(), 1e-15)
    # 0.7·old + 0.3·new, factor by factor: the same whether the factors are roots or dense
    other = _problem("mlp", n=3, batches=2)  # the same model on other data (6 rows < 13 columns)
    new_low, new_dense = cl.KFAC(other, low_rank=True), cl.KFAC(other, low_rank=False)
    expected = curvature_state.running_average(dense, new_dense, 0.7)
    averaged = curvature_state.running_average(low, new_low, 0.7)
    assert type(averaged.block_operators[0]) is LowRankKroneckerBlock
    assert averaged.block_operators[0].Z.shape == (3 + 6, 13)  # the rows of both roots
    assert_close_rel(averaged.to_dense(), expected.to_dense(), 1e-12)
    mixed = curvature_state.running_average(dense, new_low, 0.7)  # against a dense factor: dense
    assert all(type(b) is KroneckerBlock for b in mixed.block_operators)
    assert_close_rel(mixed.to_dense(), expected.to_dense(), 1e-12)


def test_ekfac_refuses_low_rank():
    with pytest.raises(ValueError, match="low_rank"):
        cl.EKFAC(_problem("mlp"), low_rank=True)


def test_bad_low_rank_option():
    with pytest.raises(ValueError, match="low_rank"):
        cl.KFAC(_problem("mlp"), low_rank="sometimes")
