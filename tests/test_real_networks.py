"""Real architectures: a transformer language model (dense ground truth) and torchvision's ResNet-18.

The transformer is small enough for ``curvlab.reference``'s dense float64 matrices;
ResNet-18 (11 M parameters, adapted to 32×32 inputs) runs every matrix-free route on
two examples and is checked by identities that need no dense matrix.
"""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.helpers import assert_close_rel

F64 = torch.float64


class TinyLanguageModel(nn.Module):
    """Embedding → one ``nn.TransformerEncoderLayer`` → vocabulary logits, ``(N, vocab, T)`` for CE."""

    def __init__(self, vocab: int = 10, width: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embedding(tokens))).permute(0, 2, 1)


def _language_problem():
    torch.manual_seed(0)
    model = TinyLanguageModel().double().eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 10, (n, 5), generator=generator), torch.randint(0, 10, (n, 5), generator=generator))
        for n in (3, 2)
    ]
    return cl.Problem(model, nn.CrossEntropyLoss(), batches)


@pytest.fixture(scope="module")
def language():
    problem = _language_problem()
    return problem, reference.ggn(problem)


@pytest.mark.parametrize(
    "build, dense",
    [
        (cl.GGN, reference.ggn),
        (cl.Fisher, reference.fisher),
        (cl.EmpiricalFisher, reference.empirical_fisher),
        (cl.Hessian, reference.hessian_matrix),
    ],
    ids=["ggn", "fisher", "ef", "hessian"],
)
def test_transformer_matrices_equal_their_definitions(build, dense):
    problem = _language_problem()
    operator = build(problem)
    expected = dense(problem)
    assert_close_rel(operator.to_dense(), expected, 1e-10, build.__name__)
    v = torch.randn(operator.shape[0], 2, dtype=F64)
    assert_close_rel(operator @ v, expected @ v, 1e-10, f"{build.__name__} products")


@pytest.mark.parametrize("other", ["exact", "diagonal"])
def test_transformer_kfac_gives_its_other_parameters_their_exact_block_or_diagonal(language, other):
    """Embedding, LayerNorm and attention's packed projections have no Kronecker rule."""
    problem, G = language
    K = cl.KFAC(problem, other_structure=other)
    assert K.unsupported  # the embedding, the norms, in_proj_weight/bias
    offsets = cl.GGN(problem).block_offsets()
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in K.unsupported])
    dense = K.to_dense()[index][:, index]
    if other == "diagonal":
        assert_close_rel(torch.diagonal(dense), torch.diagonal(G[index][:, index]), 1e-10, "diagonal")
        assert_close_rel(dense, torch.diag(torch.diagonal(dense)), 1e-12, "nothing off the diagonal")
    else:  # one exact block per module: equal to G on every module's own block
        blocks = [b for b in K.block_indices if set(b) <= set(K.unsupported)]
        for indices in blocks:
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
            assert_close_rel(K.to_dense()[rows][:, rows], G[rows][:, rows], 1e-10, str(indices))
    report = cl.compare(K, cl.GGN(problem), k=3)
    assert 0 < report.overall["rel_frobenius"] < 1


def test_transformer_spectra_match_the_dense_eigendecomposition(language):
    problem, G = language
    exact = torch.linalg.eigvalsh(G).flip(0)
    top = cl.top_eigen(cl.GGN(problem), 3, tol=1e-10, progress=False)
    assert_close_rel(top.values, exact[:3], 1e-8, "top 3")
    assert cl.trace(cl.GGN(problem), "exact").value == pytest.approx(G.trace().item(), rel=1e-10)
    density = cl.spectral_density(cl.GGN(problem), num_probes=2, lanczos_steps=12, seed=0, progress=False)
    assert density.weights.sum(1) == pytest.approx(torch.ones(2, dtype=F64), rel=1e-8)  # each probe: mass 1


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32×32 inputs, as for CIFAR
    model.maxpool = nn.Identity()
    return model.eval()


