"""Quadratic forms vᵀCv: forward propagation on plain MLPs against dense matrices; traces use it."""

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.passes import fast
from tests.cases import CASES
from tests.helpers import assert_close_rel, takes_fast_path


def _dense_forms(C, V):
    """Forms of the dense reference matrices (torch.func, ``curvlab.reference``), built independently."""
    matrix = reference.hessian_matrix(C.problem) if isinstance(C, cl.Hessian) else reference.ggn(C.problem)
    return (V * (matrix @ V)).sum(0)


def _no_products(C):
    def refuse(Vs):
        raise AssertionError("quadratic_forms computed products on a plain MLP")

    C._matmat = refuse
    return C


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("operator_class", [cl.Hessian, cl.GGN], ids=lambda c: c.__name__)
def test_forms_match_dense(case, operator_class):
    problem = case.build(torch.float64)
    plain_mlp = case.name.startswith(("mlp_", "subset_"))
    assert takes_fast_path(problem) == plain_mlp
    V = torch.randn(problem.num_params, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _dense_forms(operator_class(problem), V)
    C = operator_class(problem)
    if plain_mlp:
        _no_products(C)  # the forward route must not fall back to products
    forms = C.quadratic_forms(V)
    assert forms.shape == (6,)
    assert_close_rel(forms, expected, 1e-10, f"{operator_class.__name__} forms")


def _odd_mlp():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, 5, bias=False),
        nn.SiLU(),
        nn.Linear(5, 5),
        nn.LeakyReLU(0.3),
        nn.Linear(5, 6),
        nn.Identity(),
        nn.Softplus(beta=2.0),
        nn.Linear(6, 3),
    ).double()


PICKS = [
    lambda m: None,  # all parameters
    lambda m: [m[7].weight],  # only the last layer: no direction until the output
    lambda m: [m[4].bias, m[0].weight],  # a bias alone, reversed order
    lambda m: [m[2].weight, m[4].weight],  # no biases
]
PICK_IDS = ["all", "last-weight", "bias-and-first", "weights"]


def _odd_problem(pick, loss):
    model = _odd_mlp()
    X = torch.randn(9, 4, dtype=torch.float64)
    y = {
        "ce": torch.randint(0, 3, (9,)),
        "mse": torch.randn(9, 3, dtype=torch.float64),
        "bce": torch.rand(9, 3, dtype=torch.float64),
    }[loss]
    loss_fn = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss(reduction="sum"), "bce": nn.BCEWithLogitsLoss()}
    problem = cl.Problem(model, loss_fn[loss], [(X[:5], y[:5]), (X[5:], y[5:])], params=pick(model))
    assert takes_fast_path(problem)
    return problem


@pytest.mark.parametrize("pick", PICKS, ids=PICK_IDS)
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_forms_other_activations_and_parameter_subsets(pick, loss):
    problem = _odd_problem(pick, loss)
    V = torch.randn(problem.num_params, 4, dtype=torch.float64)
    for operator_class in (cl.Hessian, cl.GGN):
        expected = _dense_forms(operator_class(problem), V)
        assert_close_rel(_no_products(operator_class(problem)).quadratic_forms(V), expected, 1e-10, loss)


def test_cached_primal_follows_in_place_parameter_changes():
    case = next(c for c in CASES if c.name == "mlp_tanh_mse_mean")
    problem = case.build(torch.float64)
    H = cl.Hessian(problem)
    V = torch.randn(problem.num_params, 3, dtype=torch.float64)
    before = H.quadratic_forms(V)
    with torch.no_grad():
        problem.params[0].mul_(1.5)  # an optimizer step
    after = H.quadratic_forms(V)
    assert not torch.allclose(after, before)
    assert_close_rel(after, _dense_forms(cl.Hessian(problem), V), 1e-10, "after the step")


