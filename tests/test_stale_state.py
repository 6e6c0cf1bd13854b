"""No product at stale weights or on other data: kept state follows every change a user can make."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab import reference
from curvlab.operators.exact import ProblemOperator
from tests.helpers import Wrapped, assert_close_rel


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data(n=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(
        n, 2, generator=generator, dtype=torch.float64
    )


def _fresh(operator_class, model, data, **options):
    return operator_class(cl.Problem(model, nn.MSELoss(), data, **options))


EDITS = {
    "p.data.add_": lambda p: p.data.add_(0.5),
    "p.data = p.data + x": lambda p: setattr(p, "data", p.data + 0.5),
    "p.data.copy_": lambda p: p.data.copy_(torch.randn_like(p)),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
@pytest.mark.parametrize("wrap", [False, True], ids=["plain-mlp", "autograd-graph"])
@pytest.mark.parametrize("operator_class", [cl.Hessian, cl.GGN])
def test_products_follow_edits_through_p_data(operator_class, wrap, edit):
    """``p.data`` edits bump no in-place version: the kept pass must still be rebuilt."""
    model = _mlp()
    model = Wrapped(model) if wrap else model
    data = [_data()]
    C = _fresh(operator_class, model, data)
    v = torch.randn(C.shape[0], dtype=torch.float64)
    C @ v  # fills the kept state
    with torch.no_grad():
        for p in model.parameters():
            edit(p)
    assert_close_rel(C @ v, _fresh(operator_class, model, data) @ v, 1e-12, "product after the edit")
    forms = C.quadratic_forms(v[:, None])
    assert_close_rel(forms, _fresh(operator_class, model, data).quadratic_forms(v[:, None]), 1e-12)


def test_trace_follows_an_edit_through_p_data():
    model, data = _mlp(), [_data()]
    H = _fresh(cl.Hessian, model, data)
    cl.trace(H, "hutchinson", 10)
    with torch.no_grad():
        model[0].weight.data.mul_(3.0)
    expected = cl.trace(_fresh(cl.Hessian, model, data), "hutchinson", 10).value
    assert cl.trace(H, "hutchinson", 10).value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("operator_class", [cl.Hessian, cl.GGN])
def test_products_follow_parameters_outside_the_chosen_ones(operator_class):
    """A block's curvature depends on the other layers too: their changes rebuild the kept state."""
    model, data = _mlp(), [_data()]
    C = _fresh(operator_class, model, data, params=[model[2].weight])
    v = torch.randn(C.shape[0], dtype=torch.float64)
    C @ v
    with torch.no_grad():
        model[0].weight.add_(1.0)
    expected = _fresh(operator_class, model, data, params=[model[2].weight]) @ v
    assert_close_rel(C @ v, expected, 1e-12)


def test_products_follow_in_place_changes_of_the_data():
    model, data = _mlp(), [_data()]
    H = _fresh(cl.Hessian, model, data)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    data[0][0].data.mul_(2.0)
    assert_close_rel(H @ v, _fresh(cl.Hessian, model, data) @ v, 1e-12)


def test_algorithms_compare_the_values_once(monkeypatch):
    """Inside top_eigen the values are compared on entry only, not before each product."""
    model, data = _mlp(), [_data()]
    H = _fresh(cl.Hessian, model, data)
    H @ torch.randn(H.shape[0], dtype=torch.float64)
    comparisons = []
    original = ProblemOperator._is_current

    def counting(self, cached, tensors, compare_values):
        comparisons.append(compare_values)
        return original(self, cached, tensors, compare_values)

    monkeypatch.setattr(ProblemOperator, "_is_current", counting)
    result = cl.top_eigen(H, 2, tol=1e-8)
    assert result.num_matvecs > 3
    assert sum(comparisons) == 1, f"{sum(comparisons)} value comparisons for {result.num_matvecs} products"


