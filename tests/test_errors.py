"""Bad input fails loudly with an error that names the problem."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import memory


def _problem(loss=None, data=None, params=None, model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = data if data is not None else (torch.randn(5, 3), torch.randn(5, 2))
    return cl.Problem(model, loss or nn.MSELoss(), data, params=params)


@pytest.mark.parametrize("bad", [2, -1, -100], ids=["too-large", "negative", "ignore-index-of-another-loss"])
def test_cross_entropy_targets_out_of_range(bad):
    """A class index outside [0, C) that is not the loss' ignore_index is a DataError, not torch's."""
    y = torch.tensor([0, 1, bad, 1, 0])
    loss = nn.CrossEntropyLoss(ignore_index=7)
    with pytest.raises(cl.DataError, match=r"class indices in \[0, 2\) or ignore_index=7; got \[" + str(bad)):
        _problem(loss=loss, data=(torch.randn(5, 3), y))


def test_mismatch_in_a_later_batch_is_caught():
    problem = _problem(data=[(torch.randn(5, 3), torch.randn(5, 2)), (torch.randn(4, 3), torch.randn(4, 1))])
    with pytest.raises(cl.DataError, match="target has shape"):
        cl.GGN(problem).to_dense()


def test_cross_entropy_probability_targets_are_accepted():
    """Float targets shaped like the logits are probabilities (supported), one term per example."""
    assert _problem(loss=nn.CrossEntropyLoss(), data=(torch.randn(5, 3), torch.rand(5, 2))).num_terms == 5


def test_labels_and_targets_torch_accepts_give_the_same_curvature():
    """uint8 class labels (torch's loss takes them) and integer MSE targets (promoted) are accepted."""
    X = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 1, 0, 1])
    as_long = cl.GGN(_problem(nn.CrossEntropyLoss(), (X, labels))).to_dense()
    as_uint8 = cl.GGN(_problem(nn.CrossEntropyLoss(), (X, labels.to(torch.uint8)))).to_dense()
    assert torch.equal(as_long, as_uint8)
    integers = torch.randint(-2, 3, (5, 2))
    as_float = cl.EmpiricalFisher(_problem(data=(X, integers.float()))).to_dense()
    assert torch.equal(cl.EmpiricalFisher(_problem(data=(X, integers))).to_dense(), as_float)


def test_inputs_that_require_grad_are_taken_as_data():
    """Curvature is in the parameters: inputs and targets that require grad are detached, not an error."""
    X, y = torch.randn(5, 3), torch.randn(5, 2)
    expected = cl.Hessian(_problem(data=(X, y))).to_dense()
    leaf = cl.Hessian(_problem(data=(X.clone().requires_grad_(), y.clone().requires_grad_()))).to_dense()
    assert torch.equal(leaf, expected)


def test_vector_list_with_a_tensor_of_the_wrong_shape():
    operator = cl.GGN(_problem())
    with pytest.raises(cl.DataError, match=r"vector\[0\] has shape \(1,\), expected \(4, 3\)"):
        operator @ ([torch.zeros(1)] * 4)


def test_to_dense_refuses_when_it_would_not_fit(monkeypatch):
    problem = _problem()
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    n = problem.num_params
    with pytest.raises(cl.DenseTooLargeError, match=f"would need {n * n * 4:,} bytes") as info:
        cl.GGN(problem).to_dense()
    assert info.value.bytes_needed == n * n * 4
    with pytest.raises(MemoryError):
        cl.Hessian(problem).to_dense(max_bytes=100)


def test_spectra_refuse_a_workspace_that_would_not_fit_before_any_product(monkeypatch):
    """top_eigen, trace and spectral_density state their memory and check it first."""
    problem = _problem()
    n = problem.num_params  # float32
    G = cl.GGN(problem)
    free = 4 * n * 30  # room for 30 vectors
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    products = []
    for name in ("_matmat", "_matvec_into"):
        original = getattr(cl.GGN, name)
        monkeypatch.setattr(
            cl.GGN, name, lambda self, *args, _original=original: products.append(1) or _original(self, *args)
        )
    needed = (20 + 1 + 3 * 5) * n * 4  # basis 20 (the default for k = 5, guard 2), +1, +3k
    with pytest.raises(
        cl.DenseTooLargeError, match=f"top_eigen.k=5. .* would need {needed:,} bytes.*basis_size"
    ):
        cl.top_eigen(G, 5, basis_size=20)
    with pytest.raises(cl.DenseTooLargeError, match=r"trace\(hutch\+\+, num_matvecs=30\).*num_matvecs"):
        cl.trace(G, "hutch++", num_matvecs=30)
    with pytest.raises(cl.DenseTooLargeError, match="spectral_density .*probes_per_pass"):
        cl.spectral_density(G, num_probes=4, lanczos_steps=10)
    assert products == []  # refused before the first product
    cl.top_eigen(G, 2, basis_size=10)  # (10 + 1 + 6) vectors fit
    assert products  # (and the count above counts)
    cl.trace(G, "hutch++", num_matvecs=18)  # 5 · 6
    cl.spectral_density(G, num_probes=2, lanczos_steps=10)  # (10 + 3) · 2


