r"""The exact curvature matrices as matrix-free operators.

Hessian H = ∇²_θ R by reverse-over-reverse autodiff; GGN, exact/Monte-Carlo
Fisher and empirical Fisher share the form C = c Σ_n J_nᵀ M_n J_n and differ
only in the output-space matrix M_n
(``curvlab.losses``). A product with k vectors costs one forward pass with k
forward-mode tangents (J v), the output-space product, and one batched
reverse pass (Jᵀ ·), all vectorised over the k columns with ``torch.func.vmap``.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from curvlab.errors import UnsupportedError
from curvlab.memory import block_budget
from curvlab.operators.base import CurvatureOperator
from curvlab.options import check_count, check_integer
from curvlab.passes import fast, statistics
from curvlab.passes.autograd import flavour_passes
from curvlab.passes.layers import find_layers
from curvlab.passes.vectors import accumulate
from curvlab.problem import Problem
from curvlab.sampling import mc_noise, sampled_output_gradients
from curvlab.shims import FORWARD_MODE


@functools.cache
def _load_forward_mode_quietly() -> None:
    """Load torch's forward-mode AD decompositions once, without their deprecation warning.

    torch's first forward-mode product imports decompositions that call
    ``torch.jit.script``, which recent torch versions flag with a ``FutureWarning``
    that would reach every user of the GGN/Fisher products and that they cannot act on.
    """
    with warnings.catch_warnings(), FORWARD_MODE:
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


class ProblemOperator(CurvatureOperator):
    """A curvature operator of a ``Problem``: products summed over its batches.

    Where a fast path (``curvlab.passes.fast``) covers the model, chosen once here,
    the Hessian and the GGN take their forms, products and the gradient from it on
    a primal pass kept between calls; every other case takes the general route.
    """

    # The fast path's forms and products of this matrix: the Hessian (True), the GGN
    # (False), or none (None: the Fisher and empirical Fisher).
    _second_order: bool | None = None

    def __init__(self, problem: Problem):
        if not isinstance(problem, Problem):
            raise TypeError(f"expected a curvlab.Problem, got {type(problem).__name__}")
        super().__init__(
            [p.shape for p in problem.params], problem.dtype, problem.device, problem.param_names
        )
        self.problem = problem
        self._primal_cache = None
        self._fast = fast.compile(problem) if self._second_order is not None else None

    def _options(self) -> dict:
        """Constructor keyword arguments other than the problem (for blocks)."""
        return {}

    def _described(self) -> dict:
        return self._options()

    _memos = ("_primal_cache",)  # attributes holding state kept between products

    def _state_tensors(self) -> list[Tensor]:
        """Everything the curvature depends on: every parameter and buffer of the model, and the data."""
        model = self.problem.model
        tensors = [*model.parameters(), *model.buffers()]
        tensors += [t for batch in self.problem.data for t in batch]
        return tensors

    def _caching(self) -> bool:
        """Keep state between products: only for one batch held in a list (small, and valid)."""
        return self.problem.num_local_batches == 1 and isinstance(self.problem.data, list)

    def _versions(self, tensors: list[Tensor]) -> tuple:
        """In-place versions of ``tensors``, and every module's training flag.

        With ``eval_mode=False`` the model's own mode is part of the function (a batch
        norm normalizes by the batch's or by its running statistics).
        """
        modes = () if self.problem.eval_mode else tuple(m.training for m in self.problem.model.modules())
        return tuple((id(t), t._version) for t in tensors), modes

    def _is_current(self, cached, tensors: list[Tensor], compare_values: bool) -> bool:
        """Whether ``cached = (versions, state, values)`` was built from ``tensors`` as they are now.

        In-place versions catch ``p.add_``, optimizer steps and ``load_state_dict``; edits
        through ``p.data`` (``p.data.add_(1)``, ``p.data = …``) bump no version, so the
        values themselves are compared too (one read of the model and the data; skipped
        for the products inside a ``fixed_state()`` scope, which checked on entry).
        """
        if cached is None or cached[0] != self._versions(tensors):
            return False
        values = cached[2]
        return not compare_values or all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(values, tensors)
        )

    def _memo(self, name: str, build):
        """``build()``, kept in attribute ``name`` until the model's values or the data change."""
        tensors = self._state_tensors()
        cached = getattr(self, name)
        if not self._is_current(cached, tensors, compare_values=not self._fixed_depth):
            setattr(self, name, None)  # free the stale state before building the new one
            values = [t.detach().clone() for t in tensors]
            setattr(self, name, (self._versions(tensors), build(), values))
        return getattr(self, name)[1]

    def _drop_stale_state(self) -> None:
        if self._fixed_depth:
            return  # checked when the outer scope was entered
        tensors = None
        for name in self._memos:
            if getattr(self, name) is not None:
                tensors = self._state_tensors() if tensors is None else tensors
                if not self._is_current(getattr(self, name), tensors, compare_values=True):
                    setattr(self, name, None)

    def clear_cache(self) -> None:
        """Free the state kept between products."""
        self._primal_cache = None

    def _fast_route(self):
        """The fast path for this matrix's forms and products, or ``None`` (the general route)."""
        route = self._fast
        if route is None or not route.covers_parameters or not route.applies():
            return None
        return route

    def _primal_batches(self, route):
        """Every batch's primal pass: kept between calls where ``_caching`` allows."""
        batches = (route.primal(X, y) for X, y in self.problem.batches())
        if self._caching():
            return self._memo("_primal_cache", lambda: list(batches))
        return batches

    # ------------------------------------------------------------ products, summed over the ranks
    @property
    def process_group(self):  # noqa: D102
        return self.problem.group

    def _quadratic_forms(self, V):
        """vᵢᵀ C vᵢ; by the fast path's forward propagation where it applies (no products)."""
        route = self._fast_route()
        if route is None:
            return super()._quadratic_forms(V)  # by products, already summed over the ranks

        def local():
            return [
                route.quadratic_forms(self._primal_batches(route), self.flat_to_list(V), self._second_order)
            ]

        zeros = torch.zeros(V.shape[1], dtype=V.dtype, device=V.device)
        return self.problem.sum_over_ranks(local, lambda: [zeros])[0]

    def _matmat(self, Vs):
        """This rank's product summed over the ranks: one all-reduce (none without a process group)."""
        return self.problem.sum_over_ranks(
            lambda: self._local_matmat(Vs), lambda: [torch.zeros_like(V) for V in Vs]
        )

    def _local_matmat(self, Vs):
        route = self._fast_route()
        if route is None:
            return self._general_matmat(Vs)
        return route.products(self._primal_batches(route), Vs, self._second_order)

    def _matvec_into(self, v, out):
        route = self._fast_route()
        if route is None or not out.is_contiguous():
            return super()._matvec_into(v, out)  # by _matmat: summed over the ranks

        def local():
            outs = self.flat_to_list(out.unsqueeze(1))  # views of out
            direction = self.flat_to_list(v.unsqueeze(1))
            route.products(self._primal_batches(route), direction, self._second_order, outs)
            return [out]

        self.problem.sum_over_ranks(local, lambda: [out.zero_()])
        return out

    def _block(self, indices):
        params = [self.problem.params[i] for i in indices]
        return type(self)(self.problem.restrict(params), **self._options())

    def _diag_route(self):
        """One statistics pass where the matrix has a flavour and its layers allow it, else products.

        Under a process group every rank takes the same route: products where any rank
        could not take the pass; the pass' sums are added over the ranks.
        """
        layerwise, error = None, None
        try:
            layerwise = self._layerwise_diagonal()
        except Exception as caught:  # noqa: BLE001 (raised again after the collective)
            error = caught
        group = self.problem.group
        if group is not None:
            missing = torch.tensor([1.0 if layerwise is None and error is None else 0.0], dtype=torch.float64)
            if group.sum_([missing], error)[0] > 0:
                layerwise = None
            else:
                layerwise = group.sum_([layerwise])[0]
        elif error is not None:
            raise error
        if layerwise is not None:
            return layerwise, "layerwise"
        per_example = self._per_example_diagonal() if group is None else None
        return (per_example, "per-example") if per_example is not None else super()._diag_route()

    def _per_example_diagonal(self) -> Tensor | None:
        """Diag = c Σ_n Σ_v (J_nᵀ v_n)², one backward pass per (example, vector), batched.

        For parameters without layerwise statistics (BatchNorm, LayerNorm, embeddings,
        attention's packed projections): the flavour's backpropagated vectors v (as in
        KFAC) are pulled back one example at a time, each masked to its example, so
        the squares are those of the per-example Jacobians J_n = ∂f(x_n)/∂θ, coupled
        through batch statistics where the model couples its examples. Costs about
        (examples × vectors) backward passes over a batch; ``None`` where that is more
        than half the n products of the general route (and under a process group).
        """
        flavour = flavour_of(self)
        problem = self.problem
        if flavour is None:
            return None
        params = [p.detach().requires_grad_(True) for p in problem.params]
        total = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)
        checked = False

        def forward(X: Tensor):
            with torch.enable_grad():
                return problem.forward(params, X), None

        for _, output, vectors, _ in flavour_passes(problem, flavour, forward):
            count, examples = vectors.shape[0], output.shape[0]
            if not checked:
                if problem.num_examples * count > problem.num_params // 2:
                    return None
                checked = True
            flat = vectors.reshape(count, examples, -1)
            pairs = count * examples
            per_pass = max(
                1, min(pairs, block_budget(problem.device) // max(1, output.numel() * output.element_size()))
            )
            for start in range(0, pairs, per_pass):
                ids = torch.arange(start, min(pairs, start + per_pass), device=problem.device)
                rows = torch.arange(len(ids), device=problem.device)
                masked = flat.new_zeros(len(ids), examples, flat.shape[-1])
                masked[rows, ids % examples] = flat[ids // examples, ids % examples]
                grads = torch.autograd.grad(
                    output,
                    params,
                    masked.reshape(len(ids), *output.shape),
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
                total += torch.cat(
                    [
                        torch.zeros(p.numel(), dtype=total.dtype, device=total.device)
                        if g is None
                        else g.reshape(len(ids), -1).pow(2).sum(0)
                        for p, g in zip(params, grads)
                    ]
                )
        return total.mul_(problem.reduction_factor)

    def _layerwise_diagonal(self) -> Tensor | None:
        """The exact diagonal from one statistics pass: Σ (g ãᵀ)² per layer (``squared_moments``).

        ``None`` where the matrix is not a flavour's (the Hessian, a Fisher of other
        options) or its layers have no layerwise statistics.
        """
        flavour = flavour_of(self)
        problem = self.problem
        if flavour is None:
            return None
        try:
            layers = find_layers(problem)
            moments: dict[str, Tensor] = {}
            for batch in statistics(problem, layers, *flavour, fast_path=fast.compile(problem)):
                for chunk in batch.chunks:
                    for layer in layers:
                        a = batch.inputs[layer.name][chunk.examples]
                        accumulate(moments, layer.name, chunk.gradients[layer.name].squared_moments(a))
        except UnsupportedError:  # no rule, or found during the pass: a layer called twice
            return None
        parts: list[Tensor | None] = [None] * len(problem.params)
        for layer in layers:
            if layer.name not in moments:  # an empty shard of a process group: its share is 0
                for i in (layer.weight, layer.bias):
                    if i is not None:
                        parts[i] = torch.zeros_like(problem.params[i])
                continue
            m = moments[layer.name] * problem.reduction_factor
            if layer.weight is not None:
                weight_columns = m.shape[1] - (1 if layer.bias is not None else 0)
                parts[layer.weight] = m[:, :weight_columns].reshape(problem.params[layer.weight].shape)
            if layer.bias is not None:
                parts[layer.bias] = m[:, -1].reshape(problem.params[layer.bias].shape)
        return torch.cat([p.flatten() for p in parts])

    def _batch_matmat(self, X: Tensor, y: Tensor, index: int, Vs: list[Tensor]) -> list[Tensor]:
        """Sum-reduced product of one batch; ``index`` numbers the batch."""
        raise NotImplementedError

    def _general_matmat(self, Vs):
        """This rank's product by the general route: one ``_batch_matmat`` per batch, summed, scaled by c.

        ``_batch_matmat`` gets the batch's global index (Monte-Carlo labels are drawn by it).
        """
        total = None
        offset = self.problem.batch_offset
        for index, (X, y) in enumerate(self.problem.batches()):
            part = self._batch_matmat(X, y, offset + index, Vs)
            total = part if total is None else [t.add_(p) for t, p in zip(total, part)]
        if total is None:  # an empty shard of a process group
            return [torch.zeros_like(V) for V in Vs]
        c = self.problem.reduction_factor
        return [t.mul_(c) for t in total]

    def _detached_params(self) -> tuple[Tensor, ...]:
        return tuple(p.detach() for p in self.problem.params)

    def gradient(self) -> Tensor:
        """∇_θ R of the operator's problem, flat ``(n,)``; off the kept primal pass where there is one."""
        route = self._fast_route()
        if route is not None and self._caching():
            zeros = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            local = lambda: [route.gradient(self._primal_batches(route))]  # noqa: E731
            return self.problem.sum_over_ranks(local, lambda: [zeros])[0]
        return self.problem.gradient()


def _gradient_with_graph(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    """∇ loss with its graph; zeros (no graph) for parameters the loss does not use."""
    gradient = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gradient, params)]


class Hessian(ProblemOperator):
    """H = ∇²_θ R(θ), by differentiating the gradient once more (Pearlmutter 1994).

    Reverse-over-reverse: the batch gradient is built with a graph, then pulled
    back along the k vectors in one batched pass (``is_grads_batched``). Where a
    fast path covers the model (``curvlab.passes.fast``: a plain MLP) the products
    are forward-over-reverse in closed form on a cached primal pass instead: the
    same numbers, without autograd's engine.

    Args:
        problem: The problem.
        cache_graph: Keep the gradient's graph (a plain MLP: its primal pass)
            between products, so repeated products (Lanczos, traces, CG) only pay
            the second backward pass, not the forward and first backward pass again.
            ``None``
            (default): cache when the data is a single in-memory batch, where the
            graph is no larger than one product's peak memory. The cache is
            rebuilt whenever a parameter, buffer or the data is modified in place
            (an optimizer step), and dropped by ``clear_cache()``.
    """

    _memos = ("_primal_cache", "_cache")
    _second_order = True

    def __init__(self, problem: Problem, cache_graph: bool | None = None):
        super().__init__(problem)
        self.cache_graph = cache_graph
        self._cache = None

    def _options(self):
        return {"cache_graph": self.cache_graph}

    def clear_cache(self) -> None:
        """Free the cached gradient graph (and forward pass)."""
        super().clear_cache()
        self._cache = None

    def _caching(self) -> bool:
        if self.cache_graph is None:
            return super()._caching()
        return bool(self.cache_graph)

    def _gradient_graphs(self):
        """Per batch: (leaf parameters, gradient with graph, connected indices).

        The graph is that of c · (batch loss), so its pull-backs are already
        scaled by the reduction factor (no extra pass over each product).
        """
        c = self.problem.reduction_factor
        return [self._gradient_graph(X, y, c) for X, y in self.problem.batches()]

    def _gradient_graph(self, X, y, scale: float = 1.0):
        """(leaf parameters, ∇(scale · batch loss) with its graph, indices whose gradient has one)."""
        params = [p.detach().requires_grad_(True) for p in self.problem.params]
        gradient = _gradient_with_graph(self.problem.batch_loss(params, X, y) * scale, params)
        connected = [i for i, g in enumerate(gradient) if g.requires_grad]
        return params, gradient, connected

    def _cached_graphs(self):
        return self._memo("_cache", self._gradient_graphs)

    def gradient(self) -> Tensor:
        """∇_θ R, flat; read off the cached primal pass or graph (no extra pass) when caching."""
        if not self._caching() or self._fast_route() is not None:
            return super().gradient()

        def local():
            total = None
            for _, gradient, _ in self._cached_graphs():
                flat = torch.cat([g.detach().reshape(-1) for g in gradient])
                total = flat if total is None else total.add_(flat)
            return [total]

        zeros = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self.problem.sum_over_ranks(local, lambda: [zeros])[0]

    def _general_matmat(self, Vs):
        if not self._caching():
            return super()._general_matmat(Vs)
        total = None
        for graph in self._cached_graphs():
            # Column by column: with the graph kept, one backward per vector is
            # cheaper than the vmapped batched backward.
            columns = [
                self._pull_back(*graph, [V[j : j + 1] for V in Vs], retain_graph=True)
                for j in range(len(Vs[0]))
            ]
            part = columns[0] if len(columns) == 1 else [torch.cat(pieces) for pieces in zip(*columns)]
            total = part if total is None else [t.add_(p) for t, p in zip(total, part)]
        return total  # already scaled: the cached graphs are those of c · loss

    def _batch_matmat(self, X, y, index, Vs):
        return self._pull_back(*self._gradient_graph(X, y), Vs, retain_graph=False)

    @staticmethod
    def _pull_back(params, gradient, connected, Vs, retain_graph: bool) -> list[Tensor]:
        """(∂g/∂θ)ᵀ V for the k columns of V: one batched backward pass."""
        results: list[Tensor | None] = [None] * len(Vs)
        single = Vs[0].shape[0] == 1
        if connected:  # else the gradient does not depend on θ: H = 0
            products = torch.autograd.grad(
                [gradient[i] for i in connected],
                params,
                [Vs[i][0] if single else Vs[i] for i in connected],
                is_grads_batched=not single,
                allow_unused=True,
                retain_graph=retain_graph,
            )
            for i, product in enumerate(products):
                if product is not None:
                    results[i] = product.unsqueeze(0) if single else product
        return [torch.zeros_like(V) if r is None else r for r, V in zip(results, Vs)]


class OutputSpaceOperator(ProblemOperator):
    """C = c Σ_n J_nᵀ M_n J_n; subclasses define M_n through ``_middle``."""

    def _prepare(self, X: Tensor, y: Tensor, index: int):
        """Per-batch data for ``_middle`` drawn outside the vectorised product."""
        return None

    def _middle(self, output: Tensor, y: Tensor, u: Tensor, aux) -> Tensor:
        """M u per example for u shaped like ``output``."""
        raise NotImplementedError

    _reverse_only = False  # set once an operation of the model lacks a forward-mode derivative

    def _batch_matmat(self, X, y, index, Vs):
        if not self._reverse_only:
            try:
                return self._batch_matmat_forward_mode(X, y, index, Vs)
            except (NotImplementedError, RuntimeError) as error:
                if not _lacks_forward_mode(error):
                    raise
                self._reverse_only = True
        return self._batch_matmat_reverse_mode(X, y, index, Vs)

    def _batch_matmat_reverse_mode(self, X, y, index, Vs):
        """The same product with reverse mode only, for models torch.func cannot push tangents through.

        J v is the derivative of the pull-back u ↦ Jᵀu, itself linear in u: one backward
        through the pull-back's graph (double backward) per vector, then Jᵀ (M J v).
        Vector by vector: slower than the vectorised forward-mode product, used only
        where an operation has no forward-mode derivative (a fused kernel, an
        ``autograd.Function`` without ``jvp``).
        """
        params = [p.detach().requires_grad_(True) for p in self.problem.params]
        aux = self._prepare(X, y, index)
        mask = self.problem.loss_rule.mask(y)
        with torch.enable_grad():
            output = self.problem.forward(params, X)
            u = torch.zeros_like(output, requires_grad=True)
            pulled = torch.autograd.grad(output, params, u, create_graph=True, allow_unused=True)
        self.problem.loss_rule.check(output.detach(), y)
        connected = [i for i, g in enumerate(pulled) if g is not None and g.requires_grad]
        results = [torch.zeros_like(V) for V in Vs]
        for j in range(Vs[0].shape[0]):
            Jv = torch.autograd.grad(
                [pulled[i] for i in connected], u, [Vs[i][j] for i in connected], retain_graph=True
            )[0]
            middle = self._middle(output.detach(), y, Jv, aux)
            middle = middle if mask is None else middle * mask
            products = torch.autograd.grad(output, params, middle, retain_graph=True, allow_unused=True)
            for i, product in enumerate(products):
                if product is not None:
                    results[i][j] = product
        return results

    def _batch_matmat_forward_mode(self, X, y, index, Vs):
        _load_forward_mode_quietly()
        params = self._detached_params()
        aux = self._prepare(X, y, index)
        mask = self.problem.loss_rule.mask(y)  # entries without a loss term (ignore_index)

        def forward(*ps):
            return self.problem.forward(ps, X)

        def product(*vs):
            def output_and_jvp(*ps):
                return jvp(forward, ps, vs)

            output, pullback, Jv = vjp(output_and_jvp, *params, has_aux=True)
            self.problem.loss_rule.check(output, y)
            middle = self._middle(output, y, Jv, aux)
            # M_n is block-diagonal over output locations: zeroing its rows at masked
            # locations zeroes their columns too (m M m u = m (M u)).
            return pullback(middle if mask is None else middle * mask)

        with FORWARD_MODE:  # forward-mode AD's level is process-wide (curvlab.shims)
            if Vs[0].shape[0] == 1:  # one vector: skip vmap's batching overhead
                results = [r.unsqueeze(0) for r in product(*(V[0] for V in Vs))]
            else:
                results = list(vmap(product)(*Vs))
        # A parameter the output does not use gets an expanded zero (one element in
        # memory) from the pull-back: materialised, as the batch sums write in place.
        return [r if r.is_contiguous() else r.contiguous() for r in results]


def _lacks_forward_mode(error: Exception) -> bool:
    """Whether torch refused a forward-mode (or torch.func) derivative of one of the model's operations."""
    message = str(error)
    return "forward AD" in message or ("autograd.Function" in message and "functorch" in message)


def _per_example_dot(a: Tensor, b: Tensor, leading: int = 1) -> Tensor:
    """⟨a_n, b_n⟩ over all but the ``leading`` dims, kept broadcastable: shape (N, 1, …, 1).

    Outputs (N,) (one number per example) have no dims to sum: the product itself.
    (``sum(dim=())`` would sum over everything, coupling the examples.)
    """
    dims = tuple(range(leading, a.dim()))
    return (a * b).sum(dim=dims, keepdim=True) if dims else a * b


class GGN(OutputSpaceOperator):
    r"""Generalized Gauss-Newton G = c Σ_n J_nᵀ Λ_n J_n, Λ_n = ∇²_f ℓ_n (docs/theory.md).

    Products by forward-mode J v and a pull-back per product; where a fast path
    covers the model (a plain MLP) in closed form on a cached primal pass instead
    (J v forward, Λ, Jᵀ back: no second forward pass).
    """

    _second_order = False

    def _middle(self, output, y, u, aux):
        return self.problem.loss_rule.hessian_vp(output, u, y)


class EmpiricalFisher(OutputSpaceOperator):
    r"""Empirical Fisher E = c Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ with the **true** labels.

    Per-example gradients (an example is one row of a batch), never the batch
    gradient: M_n = r_n r_nᵀ with r_n = ∇_f ℓ(f_n, y_n). Not the Fisher
    (Kunstner et al. 2019).
    """

    def _middle(self, output, y, u, aux):
        r = self.problem.loss_rule.output_gradient(output, y)
        return r * _per_example_dot(r, u)


class Fisher(OutputSpaceOperator):
    r"""Fisher information F = c Σ_n E_{ŷ~p(·|f_n)}[∇_θ ℓ(f_n, ŷ) ∇_θ ℓ(f_n, ŷ)ᵀ].

    With ``mc_samples=None`` the expectation is exact (the "type-2" Fisher,
    computed from the likelihood: classes enumerated for cross-entropy, both
    outcomes for BCE, the Gaussian covariance for MSE); for these losses it
    equals the GGN. With ``mc_samples=S`` it is the Monte-Carlo Fisher with S
    labels ŷ per example, drawn reproducibly from ``seed`` and the batch index
    on the CPU (the same samples on every device and for every product).

    Args:
        problem: The problem.
        mc_samples: ``None`` for the exact Fisher, else S ≥ 1 samples.
        seed: Seed of the Monte-Carlo labels.
    """

    def __init__(self, problem: Problem, mc_samples: int | None = None, seed: int = 0):
        super().__init__(problem)
        self.mc_samples = None if mc_samples is None else check_count("mc_samples", mc_samples)
        self.seed = check_integer("seed", seed)

    def _options(self):
        return {"mc_samples": self.mc_samples, "seed": self.seed}

    def _prepare(self, X, y, index):
        if self.mc_samples is None:
            return None
        return mc_noise(self.problem.loss_rule, y, self.mc_samples, self.seed, index, self.dtype)

    def _middle(self, output, y, u, aux):
        rule = self.problem.loss_rule
        if aux is None:
            return rule.fisher_vp(output, u)
        r = sampled_output_gradients(rule, output, aux)  # (S, N, ...)
        weights = _per_example_dot(r, u.unsqueeze(0), leading=2)  # (S, N, 1, …)
        return (r * weights).sum(0) / aux.shape[0]


# ---------------------------------------------------------------- the registries of names
EXACT = {"hessian": Hessian, "ggn": GGN, "fisher": Fisher, "empirical_fisher": EmpiricalFisher}


def exact_class(name: str, allowed: tuple[str, ...] | None = None) -> type[ProblemOperator]:
    """The exact operator called ``name`` (``EXACT``), or ``ValueError`` listing the choices.

    ``allowed``: the names a caller accepts (default all).
    """
    choices = tuple(EXACT) if allowed is None else allowed
    if name not in choices:
        raise ValueError(f"curvature must be one of {', '.join(map(repr, choices))}, got {name!r}")
    return EXACT[name]


# The matrices the layerwise approximations (KFAC, EKFAC, the exact diagonal) estimate:
# "type-2" the GGN (= the exact Fisher for these losses), "mc" the Monte-Carlo Fisher,
# "empirical" the empirical Fisher.
FLAVOURS = ("type-2", "mc", "empirical")


def check_flavour(flavour: str) -> str:
    """``flavour`` if it is one of ``FLAVOURS``, else ``ValueError``."""
    if flavour not in FLAVOURS:
        raise ValueError(f"fisher_type must be one of {FLAVOURS}, got {flavour!r}")
    return flavour


def flavour_operator(problem: Problem, flavour: str, mc_samples: int = 1, seed: int = 0) -> ProblemOperator:
    """The exact matrix of a flavour, over ``problem``'s parameters."""
    if check_flavour(flavour) == "type-2":
        return GGN(problem)
    if flavour == "empirical":
        return EmpiricalFisher(problem)
    return Fisher(problem, mc_samples=mc_samples, seed=seed)


def flavour_of(C) -> tuple[str, int, int] | None:
    """``(flavour, mc_samples, seed)`` whose layerwise statistics give C exactly; ``None`` for others."""
    if type(C) is GGN or (type(C) is Fisher and C.mc_samples is None):
        return "type-2", 1, 0
    if type(C) is Fisher:
        return "mc", C.mc_samples, C.seed
    if type(C) is EmpiricalFisher:
        return "empirical", 1, 0
    return None