# ---------------------------------------------------------------- the data: one set of batches
def _loader(shuffle: bool, drop_last: bool = False, labels: bool = True):
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=generator) if labels else torch.randn(40, 2, dtype=torch.float64)
    torch.manual_seed(5)
    return DataLoader(TensorDataset(X, y), batch_size=8, shuffle=shuffle, drop_last=drop_last)


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_shuffling_loader_is_refused(drop_last):
    """Each pass would pair MC samples (and KFAC's, and a drop_last subset) with other examples."""
    with pytest.raises(cl.DataError, match=r"different from the first pass.*shuffle=True.*list\(loader\)"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), _loader(shuffle=True, drop_last=drop_last))


def test_a_fixed_loader_is_one_matrix_and_equals_its_list():
    model = _mlp()
    loader = _loader(shuffle=False)
    problem = cl.Problem(model, nn.CrossEntropyLoss(), loader)
    as_list = cl.Problem(model, nn.CrossEntropyLoss(), list(loader))
    F = cl.Fisher(problem, mc_samples=1, seed=0)
    dense = F.to_dense()
    assert_close_rel(dense, dense.T, 1e-14, "MC Fisher symmetric")
    assert_close_rel(dense, F.to_dense(), 0, "the same matrix twice")
    assert_close_rel(dense, cl.Fisher(as_list, mc_samples=1, seed=0).to_dense(), 1e-14)
    K = cl.KFAC(problem, fisher_type="mc", seed=2).to_dense()
    assert_close_rel(K, cl.KFAC(problem, fisher_type="mc", seed=2).to_dense(), 0, "MC KFAC twice")


class _Changing:
    """A re-iterable whose batches change between passes."""

    def __init__(self, batches_per_pass):
        self.passes = iter(batches_per_pass)

    def __iter__(self):
        return iter(next(self.passes))


def test_data_whose_batches_change_later_is_refused_when_read():
    first = [_data(8, 1), _data(8, 2)]
    changed = [_data(8, 1), _data(8, 9)]
    data = _Changing([first, first, first, changed])  # construction reads twice
    G = cl.GGN(cl.Problem(_mlp(), nn.MSELoss(), data))
    G @ torch.randn(G.shape[0], dtype=torch.float64)
    with pytest.raises(cl.DataError, match="batch 1 different from the first pass"):
        G @ torch.randn(G.shape[0], dtype=torch.float64)


@pytest.mark.parametrize(
    "second, message",
    [
        ([_data(8, 1)], "gave 1 batches, the first pass 2"),
        ([_data(8, 1), _data(8, 2), _data(8, 3)], "more batches than the 2"),
    ],
    ids=["fewer", "more"],
)
def test_a_changing_number_of_batches_is_refused(second, message):
    first = [_data(8, 1), _data(8, 2)]
    G = cl.GGN(cl.Problem(_mlp(), nn.MSELoss(), _Changing([first, first, second])))
    with pytest.raises(cl.DataError, match=message):
        G @ torch.randn(G.shape[0], dtype=torch.float64)


def test_a_one_shot_iterable_is_refused_with_a_data_error():
    class OneShot:
        def __init__(self):
            self.batches = iter([_data()])

        def __iter__(self):
            return self.batches

    with pytest.raises(cl.DataError, match="gave 0 batches, the first pass 1.*one-shot"):
        cl.Problem(_mlp(), nn.MSELoss(), OneShot())


def test_the_list_of_batches_is_a_snapshot():
    """Batches appended to the caller's list after building the problem are not part of it."""
    model = _mlp()
    data = [_data()]
    G = _fresh(cl.GGN, model, data)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    before = G @ v
    data.append(_data(seed=4))
    assert_close_rel(G @ v, before, 0)
    assert G.problem.num_batches == 1


def test_products_follow_the_model_mode_when_it_is_the_function():
    """With eval_mode=False a batch norm in training and in eval mode are two functions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.train()
    data = [_data()]
    H = cl.Hessian(cl.Problem(model, nn.MSELoss(), data, eval_mode=False))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    model.eval()
    expected = cl.Hessian(cl.Problem(model, nn.MSELoss(), data, eval_mode=False)) @ v
    assert_close_rel(H @ v, expected, 1e-12)


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
