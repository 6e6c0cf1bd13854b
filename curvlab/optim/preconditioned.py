r"""The preconditioned optimizers: each names its curvature class, nothing more.

KFAC, EKFAC and ACP invert their Kronecker blocks exactly in the factors'
eigenbases (``KroneckerBlock.inverse``); DiagonalGGN divides by the diagonal;
Newton inverts the dense minibatch matrix; HessianFree runs damped conjugate
gradient on minibatch products (Martens 2010). The curvature objects are the
diagnostics' own classes, so ``opt.curvature`` can be handed to ``cl.compare``,
the spectra functions and ``cl.Store``.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from curvlab.errors import NotPositiveDefiniteError
from curvlab.operators.dense import DenseOperator
from curvlab.operators.exact import exact_class
from curvlab.optim.base import CurvatureOptimizer
from curvlab.options import check_count, check_positive
from curvlab.structured.acp import ACP as ACPCurvature
from curvlab.structured.diagonal import Diagonal
from curvlab.structured.ekfac import EKFAC as EKFACCurvature
from curvlab.structured.kfac import KFAC as KFACCurvature


class KFAC(CurvatureOptimizer):
    """K-FAC (Martens & Grosse 2015): d = (G ⊗ A + λI)⁻¹ g per layer.

    Args:
        model, loss_fn, params: As ``CurvatureOptimizer``.
        fisher_type: ``"mc"`` (default, one sampled label per example), ``"type-2"``
            or ``"empirical"``, as ``cl.KFAC``.
        pi_damping: Factored damping (G + π√λ I) ⊗ (A + √λ/π I) instead of exact.
        other_structure: As ``cl.KFAC``: ``"exact"`` or ``"diagonal"`` curvature for
            parameters of modules without a Kronecker rule (or shared between uses);
            ``None`` (default): those are an error.
        **options: ``lr``, ``momentum``, ``damping``, ``curvature_every``, … of
            ``CurvatureOptimizer`` (the thesis: curvature every 100 steps).
    """

    curvature_class = KFACCurvature
    factored_gradients = True

    def __init__(
        self,
        model,
        loss_fn,
        params=None,
        fisher_type: str = "mc",
        pi_damping: bool = False,
        other_structure: str | None = None,
        **options,
    ):
        options.setdefault("ema_decay", 0.95 if options.get("curvature_every", 1) == 1 else 0.0)
        super().__init__(model, loss_fn, params, **options)
        self.fisher_type = fisher_type
        self.pi_damping = pi_damping
        self.other_structure = other_structure

    def build_curvature(self, problem):  # noqa: D102
        return self.curvature_class(
            problem, fisher_type=self.fisher_type, seed=self.steps, other_structure=self.other_structure
        )

    def own_pass_outputs(self):
        """Empirical KFAC takes UᵀU from the step's pass; MC and type-2 need their own backward."""
        empirical = self.fisher_type == "empirical" and self.curvature_class is KFACCurvature
        return "second moments" if empirical else None

    def curvature_from_pass(self, problem, statistics):
        """Empirical KFAC from the step's own pass: G = UᵀU / c (U = c · the terms' output gradients)."""
        c = problem.reduction_factor
        factors = {name: (A, UU / c) for name, (A, UU, _) in statistics.items()}
        return KFACCurvature(
            problem, fisher_type="empirical", other_structure=self.other_structure, factors=factors
        )

    def make_inverse(self, C, damping):  # noqa: D102
        return C.inverse(damping, pi_damping=True) if self.pi_damping else C.inverse(damping)


class EKFAC(KFAC):
    """EKFAC (George et al. 2018): KFAC's eigenbases, diagonal refit to exact moments."""

    curvature_class = EKFACCurvature

    def make_inverse(self, C, damping):  # noqa: D102
        return C.inverse(damping)