def test_cg_on_indefinite_hessian_raises():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    X = torch.randn(10, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -3.0]]))
    problem = cl.Problem(
        nn.Sequential(model, nn.Tanh(), nn.Linear(1, 1)), nn.MSELoss(), (X, 5 * torch.ones(10, 1))
    )
    H = cl.Hessian(problem)
    eigenvalues = torch.linalg.eigvalsh(H.to_dense())
    assert eigenvalues[0] < 0, "the test needs an indefinite Hessian"
    eigenvectors = torch.linalg.eigh(H.to_dense()).eigenvectors
    with pytest.raises(cl.NotPositiveDefiniteError, match="not positive definite"):
        H.solve(eigenvectors[:, 0], damping=0.0)


def _nan_problem(where):
    """A problem built on finite values, then given a NaN or Inf in place.

    The way it happens in practice (a diverged training step), and past the
    checks of the problem's construction, so each use must find it itself.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    problem = cl.Problem(model, nn.MSELoss(), (X, y))
    with torch.no_grad():
        if where == "parameter":
            model[0].weight[0, 0] = float("nan")
        elif where == "input":
            X[2, 1] = float("inf")
        else:
            y[0, 0] = float("nan")
    return problem


NAN_USES = {
    "top_eigen": lambda p: cl.top_eigen(cl.Hessian(p), 1, progress=False),
    "spectral_density": lambda p: cl.spectral_density(
        cl.GGN(p), num_probes=2, lanczos_steps=4, progress=False
    ),
    "trace": lambda p: cl.trace(cl.Hessian(p), num_matvecs=6, progress=False),
    "trace GGN": lambda p: cl.trace(cl.GGN(p), num_matvecs=6, progress=False),
    "hutch++": lambda p: cl.trace(cl.Hessian(p), "hutch++", num_matvecs=6, progress=False),
    "exact trace": lambda p: cl.trace(cl.GGN(p), method="exact"),
    "products": lambda p: cl.Fisher(p, mc_samples=2) @ torch.ones(p.num_params, dtype=torch.float64),
    "EF": lambda p: cl.EmpiricalFisher(p).to_dense(),
    "gradient curvature": lambda p: cl.curvature_along_gradient(cl.Hessian(p)),
    "EKFAC": lambda p: cl.EKFAC(p),
    # plain MLPs: forms by forward propagation (taylor.py), no product
    "GGN forms": lambda p: cl.GGN(p).quadratic_forms(torch.ones(p.num_params, 2, dtype=torch.float64)),
    "Hessian forms": lambda p: cl.Hessian(p).quadratic_forms(
        torch.ones(p.num_params, 2, dtype=torch.float64)
    ),
    "eigvalsh": lambda p: cl.eigvalsh(cl.GGN(p)),
    "KFAC": lambda p: cl.KFAC(p),
    "MC KFAC": lambda p: cl.KFAC(p, fisher_type="mc"),
    "ACP": lambda p: cl.ACP(p),
    "diagonal": lambda p: cl.Diagonal(cl.GGN(p)),
    "compare": lambda p: cl.compare(cl.Diagonal(cl.GGN(p)), cl.GGN(p)),
}


@pytest.mark.parametrize("use", sorted(NAN_USES))
@pytest.mark.parametrize("where", ["parameter", "input", "target"])
def test_nan_or_inf_is_an_error_naming_it_not_a_nan_result(use, where):
    what = {
        "parameter": "the model output has",
        "input": "the inputs of batch 0 have",
        "target": "the target has",
    }
    problem = _nan_problem(where)
    with pytest.raises(cl.NonFiniteError, match=f"{what[where]} NaN or Inf"):
        NAN_USES[use](problem)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64), "not symmetric"),
        (torch.full((2, 2), float("nan"), dtype=torch.float64), "NaN or Inf"),
        (torch.eye(2, dtype=torch.float16), "float32 or float64"),
        (torch.ones(2, 3, dtype=torch.float64), "square"),
    ],
    ids=["nonsymmetric", "nan", "float16", "not square"],
)
@pytest.mark.parametrize("function", ["eigvalsh", "top_eigen", "spectral_density", "condition_number"])
def test_spectra_of_a_bad_matrix_are_an_error(matrix, message, function):
    call = {
        "eigvalsh": lambda: cl.eigvalsh(matrix),
        "top_eigen": lambda: cl.top_eigen(matrix, 1),
        "spectral_density": lambda: cl.spectral_density(
            matrix, num_probes=1, lanczos_steps=2, progress=False
        ),
        "condition_number": lambda: cl.condition_number(matrix, method="lanczos", progress=False),
    }[function]
    with pytest.raises(cl.DataError, match=message):
        call()