def test_resnet18_products_and_spectra_run_matrix_free():
    model = _resnet18()
    generator = torch.Generator().manual_seed(0)
    X, y = torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator)
    problem = cl.Problem(model, nn.CrossEntropyLoss(), [(X, y)])
    assert problem.num_params == 11_173_962
    v, w = (torch.randn(problem.num_params, generator=generator) for _ in range(2))
    for build in (cl.GGN, cl.Hessian):
        C = build(problem)
        Cv, Cw = C @ v, C @ w
        assert torch.isfinite(Cv).all()
        # symmetry, a property of the matrix that the route does not build in
        assert (w @ Cv).item() == pytest.approx((v @ Cw).item(), rel=1e-3, abs=1e-6)
    G = cl.GGN(problem)
    assert (v @ (G @ v)).item() >= 0  # the GGN of a convex loss is PSD
    top = cl.top_eigen(G, 1, tol=1e-3, progress=False)
    assert top.values[0] > 0 and top.residuals[0] <= 1e-3 * top.values[0] * 1.01
    trace = cl.trace(G, "hutchinson", num_matvecs=4, seed=0, progress=False)
    assert trace.value >= top.values[0].item() * 0.5  # a noisy estimate, but of a PSD trace ≥ λmax
    density = cl.spectral_density(G, num_probes=1, lanczos_steps=4, seed=0, progress=False)
    assert torch.isfinite(density.density).all()


def test_resnet18_kfac_with_batch_norm_is_exact_where_one_example_makes_it_so():
    """One example: the empirical Fisher is g gᵀ. Its diagonal is g², and KFAC's fc block is exact."""
    model = _resnet18()
    generator = torch.Generator().manual_seed(0)
    X, y = torch.randn(1, 3, 32, 32, generator=generator), torch.randint(0, 10, (1,), generator=generator)
    problem = cl.Problem(model, nn.CrossEntropyLoss(), [(X, y)])
    K = cl.KFAC(problem, fisher_type="empirical", other_structure="diagonal")
    names = problem.param_names
    assert {names[i].split(".")[-1] for i in K.unsupported} == {"weight", "bias"}
    assert all(
        "bn" in names[i] or "downsample.1" in names[i] for i in K.unsupported
    )  # the 40 BatchNorm tensors
    blocks = dict(zip(map(tuple, K.block_indices), K.block_operators))
    gradient = problem.gradient()
    offsets = cl.GGN(problem).block_offsets()
    bn = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in K.unsupported])
    diagonal = blocks[tuple(K.unsupported)].diag()
    assert_close_rel(diagonal, gradient[bn] ** 2, 1e-5, "BatchNorm diagonal = g²")
    fc = (names.index("fc.weight"), names.index("fc.bias"))
    v = torch.randn(blocks[fc].shape[0], generator=generator)
    exact = cl.EmpiricalFisher(problem.restrict([problem.params[i] for i in fc]))
    assert_close_rel(blocks[fc] @ v, exact @ v, 1e-5, "KFAC's fc block = the EF block")


def test_resnet18_kfac_keeps_wide_input_factors_low_rank_and_solves_exactly():
    """Four 32×32 examples: layer4's 3×3 convs average 4·16 = 64 patches of 4608 inputs (rank ≤ 64)."""
    model = _resnet18().double()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, 32, 32, generator=generator, dtype=F64)
    y = torch.randint(0, 10, (4,), generator=generator)
    problem = cl.Problem(model, nn.CrossEntropyLoss(), [(X, y)])
    K = cl.KFAC(problem, fisher_type="type-2", other_structure="diagonal")
    names = problem.param_names
    blocks = {names[indices[0]]: block for indices, block in zip(K.block_indices, K.block_operators)}
    wide = blocks["layer4.1.conv2.weight"]
    assert isinstance(wide, cl.LowRankKroneckerBlock) and wide.Z.shape == (64, 4608)
    assert not isinstance(blocks["conv1.weight"], cl.LowRankKroneckerBlock)  # 27 inputs: dense
    values = wide.eigvalsh()
    assert int((values > 1e-12 * values[-1]).sum()) <= 512 * 64  # rank ≤ d_out · m
    assert_close_rel(values.sum(), wide.trace(), 1e-10, "Σ eigenvalues = trace")
    # the solve in the thin eigenbasis against the product with the dense A = ZᵀZ
    dense = cl.KroneckerBlock(wide.G, wide.A, wide.param_shapes, False, wide.param_names)
    v = torch.randn(wide.shape[0], generator=generator, dtype=F64)
    damping = 1e-4 * values[-1].item()
    x = wide.solve(v, damping)
    assert (dense @ x + damping * x - v).norm() <= 1e-10 * v.norm()
    everything = K.solve(torch.randn(problem.num_params, generator=generator, dtype=F64), damping)
    assert torch.isfinite(everything).all()
