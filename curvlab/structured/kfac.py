r"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

Per supported layer (registry in ``curvlab.passes.layers``), the block of the
GGN/Fisher over its weight [and bias] is replaced by G ⊗ A (docs/theory.md):

* expand (Eschenhagen et al. 2023): A = 1/(N R) Σ_{n,r} ã_{n,r} ã_{n,r}ᵀ and
  G = c Σ_v Σ_{n,r} g_{v,n,r} g_{v,n,r}ᵀ,
* reduce: A = 1/N Σ_n ā_n ā_nᵀ with ā_n = 1/R Σ_r ã_{n,r}, and
  G = c Σ_v Σ_n ḡ_{v,n} ḡ_{v,n}ᵀ with ḡ_{v,n} = Σ_r g_{v,n,r},

where ã is the layer input (with a trailing 1 when the bias is folded in), N the
number of examples of all batches, R the number of weight-sharing locations, c
the loss' reduction factor, and g_v the gradients w.r.t. the layer output of the
backpropagated output-space vectors, which define the flavour:

* ``"type-2"``: columns of a square root of Λ_n (exact in expectation; "KFLR"),
* ``"mc"``: gradients for S sampled labels ŷ ~ p(·|f), scaled by 1/√S,
* ``"empirical"``: the gradient for the true label.

With one example and no weight sharing, type-2 KFAC equals the exact GGN block.
The conventions agree with curvlinops 3.x ``KFACLinearOperator``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from curvlab.operators.exact import check_flavour, flavour_operator
from curvlab.options import check_count, check_integer
from curvlab.passes import fast, statistics
from curvlab.passes.layers import Layer, factor_sizes, find_layers
from curvlab.passes.vectors import GramSum, accumulate, gram, second_moment
from curvlab.problem import Problem
from curvlab.structured.block_diagonal import BlockDiagonalOperator
from curvlab.structured.kronecker import KroneckerBlock, LowRankKroneckerBlock, average_input_factors

KFAC_APPROX = ("expand", "reduce")
LOW_RANK_MIN_WIDTH = 1024  # narrower input factors stay dense under low_rank="auto" (< 8 MB in float64)


class _InputRows:
    """A layer's input vectors kept as rows while there are at most ``limit``, else their moment sum."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0
        self.rows: list[Tensor] = []
        self.dense: Tensor | None = None

    def add(self, rows: Tensor) -> bool:
        """Keep ``rows`` ``(m, d_A)``; ``False`` if this layer's A is (now) summed densely instead."""
        if self.dense is not None or self.limit == 0:
            return False
        self.count += rows.shape[0]
        self.rows.append(rows)
        if self.count > self.limit:  # over the limit: the moment of the rows so far, then dense
            self.dense = gram(torch.cat(self.rows))
            self.rows = []
        return True


