"""cl.crosscheck: curvlab against BackPACK on the user's model, in one line."""

import pytest
import torch
from torch import nn

import curvlab as cl

pytest.importorskip("backpack")
F64 = torch.float64


def _problem(model, loss, X, y, **options):
    return cl.Problem(model.double(), loss, (X, y), **options)


@pytest.mark.parametrize(
    "loss, target",
    [
        (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 3, (n,))),
        (nn.MSELoss(), lambda n: torch.randn(n, 3, dtype=F64)),
    ],
    ids=["ce", "mse"],
)
def test_an_mlp_agrees_with_backpack_everywhere(loss, target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 3))
    result = cl.crosscheck(_problem(model, loss, torch.randn(16, 5, dtype=F64), target(16)))
    assert {row["quantity"] for row in result.rows} == {"diag_ggn", "diag_hessian", "kfac"}
    assert len(result.rows) == 4 + 1 + 4 and result.largest < 1e-12, str(result)
    assert "largest relative difference" in str(result)


def test_a_cnn_compares_what_backpack_shares_and_says_what_it_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(108, 4))
    problem = _problem(
        model, nn.CrossEntropyLoss(), torch.randn(8, 1, 6, 6, dtype=F64), torch.randint(0, 4, (8,))
    )
    result = cl.crosscheck(problem, hessian_coordinates=50, seed=3)
    assert result.largest < 1e-12, str(result)
    conv = [row for row in result.rows if row["quantity"] == "kfac" and row["parameter"].startswith("0.")]
    assert all(
        row["relative_difference"] is None and "mixes expand and reduce" in row["note"] for row in conv
    )
    (hessian,) = [row for row in result.rows if row["quantity"] == "diag_hessian"]
    assert hessian["note"] == "50 random entries (seed 3)"


def test_unsupported_modules_are_reported_with_the_reason_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    X, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    before = {name: p.clone() for name, p in model.named_parameters()}
    result = cl.crosscheck(_problem(model, nn.CrossEntropyLoss(), X, y), quantities=("diag_ggn", "kfac"))
    notes = {row["quantity"]: row["note"] for row in result.rows}
    assert notes["diag_ggn"].startswith("BackPACK: ") and "LayerNorm" in notes["diag_ggn"]
    assert notes["kfac"].startswith("curvlab: ") and "other_structure" in notes["kfac"]
    assert result.largest != result.largest  # nan: nothing compared
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # BackPACK used a copy
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_options_are_checked():
    torch.manual_seed(0)
    problem = _problem(
        nn.Linear(3, 2), nn.MSELoss(), torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    )
    with pytest.raises(ValueError, match="quantities must be among"):
        cl.crosscheck(problem, quantities=("trace",))
    with pytest.raises(ValueError, match="hessian_coordinates must be an integer ≥ 1, got 0"):
        cl.crosscheck(problem, hessian_coordinates=0)