def test_float32_forms_close_to_float64():
    case = next(c for c in CASES if c.name == "mlp_gelu_bce_mean")
    V = torch.randn(case.build().num_params, 5, dtype=torch.float64)
    forms32 = cl.Hessian(case.build(torch.float32)).quadratic_forms(V.float())
    assert forms32.dtype == torch.float32
    assert_close_rel(forms32.double(), cl.Hessian(case.build()).quadratic_forms(V), 1e-5, "float32")


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_by_forms_equals_trace_by_products(method, monkeypatch):
    case = next(c for c in CASES if c.name == "mlp_relu_ce_mean_3batches")
    problem = case.build(torch.float64)
    by_forms = cl.trace(cl.Hessian(problem), method, 30, seed=4, progress=False)
    monkeypatch.setattr(fast, "FAST_PATHS", [])
    by_products = cl.trace(cl.Hessian(problem), method, 30, seed=4, progress=False)
    assert by_forms.value == pytest.approx(by_products.value, rel=1e-12)
    assert by_forms.standard_error == pytest.approx(by_products.standard_error, rel=1e-10)


def test_forms_by_products_respect_the_column_chunks(monkeypatch):
    case = next(c for c in CASES if c.name == "conv2d_ce_mean")  # not a plain MLP: by products
    problem = case.build(torch.float64)
    C = cl.GGN(problem)
    widths = []
    matmat = C._matmat

    def recording(Vs):
        widths.append(Vs[0].shape[0])
        return matmat(Vs)

    monkeypatch.setattr(C, "_matmat", recording)
    monkeypatch.setattr(C, "columns_per_chunk", lambda: 3)
    V = torch.randn(problem.num_params, 8, dtype=torch.float64)
    forms = C.quadratic_forms(V)
    assert widths == [3, 3, 2]  # never more columns at once than the memory bound allows
    assert_close_rel(forms, _dense_forms(cl.GGN(problem), V), 1e-10, "chunked forms")


def test_clear_cache_drops_the_forward_pass():
    case = next(c for c in CASES if c.name == "mlp_tanh_mse_mean")
    G = cl.GGN(case.build(torch.float64))
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    first = G.quadratic_forms(V)
    assert G._primal_cache is not None
    G.clear_cache()
    assert G._primal_cache is None
    assert_close_rel(G.quadratic_forms(V), first, 1e-14, "after clear_cache")


def test_forms_of_a_wrong_shape_or_dtype_name_the_problem():
    from curvlab.errors import DataError

    case = next(c for c in CASES if c.name == "mlp_tanh_mse_mean")
    H = cl.Hessian(case.build(torch.float64))
    with pytest.raises(DataError, match=r"quadratic_forms needs V of shape \(39, k\)"):
        H.quadratic_forms(torch.randn(38, 2, dtype=torch.float64))
    with pytest.raises(DataError, match="dtype"):
        H.quadratic_forms(torch.randn(39, 2))


def _no_autograd_hessian(H):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain MLP's Hessian product built an autograd graph")

    H._gradient_graph = refuse
    return H


