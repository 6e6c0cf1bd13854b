r"""ACP: the amortized covariance preconditioner of the thesis (Algorithm 3, §6.3).

Only the input side is estimated; the output side is α I:  B ≈ α I ⊗ A with
A = 1/N Σ ã ãᵀ the (uncentered) second moment of the augmented input ã = [h; 1].
Its inverse applied to the mean gradient reproduces the centered updates of
eq. 6.3.3–6.3.4: by the Schur complement of A, whose bias-free part minus h̄h̄ᵀ is
the input covariance C,
  ΔW = (1/α) (1/n) Σ_j ∇_{a_j}ℓ (h_j − h̄)ᵀ C⁻¹,   Δb = (1/α)(1/n) Σ_j ∇_{a_j}ℓ − ΔW h̄.

α is fixed, or the thesis' heuristic α = max_{n,j} (∇_{a_n} ℓ_n)_j² per layer
(true-label gradients), multiplied by c·N so that α I estimates the output-side
factor of the risk's curvature (c·N = 1 for a mean over examples).
"""

from __future__ import annotations

import torch

from curvlab.passes.autograd import autograd_statistics
from curvlab.passes.layers import factor_sizes, find_layers
from curvlab.passes.vectors import accumulate, second_moment
from curvlab.problem import Problem
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kronecker import KroneckerBlock


class ACP(BlockDiagonalOperator):
    """αI ⊗ A per layer (bias folded into A), the thesis' covariance preconditioner.

    Args:
        problem: The problem (Linear / Conv layers, as for KFAC).
        alpha: A positive number, or ``"heuristic"`` for α = c·N·max (∇_a ℓ_n)²
            over all examples, per layer.
        statistics: ``{layer name: (A, max_n (∇_a ℓ_n)²)}`` computed elsewhere (an
            optimizer's own training pass: ``curvlab.optim``); no statistics pass.
    """

    def __init__(self, problem: Problem, alpha: float | str = "heuristic", statistics: dict | None = None):
        if alpha != "heuristic" and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a positive number or 'heuristic', got {alpha!r}")
        self.problem = problem
        self.layers = find_layers(
            problem, remedy="ACP covers those layers only: leave its parameters out of the problem's params"
        )
        sizes = [factor_sizes(layer, problem.params) for layer in self.layers]

        def zeros() -> list[torch.Tensor]:
            options = {"dtype": problem.dtype, "device": problem.device}
            return [torch.zeros(d_A, d_A, **options) for _, d_A in sizes] + [
                torch.zeros(len(sizes), **options)
            ]

        def local() -> list[torch.Tensor]:
            A_sum, max_square = {}, {}
            for batch in autograd_statistics(problem, self.layers, "empirical"):
                for layer in self.layers:
                    a = batch.inputs[layer.name]
                    accumulate(A_sum, layer.name, second_moment(a).div_(a.shape[1]))
                for chunk in batch.chunks:
                    for layer in self.layers:
                        square = chunk.gradients[layer.name].tensor().pow(2).max()
                        max_square[layer.name] = torch.maximum(max_square.get(layer.name, square), square)
            if not A_sum:
                return zeros()
            squares = torch.stack([max_square[layer.name] for layer in self.layers])
            return [A_sum[layer.name] for layer in self.layers] + [squares]

        if statistics is not None:  # the moments as given: A_sum = N·A
            N = problem.num_counted_examples
            A_sums = [statistics[layer.name][0] * N for layer in self.layers]
            squares = torch.stack([torch.as_tensor(statistics[layer.name][1]) for layer in self.layers])
        elif problem.group is None:
            *A_sums, squares = local()
        else:  # the input moments summed over the ranks, the largest squared gradients maximised
            try:
                parts, error = local(), None
            except Exception as caught:  # noqa: BLE001 (raised again after the collective)
                parts, error = zeros(), caught
            *A_sums, squares = parts
            problem.group.sum_symmetric_(A_sums, error)
            problem.group.max_(squares)
        A_sum = {layer.name: A for layer, A in zip(self.layers, A_sums)}
        max_square = {layer.name: square for layer, square in zip(self.layers, squares)}
        scale = problem.reduction_factor * problem.num_counted_examples
        shapes, names = [p.shape for p in problem.params], problem.param_names
        self.alphas = {}
        blocks = []
        for layer in self.layers:
            value = scale * max_square[layer.name].item() if alpha == "heuristic" else float(alpha)
            self.alphas[layer.name] = value
            A = A_sum[layer.name] / problem.num_counted_examples
            d_out = (problem.params[layer.weight if layer.weight is not None else layer.bias]).shape[0]
            G = value * torch.eye(d_out, dtype=problem.dtype, device=problem.device)
            indices = [i for i in (layer.weight, layer.bias) if i is not None]
            folded = layer.weight is not None and layer.bias is not None
            blocks.append(
                (
                    indices,
                    KroneckerBlock(G, A, [shapes[i] for i in indices], folded, [names[i] for i in indices]),
                )
            )
        super().__init__(blocks, shapes, problem.dtype, problem.device, names)
        self.alpha = alpha

    def _described(self) -> dict:
        return {"alpha": self.alpha}