class KFAC(BlockDiagonalOperator):
    """Kronecker-factored approximation of the GGN / Fisher / empirical Fisher.

    Args:
        problem: The problem; every parameter must belong to a supported layer
            (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``).
        fisher_type: ``"type-2"`` (exact output-space square root), ``"mc"``
            (sampled labels) or ``"empirical"`` (true labels).
        mc_samples: Labels per example for ``"mc"``.
        seed: Seed of the sampled labels (drawn on the CPU, device-independent).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing.
        separate_weight_and_bias: Give weight and bias separate blocks G ⊗ A_W
            and G ⊗ 1 instead of folding the bias into A.
        max_vectors: Backpropagated vectors per batched backward pass; ``None``
            (default) chooses by the memory of the layer-output gradients.
        other_structure: ``None`` (default): a parameter of a module without a
            Kronecker rule is an error. ``"exact"``: such parameters get the exact
            dense block of the same matrix (GGN for type-2, MC Fisher, empirical
            Fisher), one block per module; ``"diagonal"``: its exact diagonal.
        low_rank: Keep an input factor as A = ZᵀZ with Z the m averaged input vectors
            (``LowRankKroneckerBlock``) instead of the dense d_A × d_A matrix:
            ``"auto"`` (default) when d_A ≥ 1024 and m ≤ d_A / 2 (half the memory or
            less), ``True`` whenever m < d_A, ``False`` never. Not under a process
            group (the ranks sum dense factors). Exact either way.
        factors: ``{layer name: (A, G)}`` computed elsewhere (an optimizer's own training
            pass: ``curvlab.optim``), with the conventions above; no statistics pass.
    """

    def __init__(
        self,
        problem: Problem,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        seed: int = 0,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        max_vectors: int | None = None,
        other_structure: str | None = None,
        low_rank: bool | str = "auto",
        factors: dict | None = None,
    ):
        if low_rank not in ("auto", True, False):
            raise ValueError(f"low_rank must be 'auto', True or False, got {low_rank!r}")
        if other_structure not in (None, "exact", "diagonal"):
            raise ValueError(f"other_structure must be None, 'exact' or 'diagonal', got {other_structure!r}")
        check_flavour(fisher_type)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        self.problem = problem
        self.fisher_type = fisher_type
        self.mc_samples = check_count("mc_samples", mc_samples)
        self.seed = check_integer("seed", seed)
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.max_vectors = None if max_vectors is None else check_count("max_vectors", max_vectors)
        self.other_structure = other_structure
        self.low_rank = low_rank if problem.group is None else False
        self.unsupported: list[int] = []
        self.layers = find_layers(problem, self.unsupported if other_structure else None)
        self._fast = fast.compile(problem)  # chosen once: the statistics pass of this model
        self.low_rank_layers: set[str] = set()
        self.factors = self._collect_factors() if factors is None else self._given(factors)
        blocks = []
        self.block_sources: list[tuple[Layer, slice]] = []  # (layer, columns of ã) per block
        for layer in self.layers:
            A, G = self.factors[layer.name]
            for indices, block, columns in self._blocks_of(layer, A, G):
                blocks.append((indices, block))
                self.block_sources.append((layer, columns))
        blocks.extend(self._other_blocks())
        super().__init__(
            blocks, [p.shape for p in problem.params], problem.dtype, problem.device, problem.param_names
        )

    def _described(self) -> dict:
        options = ("fisher_type", "mc_samples", "seed", "kfac_approx", "separate_weight_and_bias")
        return {option: getattr(self, option) for option in options}

    def _factor_keys(self):
        """Per Kronecker block: its layer's name and the columns of the layer's A it uses."""
        return [
            (layer.name, None if columns == slice(None) else columns) for layer, columns in self.block_sources
        ]

    def _stored_factors(self, key, block):
        A, G = self.factors[key]  # the layer's whole factors (a block may use some of A's columns)
        return {"Z" if key in self.low_rank_layers else "A": A, "G": G}

    def _exact_operator(self, problem: Problem):
        """The exact matrix this flavour approximates, over ``problem``'s parameters."""
        return flavour_operator(problem, self.fisher_type, self.mc_samples, self.seed)

    def _other_blocks(self):
        """Blocks for parameters of modules without a Kronecker rule (``other_structure``)."""
        if not self.unsupported:
            return []
        from curvlab.structured.diagonal import BlockDiagonal, Diagonal

        exact = self._exact_operator(
            self.problem.restrict([self.problem.params[i] for i in self.unsupported])
        )
        if self.other_structure == "diagonal":
            return [(list(self.unsupported), Diagonal(exact))]
        other = BlockDiagonal(exact, by="layer")
        return [
            ([self.unsupported[j] for j in indices], block)
            for indices, block in zip(other.block_indices, other.block_operators)
        ]

    def _statistics(self):
        return statistics(
            self.problem,
            self.layers,
            self.fisher_type,
            self.mc_samples,
            self.seed,
            self.max_vectors,
            self._fast,
        )

    def _blocks_of(self, layer: Layer, A: Tensor, G: Tensor):
        """``(indices, block, columns of ã)`` of one layer, bias folded or separate."""
        names = self.problem.param_names
        shapes = [p.shape for p in self.problem.params]
        has_weight, has_bias = layer.weight is not None, layer.bias is not None
        # A low-rank factor is its root Z (m, d_A): columns of A are columns of Z.
        low_rank = layer.name in self.low_rank_layers
        Block = LowRankKroneckerBlock if low_rank else KroneckerBlock

        def columns_of(columns: slice) -> Tensor:
            return A[:, columns] if low_rank else A[columns, columns]

        if has_weight and has_bias and not self.separate_weight_and_bias:
            indices = [layer.weight, layer.bias]
            block = Block(G, A, [shapes[i] for i in indices], True, [names[i] for i in indices])
            return [(indices, block, slice(None))]
        blocks = []
        if has_weight:
            columns = slice(0, A.shape[-1] - 1) if has_bias else slice(None)
            block = Block(G, columns_of(columns), [shapes[layer.weight]], False, [names[layer.weight]])
            blocks.append(([layer.weight], block, columns if has_bias else slice(0, A.shape[-1])))
        if has_bias:  # a 1 × 1 factor: dense
            A_bias = A[:, -1:].T @ A[:, -1:] if low_rank else A[-1:, -1:]
            block = KroneckerBlock(G, A_bias, [shapes[layer.bias]], False, [names[layer.bias]])
            blocks.append(([layer.bias], block, slice(-1, None)))
        return blocks

    def _collect_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        if not self.layers:  # every parameter has another structure: no pass needed
            return {}
        reduce = self.kfac_approx == "reduce"
        problem = self.problem

        def zeros() -> list[Tensor]:  # this rank's sums where its shard has no batch
            sizes = [factor_sizes(layer, problem.params) for layer in self.layers]
            options = {"dtype": problem.dtype, "device": problem.device}
            return [torch.zeros(d_A, d_A, **options) for _, d_A in sizes] + [
                torch.zeros(d_out, d_out, **options) for d_out, _ in sizes
            ]

        def local() -> list[Tensor]:
            A_sum: dict[str, Tensor] = {}
            G_sum: dict[str, Tensor] = {}
            roots = {layer.name: _InputRows(self._row_limit(layer)) for layer in self.layers}
            for batch in self._statistics():
                for layer in self.layers:  # one input moment per batch, one GEMM
                    a = batch.inputs[layer.name]
                    if not roots[layer.name].add(self._input_rows(a)):
                        accumulate(A_sum, layer.name, self._input_moment(a))
                grams = {layer.name: GramSum(reduce) for layer in self.layers}
                for chunk in batch.chunks:
                    for layer in self.layers:
                        grams[layer.name].add(chunk.gradients[layer.name])
                for name, summed in grams.items():
                    accumulate(G_sum, name, summed.result())
            if not G_sum:
                return zeros()
            for name, rows in roots.items():
                if rows.dense is not None:  # more input vectors than a low-rank root is worth
                    accumulate(A_sum, name, rows.dense)
                elif rows.rows:
                    self.low_rank_layers.add(name)
                    A_sum[name] = torch.cat(rows.rows)
            return [A_sum[layer.name] for layer in self.layers] + [G_sum[layer.name] for layer in self.layers]

        # One all-reduce of every factor's upper triangle: the global sums
        sums = problem.sum_over_ranks(local, zeros, symmetric=True)
        L, c, N = len(self.layers), problem.reduction_factor, problem.num_counted_examples
        return {
            layer.name: (
                sums[i].div_(N**0.5 if layer.name in self.low_rank_layers else N),  # A = ZᵀZ: Z/√N
                sums[L + i].mul_(c),
            )
            for i, layer in enumerate(self.layers)
        }

    def running_average(self, older: KFAC, decay: float, other_blocks: list) -> KFAC:
        """The running average decay · older + (1 − decay) · self, factor by factor: a KFAC.

        Args:
            older: A KFAC of the same layers (an earlier estimate).
            decay: The weight of ``older``, in [0, 1).
            other_blocks: The averaged blocks of the parameters without a Kronecker rule
                (``other_structure``), in this KFAC's order.

        Two low-rank roots stay a root [√decay Zₒ; √(1 − decay) Zₙ] while it has fewer
        rows than columns; otherwise the averaged input factor is dense.
        """
        result = copy.copy(self)
        result.factors, result.low_rank_layers = {}, set()
        blocks, result.block_sources = [], []
        for layer in self.layers:
            (A_new, G_new), (A_old, G_old) = self.factors[layer.name], older.factors[layer.name]
            A, is_root = average_input_factors(
                A_old, layer.name in older.low_rank_layers, A_new, layer.name in self.low_rank_layers, decay
            )
            if is_root:
                result.low_rank_layers.add(layer.name)
            result.factors[layer.name] = (A, decay * G_old + (1 - decay) * G_new)
            for indices, block, columns in result._blocks_of(layer, *result.factors[layer.name]):
                blocks.append((indices, block))
                result.block_sources.append((layer, columns))
        BlockDiagonalOperator.__init__(
            result, blocks + other_blocks, self.param_shapes, self.dtype, self.device, self.param_names
        )
        return result

    def _given(self, factors: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """``factors`` checked against the layers: one dense (A, G) of the right sizes per layer."""
        given = {}
        for layer in self.layers:
            d_out, d_A = factor_sizes(layer, self.problem.params)
            A, G = factors[layer.name]
            if A.shape != (d_A, d_A) or G.shape != (d_out, d_out):
                raise ValueError(
                    f"factors of layer {layer.name!r}: expected A {(d_A, d_A)} and G {(d_out, d_out)}, "
                    f"got {tuple(A.shape)} and {tuple(G.shape)}"
                )
            given[layer.name] = (A, G)
        return given

    def _row_limit(self, layer: Layer) -> int:
        """How many input vectors a low-rank root of this layer's A may hold (0: keep A dense)."""
        d_A = factor_sizes(layer, self.problem.params)[1]
        if self.low_rank is True:
            return d_A - 1
        if self.low_rank == "auto" and d_A >= LOW_RANK_MIN_WIDTH:
            return d_A // 2
        return 0

    def _input_rows(self, a: Tensor) -> Tensor:
        """The rows r with Σ r rᵀ = ``_input_moment(a)``: ``(m, d_A)``."""
        if self.kfac_approx == "expand":
            rows = a.reshape(-1, a.shape[-1])
            return rows if a.shape[1] == 1 else rows / a.shape[1] ** 0.5
        return a.mean(1)

    def _input_moment(self, a: Tensor) -> Tensor:
        """Σ_n over the batch of the input second moment (before dividing by N)."""
        if self.kfac_approx == "expand":
            moment = second_moment(a)
            return moment if a.shape[1] == 1 else moment.div_(a.shape[1])
        return second_moment(a.mean(1))