def _product_into(H, v):
    """H v by ``_matvec_into`` (Lanczos' route: written into a given vector), checked to be in place.

    The vector starts as NaN, so a parameter the product fails to write (or to
    zero, where no term reaches it) shows.
    """
    out = torch.full_like(v, float("nan"))
    assert H._matvec_into(v, out) is out
    return out


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name.startswith(("mlp_", "subset_"))], ids=lambda c: c.name
)
@pytest.mark.parametrize("cache", [None, False])
def test_closed_form_hessian_products_of_plain_mlps(case, cache):
    problem = case.build(torch.float64)
    H = _no_autograd_hessian(cl.Hessian(problem, cache_graph=cache))
    dense = reference.hessian_matrix(problem)
    V = torch.randn(problem.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_close_rel(H @ V, dense @ V, 1e-10, "products")
    assert_close_rel(H @ V[:, 1], dense @ V[:, 1], 1e-10, "one column")
    assert_close_rel(_product_into(H, V[:, 2]), dense @ V[:, 2], 1e-10, "written into a vector")
    assert_close_rel(H.to_dense(), dense, 1e-10, "to_dense")
    assert_close_rel(H.gradient(), problem.gradient(), 1e-12, "gradient off the primal pass")


@pytest.mark.parametrize("pick", PICKS, ids=PICK_IDS)
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_closed_form_products_match_autograd_on_other_activations_and_subsets(pick, loss, monkeypatch):
    problem = _odd_problem(pick, loss)
    V = torch.randn(problem.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    closed = _no_autograd_hessian(cl.Hessian(problem)) @ V
    gradient = cl.Hessian(problem).gradient()
    dense = reference.hessian_matrix(problem)
    assert_close_rel(closed, dense @ V, 1e-10, loss)
    into = _product_into(_no_autograd_hessian(cl.Hessian(problem)), V[:, 0])
    assert_close_rel(into, dense @ V[:, 0], 1e-10, f"{loss}, written into a vector")
    monkeypatch.setattr(fast, "FAST_PATHS", [])  # the reverse-over-reverse route
    assert_close_rel(closed, cl.Hessian(problem) @ V, 1e-10, f"{loss} against autograd")
    assert_close_rel(gradient, cl.Hessian(problem).gradient(), 1e-12, "gradient")


def _shared_layer_problem():
    """An MLP that calls one Linear twice, and two directions."""
    torch.manual_seed(4)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), shared, nn.Sigmoid(), shared, nn.Linear(3, 2)).double()
    X, y = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    problem = cl.Problem(model, nn.MSELoss(), (X, y))
    return problem, torch.randn(problem.num_params, 2, dtype=torch.float64)


def test_closed_form_products_add_a_layer_used_twice():
    problem, V = _shared_layer_problem()
    H = _no_autograd_hessian(cl.Hessian(problem))
    dense = reference.hessian_matrix(problem)
    assert_close_rel(H @ V, dense @ V, 1e-10, "shared layer")
    assert_close_rel(_product_into(H, V[:, 0]), dense @ V[:, 0], 1e-10, "shared layer, into a vector")
    assert_close_rel(H.gradient(), problem.gradient(), 1e-12, "gradient")


def _no_output_space_products(G):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain MLP's GGN product took the torch.func route")

    G._batch_matmat = refuse
    return G


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name.startswith(("mlp_", "subset_"))], ids=lambda c: c.name
)
def test_closed_form_ggn_products_of_plain_mlps(case):
    problem = case.build(torch.float64)
    G = _no_output_space_products(cl.GGN(problem))
    dense = reference.ggn(problem)
    V = torch.randn(problem.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert_close_rel(G @ V, dense @ V, 1e-10, "products")
    assert_close_rel(_product_into(G, V[:, 2]), dense @ V[:, 2], 1e-10, "written into a vector")
    assert_close_rel(G.to_dense(), dense, 1e-10, "to_dense")


@pytest.mark.parametrize("pick", PICKS, ids=PICK_IDS)
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_closed_form_ggn_products_match_torch_func_on_other_activations_and_subsets(pick, loss, monkeypatch):
    problem = _odd_problem(pick, loss)
    V = torch.randn(problem.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    closed = _no_output_space_products(cl.GGN(problem)) @ V
    into = _product_into(_no_output_space_products(cl.GGN(problem)), V[:, 0])
    assert_close_rel(closed, reference.ggn(problem) @ V, 1e-10, loss)
    assert_close_rel(into, closed[:, 0], 1e-12, f"{loss}, written into a vector")
    monkeypatch.setattr(fast, "FAST_PATHS", [])  # the jvp/vjp route
    assert_close_rel(closed, cl.GGN(problem) @ V, 1e-10, f"{loss} against torch.func")


def test_closed_form_ggn_products_add_a_layer_used_twice():
    problem, V = _shared_layer_problem()
    G = _no_output_space_products(cl.GGN(problem))
    assert_close_rel(G @ V, reference.ggn(problem) @ V, 1e-10, "shared layer")