class ACP(CurvatureOptimizer):
    """ACP, the thesis' amortized covariance preconditioner (Algorithm 3, eq. 6.3.3–6.3.4).

    d = (αI ⊗ A + λI)⁻¹ g per layer: the centered gradient times the inverse
    input covariance, divided by α (fixed, or the max-squared-gradient heuristic).
    """

    factored_gradients = True

    def __init__(self, model, loss_fn, params=None, alpha: float | str = "heuristic", **options):
        super().__init__(model, loss_fn, params, **options)
        self.alpha = alpha if alpha == "heuristic" else check_positive("alpha", alpha)

    def build_curvature(self, problem):  # noqa: D102
        return ACPCurvature(problem, alpha=self.alpha)

    def own_pass_outputs(self):  # noqa: D102
        return "largest"

    def curvature_from_pass(self, problem, statistics):
        """ACP from the step's own pass: its input moments, α from its output gradients U/c."""
        c = problem.reduction_factor
        moments = {name: (A, largest / c**2) for name, (A, _, largest) in statistics.items()}
        return ACPCurvature(problem, alpha=self.alpha, statistics=moments)


class DiagonalGGN(CurvatureOptimizer):
    """Diagonal preconditioning: d = g / (diag(C) + λ), C the GGN (exact diagonal) or the EF."""

    def __init__(self, model, loss_fn, params=None, curvature: str = "ggn", **options):
        super().__init__(model, loss_fn, params, **options)
        self.curvature_name = curvature
        self._class = exact_class(curvature)

    def build_curvature(self, problem):  # noqa: D102
        return Diagonal(self._class(problem))


class Newton(CurvatureOptimizer):
    """Damped Newton / Gauss-Newton / natural gradient with the dense minibatch matrix (small models).

    ``curvature="hessian"`` (Newton, §3.1.3), ``"ggn"`` (Gauss-Newton) or ``"fisher"``
    (natural gradient, §3.2.2). An indefinite damped Hessian is retried with more
    damping (``NotPositiveDefiniteError`` only if that fails too).
    """

    def __init__(self, model, loss_fn, params=None, curvature: str = "hessian", **options):
        options.setdefault("damping", 0.0)
        super().__init__(model, loss_fn, params, **options)
        self.curvature_name = curvature
        self._class = exact_class(curvature)

    def build_curvature(self, problem):  # noqa: D102
        C = self._class(problem)
        return DenseOperator(C.to_dense(), C.param_shapes, C.param_names)


class HessianFree(CurvatureOptimizer):
    """Hessian-free (Martens 2010): (C + λI) d = g by conjugate gradient on minibatch products.

    Args:
        curvature: ``"ggn"`` (default, positive semi-definite) or ``"hessian"``.
        cg_iterations: Cap on CG iterations per step.
        cg_tol: Relative residual at which CG stops.
    """

    def __init__(
        self,
        model,
        loss_fn,
        params=None,
        curvature: str = "ggn",
        cg_iterations: int = 50,
        cg_tol: float = 1e-4,
        **options,
    ):
        options.setdefault("damping", 1e-2)
        options.setdefault("damping_policy", "levenberg-marquardt")
        super().__init__(model, loss_fn, params, **options)
        self.curvature_name = curvature
        self._class = exact_class(curvature)
        self.cg_iterations = check_count("cg_iterations", cg_iterations)
        self.cg_tol = check_positive("cg_tol", cg_tol)

    def build_curvature(self, problem):  # noqa: D102
        return self._class(problem)

    def make_inverse(self, C, damping):  # noqa: D102
        return None  # matrix-free: solved per step

    def direction(self, gradient: list[Tensor]) -> list[Tensor]:
        """Truncated CG on (C + λI) d = g; an indefinite system is retried with 10× the damping."""
        for _ in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # truncation is intended
                    return self.curvature.solve(
                        gradient, self.damping, tol=self.cg_tol, maxiter=self.cg_iterations
                    )
            except NotPositiveDefiniteError:
                self.damping = max(self.damping * 10, 1e-6)
        raise NotPositiveDefiniteError(
            f"HessianFree: C + λI not positive definite even with damping {self.damping:.1e}"
        )
