"""What a fast path offers: the interface every structure-exploiting pass implements."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

from curvlab.passes.layers import Layer
from curvlab.passes.vectors import BatchStatistics
from curvlab.problem import Problem


class FastPath:
    """A compiled model family: the exact operators' products and the layerwise statistics, by hand.

    ``compile`` recognises the family and returns an instance, or ``None``. Every
    method gives the numbers of the general routes (torch.func products, the
    autograd statistics pass) to rounding; tests check each against them.
    """

    covers_parameters = False  # forms, products and the gradient cover every parameter of the problem

    @classmethod
    def compile(cls, problem: Problem) -> FastPath | None:
        """This fast path for ``problem``, or ``None`` where its model is not of the family."""
        raise NotImplementedError

    def applies(self) -> bool:
        """Whether the model still is what was compiled (no hook or parametrization added since)."""
        raise NotImplementedError

    # ------------------------------------------------------------ exact operators
    def primal(self, X: Tensor, y: Tensor):
        """The primal pass of one batch, shared by its forms, products and gradient."""
        raise NotImplementedError

    def quadratic_forms(self, batches: Iterable, Vs: list[Tensor], second_order: bool) -> Tensor:
        """vᵀHv (``second_order``) or vᵀGv for directions ``Vs[i]`` ``(k, *shape)``: ``(k,)``, scaled by c."""
        raise NotImplementedError

    def products(self, batches: Iterable, Vs: list[Tensor], second_order: bool, out=None) -> list[Tensor]:
        """H V (``second_order``) or G V, like ``Vs`` (written into ``out`` if given), scaled by c."""
        raise NotImplementedError

    def gradient(self, batches: Iterable) -> Tensor:
        """∇_θ R, flat ``(n,)``."""
        raise NotImplementedError

    # ------------------------------------------------------------ layerwise statistics
    def covers(self, layers: list[Layer]) -> bool:
        """Whether ``statistics`` handles these layers."""
        return False

    def statistics(
        self, layers: list[Layer], fisher_type: str, mc_samples: int = 1, seed: int = 0
    ) -> Iterator[BatchStatistics]:
        """The statistics protocol (``curvlab.passes.vectors``), one ``BatchStatistics`` per batch."""
        raise NotImplementedError
