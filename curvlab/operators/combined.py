"""Sums and multiples of curvature objects (``C + D``, ``c * C``), where no structure is shared.

Structured objects keep their structure when they can (``_added``, ``_scaled``:
dense + dense is dense, c · (G ⊗ A) = (c G) ⊗ A, blocks over the same partition add
block by block); these two classes are the general case, matrix-free: a product is
the terms' products.
"""

from __future__ import annotations

from curvlab.errors import UnsupportedError
from curvlab.operators.base import CurvatureOperator


class SumOperator(CurvatureOperator):
    """C₁ + C₂ + … over the same parameters."""

    def __init__(self, terms: list[CurvatureOperator]):
        flat = []
        for term in terms:
            flat.extend(term.terms if isinstance(term, SumOperator) else [term])
        first = flat[0]
        super().__init__(first.param_shapes, first.dtype, first.device, first.param_names)
        self.terms = flat

    def _operands(self):
        return list(self.terms)

    def _matmat(self, Vs):
        total = self.terms[0]._matmat(Vs)
        for term in self.terms[1:]:
            total = [t.add_(p) for t, p in zip(total, term._matmat(Vs))]
        return total

    def _block(self, indices):
        return SumOperator([term._block(indices) for term in self.terms])

    def diag(self):  # noqa: D102
        return sum(term.diag() for term in self.terms)

    def trace(self):  # noqa: D102
        return sum(term.trace() for term in self.terms)

    def _scaled(self, scale):
        return SumOperator([term._scaled(scale) for term in self.terms])

    def description(self) -> dict:  # noqa: D102
        return {**super().description(), "terms": [term.description() for term in self.terms]}


class ScaledOperator(CurvatureOperator):
    """c · C."""

    def __init__(self, scale: float, operator: CurvatureOperator):
        super().__init__(operator.param_shapes, operator.dtype, operator.device, operator.param_names)
        self.scale = float(scale)
        self.operator = operator

    def _operands(self):
        return [self.operator]

    def _matmat(self, Vs):
        return [p.mul_(self.scale) for p in self.operator._matmat(Vs)]

    def _block(self, indices):
        return self.operator._block(indices)._scaled(self.scale)

    def _scaled(self, scale):
        return self.operator._scaled(self.scale * scale)

    def diag(self):  # noqa: D102
        return self.operator.diag() * self.scale

    def trace(self):  # noqa: D102
        return self.operator.trace() * self.scale

    def frobenius_norm(self):  # noqa: D102
        return self.operator.frobenius_norm() * abs(self.scale)

    @property
    def structured_eigvalsh(self) -> bool:  # noqa: D102
        return self.operator.structured_eigvalsh

    def eigvalsh(self, max_bytes=None):  # noqa: D102
        return (self.operator.eigvalsh(max_bytes) * self.scale).sort().values

    @property
    def has_inverse(self) -> bool:  # noqa: D102
        return self.scale > 0 and self.operator.has_inverse

    def inverse(self, damping=0.0, pi_damping=False):
        """(cC + λI)⁻¹ = c⁻¹ (C + λ/c I)⁻¹ for c > 0, from C's inverse."""
        if self.scale <= 0:
            raise UnsupportedError(f"no explicit inverse of {self.scale:g} · C (negative or zero scale)")
        return self.operator.inverse(damping / self.scale, pi_damping=pi_damping)._scaled(1 / self.scale)

    def description(self) -> dict:  # noqa: D102
        return {**super().description(), "scale": self.scale, "of": self.operator.description()}
