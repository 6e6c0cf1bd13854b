"""Check curvlab against BackPACK on the user's own model: ``cl.crosscheck(problem)``.

BackPACK computes curvature by its own means (extended backward passes with
per-module rules): where it supports the model, agreeing with it verifies
curvlab's numbers on that network in one line. Compared, on the problem's first
batch (BackPACK takes one):

* ``diag_ggn``: the exact diagonal of the GGN, against ``DiagGGNExact``;
* ``diag_hessian``: diagonal entries of the Hessian (all of them for up to
  ``hessian_coordinates`` parameters, else that many seeded random ones: one
  product per entry), against ``DiagHessian``;
* ``kfac``: type-2 KFAC's Kronecker products G ⊗ A per weight and G ⊗ [a] per bias
  of every ``nn.Linear``, against ``KFLR``'s factors (compared as products: a scale
  moving between the two factors is no difference). Convolutions are listed, not
  compared: BackPACK's KFLR of a convolution follows neither weight-sharing
  convention (curvlab's agree with curvlinops, ``docs/peers.md``).

BackPACK works on a copy of the model (it leaves hooks on what it extends); the
user's model is not touched. A quantity BackPACK cannot compute for this model is
reported with BackPACK's reason, not as a failure.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.errors import CurvlabError, UnsupportedError
from curvlab.operators.exact import GGN, Hessian
from curvlab.options import check_count, check_integer
from curvlab.problem import Problem
from curvlab.structured.diagonal import Diagonal
from curvlab.structured.kfac import KFAC
from curvlab.structured.kronecker import KroneckerBlock

QUANTITIES = ("diag_ggn", "diag_hessian", "kfac")
# Measured on a Conv2d: BackPACK 1.7's KFLR input factor points like KFAC-expand's, its output
# factor like KFAC-reduce's, at another scale: neither convention (curvlab's agree with curvlinops).
_SHARING = "not compared: BackPACK's KFLR of a convolution mixes expand and reduce"


@dataclass
class Crosscheck:
    """Per quantity and parameter: the relative difference to BackPACK, or why there is none.

    Attributes:
        rows: Dicts with ``quantity``, ``parameter``, ``relative_difference`` (or
            ``None``) and ``note`` (how it was compared, or BackPACK's reason).
        examples: The examples compared on (the problem's first batch).
    """

    rows: list[dict] = field(default_factory=list)
    examples: int = 0

    @property
    def largest(self) -> float:
        """The largest relative difference found (``nan`` if nothing could be compared)."""
        values = [r["relative_difference"] for r in self.rows if r["relative_difference"] is not None]
        return max(values) if values else math.nan

    def __str__(self) -> str:
        """A table: quantity, parameter, relative difference, note."""
        lines = [f"curvlab against BackPACK on {self.examples} examples (the first batch)"]
        lines.append(f"{'quantity':<14}{'parameter':<28}{'rel. difference':>16}  note")
        for row in self.rows:
            value = row["relative_difference"]
            shown = f"{value:>16.2e}" if value is not None else f"{'-':>16}"
            lines.append(f"{row['quantity']:<14}{row['parameter'][:27]:<28}{shown}  {row['note']}")
        lines.append(f"largest relative difference: {self.largest:.2e}")
        return "\n".join(lines)


def _relative(ours: Tensor, theirs: Tensor) -> float:
    scale = theirs.norm().item()
    return (ours - theirs).norm().item() / scale if scale > 0 else (ours - theirs).norm().item()


def _kronecker_difference(ours: list[Tensor], theirs: list[Tensor]) -> float:
    """Relative difference of ⊗ ours and ⊗ theirs, never forming either (to first order).

    The products agree where the factors agree up to scales whose product is 1:
    compared are the products' norms and each factor's direction.
    """
    norm_ours = math.prod(f.norm().item() for f in ours)
    norm_theirs = math.prod(f.norm().item() for f in theirs)
    if norm_theirs == 0:
        return norm_ours
    difference = abs(norm_ours - norm_theirs) / norm_theirs
    for a, b in zip(ours, theirs):
        if a.norm() > 0 and b.norm() > 0:
            difference += (a / a.norm() - b / b.norm()).norm().item()
    return difference


def _backpack_run(problem: Problem, extension, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """BackPACK's ``extension`` on a copy of the model: ``{parameter name: its extended attributes}``."""
    backpack = _backpack()
    model = copy.deepcopy(problem.model)
    if problem.eval_mode:
        model.eval()  # as curvlab evaluates it
    model = backpack.extend(model)
    loss_fn = backpack.extend(copy.deepcopy(problem.loss_fn))
    model.zero_grad()
    with backpack.backpack(extension), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        loss_fn(model(X), y).backward()
    return dict(model.named_parameters())


def _backpack():
    try:
        import backpack
    except ImportError as error:  # a runtime dependency, but it may have been removed
        raise UnsupportedError("crosscheck needs BackPACK: pip install backpack-for-pytorch") from error
    return backpack


def crosscheck(
    problem: Problem,
    quantities: tuple[str, ...] = QUANTITIES,
    hessian_coordinates: int = 256,
    seed: int = 0,
) -> Crosscheck:
    """Compare curvlab's diagonal GGN, diagonal Hessian and type-2 KFAC with BackPACK's.

    Args:
        problem: The problem; the comparison runs on its first batch.
        quantities: Any of ``"diag_ggn"``, ``"diag_hessian"``, ``"kfac"``.
        hessian_coordinates: Diagonal Hessian entries compared (all of them when the
            problem has at most this many parameters); each costs a product.
        seed: Seed of the sampled coordinates.

    Returns:
        A ``Crosscheck``: ``print(result)`` shows the table; ``result.largest`` the
        largest relative difference.
    """
    unknown = set(quantities) - set(QUANTITIES)
    if unknown:
        raise ValueError(f"quantities must be among {QUANTITIES}, got {sorted(unknown)}")
    hessian_coordinates = check_count("hessian_coordinates", hessian_coordinates)
    seed = check_integer("seed", seed)
    extensions = _backpack().extensions
    X, y = next(iter(problem.batches()))
    batch = Problem(
        problem.model, problem.loss_fn, (X, y), params=problem.params, eval_mode=problem.eval_mode
    )
    result = Crosscheck(examples=X.shape[0])
    checks = {
        "diag_ggn": lambda: _diagonal_ggn(batch, X, y, extensions.DiagGGNExact()),
        "diag_hessian": lambda: _diagonal_hessian(
            batch, X, y, extensions.DiagHessian(), hessian_coordinates, seed
        ),
        "kfac": lambda: _kfac(batch, X, y, extensions.KFLR()),
    }
    for quantity in quantities:
        try:
            rows = checks[quantity]()
        except CurvlabError as error:
            rows = [{"parameter": "(all)", "relative_difference": None, "note": f"curvlab: {error}"}]
        except Exception as error:  # noqa: BLE001 (BackPACK's own error: unsupported module or loss)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            rows = [{"parameter": "(all)", "relative_difference": None, "note": f"BackPACK: {reason}"}]
        result.rows += [{"quantity": quantity, **row} for row in rows]
    return result


def _diagonal_ggn(problem: Problem, X, y, extension) -> list[dict]:
    ours = Diagonal(GGN(problem)).diagonal.split([p.numel() for p in problem.params])
    named = _backpack_run(problem, extension, X, y)
    return [
        {
            "parameter": name,
            "relative_difference": _relative(mine, named[name].diag_ggn_exact.flatten()),
            "note": "all entries",
        }
        for name, mine in zip(problem.param_names, ours)
    ]


def _diagonal_hessian(problem: Problem, X, y, extension, coordinates: int, seed: int) -> list[dict]:
    n = problem.num_params
    if n <= coordinates:
        chosen = torch.arange(n)
    else:
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:coordinates].sort().values
    named = _backpack_run(problem, extension, X, y)
    theirs = torch.cat([named[name].diag_h.flatten() for name in problem.param_names])[chosen]
    H = Hessian(problem)
    units = torch.zeros(n, len(chosen), dtype=problem.dtype, device=problem.device)
    units[chosen.to(problem.device), torch.arange(len(chosen), device=problem.device)] = 1
    ours = (H @ units)[chosen.to(problem.device), torch.arange(len(chosen), device=problem.device)]
    note = "all entries" if len(chosen) == n else f"{len(chosen)} random entries (seed {seed})"
    return [{"parameter": "(all)", "relative_difference": _relative(ours, theirs.to(ours)), "note": note}]


def _kfac(problem: Problem, X, y, extension) -> list[dict]:
    ours = KFAC(problem, fisher_type="type-2", separate_weight_and_bias=True)
    named = _backpack_run(problem, extension, X, y)
    rows = []
    for block in ours.blocks():
        if not isinstance(block, KroneckerBlock):
            continue
        (name,) = block.param_names
        module = problem.model.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear):
            rows.append({"parameter": name, "relative_difference": None, "note": _SHARING})
            continue
        factors = list(named[name].kflr)
        mine = [block.G, block.A] if len(factors) == 2 else [block.G * block.A.reshape(())]
        rows.append(
            {
                "parameter": name,
                "relative_difference": _kronecker_difference(mine, factors),
                "note": "G ⊗ A" if len(factors) == 2 else "G (bias)",
            }
        )
    return rows
