r"""One optimizer = a curvature estimate + a damping policy + an update rule + a safety part.

``CurvatureOptimizer`` is a ``torch.optim.Optimizer`` composed of small parts, each
with its own ``state_dict``:

* ``estimate`` (``curvlab.optim.estimate.CurvatureEstimate``): the curvature object
  of the diagnostics (``cl.KFAC``, ``cl.ACP``, ``cl.GGN``, …) refreshed every
  ``curvature_every`` steps (T₁; averaged with the previous one when
  ``ema_decay > 0``), and its damped inverse refreshed every ``inverse_every`` steps
  (T₃; a new curvature waits for that refresh, as in K-FAC);
* ``damping_policy`` (``curvlab.optim.damping``): λ constant, or adapted by
  Levenberg–Marquardt every ``damping_every`` steps (T₂; Martens 2010, §4.1: λ ← ωλ if
  ρ > 3/4, λ/ω if ρ < 1/4, ω = ``damping_factor``; one extra loss evaluation, and one
  curvature product unless the step was rescaled, per adaptation);
* ``update_rule`` (``curvlab.optim.updates``): with d = (C + λI)⁻¹ (g + weight_decay · θ),
  m ← momentum · m + d, θ ← θ − lr · m; or with ``rescale="ggn"`` (``"fisher"``,
  ``"hessian"``) Martens & Grosse's choice δ = lr · (αΔ + μδ₀) minimising the exact
  quadratic model (2015, §7; two exact products per step);
* ``safety`` (``curvlab.optim.safety``): a batch with NaN or Inf is skipped and
  changes nothing; on finite data a step whose loss, gradient, curvature or update
  is not finite is skipped and the damping raised tenfold (a non-finite loss at the
  start of a step also undoes the previous update, exactly, from a kept copy); more
  than 10 skips in a row are an error; a failed inverse is retried in float64 with
  more damping before a clear error.

Data-parallel training (``torchrun``, one process per device): when
``torch.distributed`` is initialised with several processes (``process_group="auto"``),
each rank's closure and ``batch`` are its share of one global minibatch; the
gradient and loss are averaged over the ranks (or by the user's
``DistributedDataParallel``), the curvature is that of the global minibatch, and
every skip decision is agreed, so the parameters stay bit-identical on every rank
(``curvlab.optim.data_parallel``). ``distribute_inverses=True`` inverts each
Kronecker block on one rank and gathers the inverses.
Everything needed to continue bit-identically is in ``state_dict()``: torch's
per-parameter state (momentum buffers, the kept copy, δ₀) and each part's own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.distributed import Group, RankFailure, resolve, unwrap
from curvlab.errors import NonFiniteError, UnsupportedError
from curvlab.operators.base import CurvatureOperator
from curvlab.optim import data_parallel, factored
from curvlab.optim.damping import ConstantDamping, LevenbergMarquardt, reduction_ratio
from curvlab.optim.estimate import CurvatureEstimate
from curvlab.optim.factored import precondition, record_linear_factors
from curvlab.optim.safety import INVERSE_FAILURES, Safety, SkipStep, all_finite, non_finite_part
from curvlab.optim.schedule import Schedule
from curvlab.optim.updates import RESCALE_CURVATURES, MomentumUpdate, QuadraticModelUpdate, flat, scratch
from curvlab.options import check_count, check_nonnegative, check_positive
from curvlab.passes.capture import Calls
from curvlab.problem import Problem
from curvlab.structured.block_diagonal import BlockDiagonalOperator

__all__ = ["CurvatureOptimizer", "all_finite", "check_group", "check_state_shapes", "scratch"]

DAMPING_POLICIES = ("constant", "levenberg-marquardt")


def check_group(group: dict) -> None:
    """``ValueError`` for a group's negative or NaN ``lr``, ``momentum`` or ``weight_decay``.

    A group's ``lr`` may be 0 (a frozen group, as torch allows); the default must be > 0.
    """
    for option in ("lr", "momentum", "weight_decay"):
        if option in group:
            check_nonnegative(option, group[option])


def check_state_shapes(params: list[Tensor], state_dict: dict, saved: list | None = None) -> None:
    """``ValueError`` if an optimizer state is of parameters with other shapes (another model).

    torch checks only the number of tensors per group: the state of a model with as
    many tensors of other shapes would load, and the next step fail deep inside.
    ``saved``: the shapes the state recorded; else those of its per-parameter tensors.
    """
    if saved is None:
        ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        per_param = state_dict.get("state", {})
        saved = [None] * len(ids)
        for position, i in enumerate(ids):
            for value in per_param.get(i, {}).values():
                if isinstance(value, Tensor) and value.dim() > 0:
                    saved[position] = list(value.shape)
    if len(saved) != len(params):
        raise ValueError(f"the state holds {len(saved)} parameter tensors, this optimizer has {len(params)}")
    for i, (shape, p) in enumerate(zip(saved, params)):
        if shape is not None and list(shape) != list(p.shape):
            raise ValueError(
                f"the state is of another model: parameter {i} has shape {tuple(shape)} in the state "
                f"but {tuple(p.shape)} in this optimizer"
            )


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: preconditioned steps with a curvature object of the library.

    Args:
        model: The model (its forward is used to build curvature on a batch).
        loss_fn: Its loss (``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``).
        params: Parameters or parameter groups (default ``model.parameters()``);
            groups may set ``lr``, ``momentum`` and ``weight_decay``.
        lr: Learning rate.
        momentum: Momentum on the preconditioned direction.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        damping: Initial Tikhonov damping λ.
        damping_policy: ``"constant"`` or ``"levenberg-marquardt"``.
        curvature_every: Steps between curvature estimates (amortisation, T₁).
        inverse_every: Steps between inverses (T₃; default ``curvature_every``); a
            curvature refreshed in between is used from the next inverse on.
        ema_decay: Running-average weight of the previous curvature (0: none).
        min_damping: Lower bound for the adapted damping.
        rescale: ``None`` (default) or the exact curvature (``"ggn"``, ``"fisher"``,
            ``"hessian"``) whose quadratic model picks step size and momentum each
            step (Martens & Grosse 2015, §7); needs ``momentum=0``.
        damping_factor: Levenberg–Marquardt's ω in (0, 1).
        process_group: ``"auto"`` (default): under ``torch.distributed`` with several
            processes, one global step over every rank's share of the minibatch (see
            the module doc); ``None``: this process alone; or a process group.
        distribute_inverses: Under a process group, invert each block on one rank
            (balanced by cost) and gather the inverses, instead of every rank
            inverting every block.
        damping_every: Steps between Levenberg–Marquardt adaptations (Martens & Grosse's
            T₂ = 5; each costs one more closure call).
        curvature_examples: Estimate the curvature on the first m examples of the
            batch (default: all): statistics cost m/N of a full pass.
        rescale_examples: The quadratic model's products on the first m examples
            (default: all); with a mean loss the subsample's matrix is an unbiased
            estimate of the batch's, the gradient stays the full batch's.
        reject_uphill: With Levenberg–Marquardt, take back (exactly) a step after which
            the closure's loss is higher than before it, as a trust-region method
            rejects a step with ρ ≤ 0; λ grows as for any ρ < 1/4. Only the steps with
            an adaptation (every ``damping_every``) are tested; ``counts["rejected"]``.

    Optimizers with Kronecker blocks (``factored_gradients = True``: KFAC, EKFAC,
    ACP) record each Linear layer's inputs and output gradients in the step's pass
    (the closure's, or the user's own through hooks) and precondition from those
    factors where that is cheaper (small minibatches, wide layers;
    ``curvlab.optim.factored``); the result is the same. ``last_factored_blocks``
    says how many blocks the last step did so.
    """

    factored_gradients = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params=None,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        damping_policy: str = "constant",
        curvature_every: int = 1,
        inverse_every: int | None = None,
        ema_decay: float = 0.0,
        min_damping: float = 1e-8,
        rescale: str | None = None,
        damping_factor: float = 2 / 3,
        process_group="auto",
        distribute_inverses: bool = False,
        damping_every: int = 1,
        curvature_examples: int | None = None,
        rescale_examples: int | None = None,
        reject_uphill: bool = False,
    ):
        if damping_policy not in DAMPING_POLICIES:
            raise ValueError(f"damping_policy must be one of {DAMPING_POLICIES}, got {damping_policy!r}")
        if rescale is not None and rescale not in RESCALE_CURVATURES:
            raise ValueError(f"rescale must be None or one of {sorted(RESCALE_CURVATURES)}, got {rescale!r}")
        if rescale is not None and momentum > 0:
            raise ValueError("rescale chooses the momentum coefficient itself: pass momentum=0")
        subsamples = {"curvature_examples": curvature_examples, "rescale_examples": rescale_examples}
        for name, value in subsamples.items():
            if value is not None:
                check_count(name, value)
        if rescale_examples is not None and rescale is None:
            raise ValueError("rescale_examples sets the quadratic model's batch: it needs rescale")
        if not isinstance(distribute_inverses, bool):
            raise TypeError(f"distribute_inverses must be True or False, got {distribute_inverses!r}")
        damping, min_damping = (
            check_nonnegative("damping", damping),
            check_nonnegative("min_damping", min_damping),
        )
        statistics = Schedule(curvature_every, "curvature_every")
        inverses = Schedule(statistics.every if inverse_every is None else inverse_every, "inverse_every")
        defaults = {"lr": check_positive("lr", lr), "momentum": momentum, "weight_decay": weight_decay}
        check_group(defaults)
        if damping_policy == "levenberg-marquardt":
            self.damping_policy = LevenbergMarquardt(
                damping, damping_factor, min_damping, damping_every, reject_uphill
            )
        else:
            if reject_uphill:
                raise ValueError(
                    "reject_uphill tests the steps Levenberg–Marquardt evaluates: it needs "
                    "damping_policy='levenberg-marquardt'"
                )
            if not 0 < damping_factor < 1:
                raise ValueError(f"damping_factor must be in (0, 1), got {damping_factor}")
            Schedule(damping_every, "damping_every")  # checked, though a constant λ never adapts
            self.damping_policy = ConstantDamping(damping)
        self.estimate = CurvatureEstimate(statistics, inverses, ema_decay)
        self.update_rule = (
            MomentumUpdate() if rescale is None else QuadraticModelUpdate(rescale, rescale_examples)
        )
        self.safety = Safety(type(self).__name__)
        super().__init__(model.parameters() if params is None else params, defaults)
        half = sorted({str(p.dtype) for p in self._params()} & {"torch.float16", "torch.bfloat16"})
        if half:
            raise UnsupportedError(
                f"{type(self).__name__}: parameters in {', '.join(half)} are not supported: curvature in "
                "half precision keeps about 3 significant digits. Keep the model in float32 and run its "
                "forward pass under torch.autocast (mixed precision; the curvature stays in float32), "
                "or train a float32 copy of the model"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.rescale = rescale
        self.curvature_examples = curvature_examples
        self.steps = 0
        self.group: Group | None = resolve(process_group)
        self.distribute_inverses = distribute_inverses
        self.last_factored_blocks = 0
        self.last_statistics = ""  # where the last curvature refresh took its statistics from
        self._records: dict | None = None  # the Linear layers' factors of this step's gradient
        self._kept_problems: dict = {}  # by batch size: later batches of that size reuse its checks
        self._hooks: contextlib.ExitStack | bool | None = None  # None: not installed; False: closed
        self._persistent: dict | None = None  # what those hooks recorded since the last step
        self._own_pass_records()  # Kronecker optimizers: hooks for a step after the user's backward

    def add_param_group(self, param_group: dict) -> None:
        """Torch's ``add_param_group``, refusing a group with a nonsense ``lr``, ``momentum`` or decay."""
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])

    # ------------------------------------------------------------ the parts, as attributes
    @property
    def damping(self) -> float:
        """The current damping λ (the damping policy's)."""
        return self.damping_policy.value

    @damping.setter
    def damping(self, value: float) -> None:
        self.damping_policy.value = float(value)

    @property
    def curvature(self) -> CurvatureOperator | None:
        """The curvature estimate (a regular curvlab object: compare it, store it, take its spectrum)."""
        return self.estimate.curvature

    @property
    def counts(self) -> dict:
        """Curvature estimates, inverses, skipped and rejected steps so far."""
        rejected = self.damping_policy.rejected
        return {**self.estimate.counts, "skipped": self.safety.skipped, "rejected": rejected}

    @property
    def last_rho(self) -> float:
        """The last Levenberg–Marquardt reduction ratio."""
        return self.damping_policy.last_rho

    @property
    def last_rescale(self) -> tuple:
        """The (α, μ) of the last rescaled step."""
        return self.update_rule.last_rescale

    @property
    def _inverse(self):
        return self.estimate.inverse

    @property
    def _inverse_curvature(self):
        return self.estimate.inverse_curvature

    # ------------------------------------------------------------ subclass hooks
    def build_curvature(self, problem: Problem) -> CurvatureOperator:
        """The curvature estimate on one minibatch problem (``self.steps`` is the step it is for)."""
        raise NotImplementedError

    def direction(self, gradient: list[Tensor]) -> list[Tensor]:
        """(C + λI)⁻¹ g with the cached inverse; g and the result are parameter-shaped lists."""
        direction, self.last_factored_blocks = precondition(
            self.estimate.inverse, self._params(), gradient, self._records
        )
        return direction

    def make_inverse(self, C: CurvatureOperator, damping: float):
        """The damped inverse of ``C`` (an operator); exact operators override ``direction``."""
        return C.inverse(damping)

    def own_pass_outputs(self) -> str | None:
        """What ``curvature_from_pass`` needs of the output gradients U of the step's own pass.

        ``"second moments"`` (UᵀU), ``"largest"`` (max U² alone), or ``None`` (the
        default): this optimizer's curvature needs a pass of its own.
        """
        return None

    def curvature_from_pass(self, problem: Problem, statistics: dict) -> CurvatureOperator | None:
        """The curvature from the training pass' own layer statistics (``factored.pass_statistics``).

        Called only where ``own_pass_outputs()`` names what it needs.
        """
        return None

    # ------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _build_at(self, problem: Problem, step: int) -> CurvatureOperator:
        """``build_curvature`` as at ``step`` (a Monte-Carlo estimate is seeded by its step)."""
        steps, self.steps = self.steps, step
        try:
            return self.build_curvature(problem)
        finally:
            self.steps = steps

    def _problem(self, batch) -> Problem:
        if batch is None:
            raise ValueError(
                f"{type(self).__name__} builds curvature from the minibatch: call step(closure, batch=(X, y))"
            )
        # The curvature of the function being trained: in training mode a batch norm uses
        # the batch's statistics (dropout is off either way; see Problem's eval_mode).
        eval_mode, params = not self.model.training, self._params()
        size = len(batch[0]) if isinstance(batch[0], Tensor) else None
        kept = self._kept_problems.get(size)
        if kept is not None and kept.eval_mode == eval_mode and kept.params == params:
            return kept.on_batch(tuple(batch))  # no validating forward pass for a batch of the same shapes
        self._kept_problems[size] = Problem(
            self.model,
            self.loss_fn,
            tuple(batch),
            params=params,
            eval_mode=eval_mode,
            process_group=self.group.group if self.group is not None else None,
        )
        return self._kept_problems[size]

    @staticmethod
    def _head(batch, examples: int | None):
        """The first ``examples`` examples of ``batch = (X, y)`` (all with ``None``)."""
        if examples is None or batch is None:
            return batch
        return tuple(t[:examples] for t in batch)

    def _make_inverse(self, C: CurvatureOperator, damping: float):
        """``make_inverse``, each block on one rank when ``distribute_inverses`` (then gathered)."""
        if self.distribute_inverses and self.group is not None and isinstance(C, BlockDiagonalOperator):
            return data_parallel.spread_inverse(
                self.group, C, lambda share: self.make_inverse(share, damping), INVERSE_FAILURES
            )
        return self.make_inverse(C, damping)

    def _refresh_inverse(self, damping: float, curvature: CurvatureOperator | None = None) -> None:
        """The estimate's damped inverse; a retry's larger damping becomes the optimizer's."""
        used = self.estimate.refresh_inverse(self._make_inverse, damping, self.safety, curvature)
        if used > damping:
            self.damping = max(self.damping, used)

    def _skip(self, reason: str, bad_weights: bool = True) -> None:
        """Skip this step with a warning; ``bad_weights``: the model, not the data, is at fault."""
        self._records = None
        self.safety.skip(reason, self.damping_policy, bad_weights)
        if bad_weights:
            self.estimate.drop_inverse()  # rebuilt with the new damping

    # ------------------------------------------------------------ the user's own pass
    def _own_pass_records(self) -> dict | None:
        """What the persistent hooks recorded of the user's own pass since the last step.

        Installed with optimizers with Kronecker blocks (one process), removed by
        ``close()`` or when the optimizer is garbage-collected. Neither evaluations under
        ``no_grad`` nor curvlab's own passes are recorded.
        """
        if not self.factored_gradients or self.group is not None or self._hooks is False:
            return None
        if self._hooks is None:
            self._hooks = contextlib.ExitStack()
            self._persistent = self._hooks.enter_context(
                record_linear_factors(self.model, self._params(), user_passes_only=True)
            )
            # The stack is held by the finalizer, not only by the optimizer: when the optimizer
            # is collected the hooks are removed by the stack itself, whole.
            weakref.finalize(self, self._hooks.close)
        return self._persistent

    def close(self) -> None:
        """Remove the optimizer's hooks from the model (also done when it is garbage-collected)."""
        if self._hooks:
            self._hooks.close()
        self._hooks, self._persistent = False, None

    def _take_own_pass(self) -> dict | None:
        """The user's own pass as the hooks recorded it; the hooks start afresh.

        The curvature passes of this step are recorded too, and must not join it.
        """
        if not self._hooks:
            return None
        taken = {
            module: Calls(list(r.inputs), list(r.outputs), list(r.versions), list(r.output_grads))
            for module, r in self._persistent.items()
        }
        self._forget_own_pass()
        return taken

    def _forget_own_pass(self) -> None:
        """Drop what the persistent hooks recorded (the activations they keep alive)."""
        for record in (self._persistent or {}).values():
            for recorded in (record.inputs, record.outputs, record.versions, record.output_grads):
                recorded.clear()

    # ------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, batch=None):
        """One update; returns the closure's loss (``None`` without a closure).

        ``closure`` re-evaluates the loss and its gradient (it must call
        ``backward``); ``batch = (X, y)`` is the minibatch curvature is built on.
        Under a process group both are this rank's share, and the loss returned is
        that of the global minibatch (the same on every rank).

        Without a closure the step uses the gradients already in ``p.grad`` (the
        user's own ``loss.backward()``). Optimizers with Kronecker blocks (KFAC,
        EKFAC, ACP) then precondition from that pass's recorded factors where that is
        cheaper, through hooks on the Linear layers installed with the optimizer and
        removed by ``close()`` (or when it is garbage-collected); after ``close()`` the
        result is the same by the ordinary route.
        """
        try:
            return self._step(closure, batch)
        finally:
            self._forget_own_pass()

    def _step(self, closure, batch):
        loss = None
        self._records, self.last_factored_blocks = None, 0
        if closure is None:
            self._records = self._take_own_pass()
        else:
            # Under a process group the gradient is the ranks' average, which this rank's
            # factors do not give: no factored preconditioning.
            recording = (
                record_linear_factors(self.model, self._params())
                if self.factored_gradients and self.group is None
                else contextlib.nullcontext()
            )
            with torch.enable_grad(), recording as records:
                loss = closure()
            self._records = records
        params = self._params()
        bad_data = non_finite_part(batch)
        if self.group is not None:  # the global gradient and loss; any rank's bad data on all
            gradients = data_parallel.gradients_to_share(self.model, params)
            loss, where = data_parallel.share_step(self.group, self.loss_fn, loss, batch, bad_data, gradients)
            if gradients is None:
                data_parallel.ddp_gradients(self.group, self.loss_fn, params)
            if where is not None:
                self._skip(f"{where} has NaN or Inf entries", bad_weights=False)
                return loss
        if bad_data is not None:  # bad data, not bad weights: nothing is undone or changed
            self._skip(f"the {bad_data} of the batch have NaN or Inf entries", bad_weights=False)
            return loss
        if loss is not None and not all_finite([loss]):
            # The model (after the last update) is bad on finite data: undo the last update.
            undone = self.safety.undo(params, self.state)
            self._skip(f"loss is {loss.item()}" + ("; the previous update was undone" if undone else ""))
            return loss
        gradient = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if not all_finite(gradient):
            self._skip("the gradient is not finite")
            return loss
        decays = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        raw_gradient = gradient
        if any(decays):
            gradient = [g + decay * p if decay else g for g, p, decay in zip(gradient, params, decays)]
        skippable = (SkipStep, NonFiniteError, RankFailure)  # NaN/Inf in the batch, curvature or direction
        failure = None
        try:
            updates, predicted = self._updates(gradient, batch, decays, raw_gradient)
        except skippable as reason:
            failure = reason
        except Exception as error:
            if self.group is None:
                raise
            failure = error
        if self.group is not None:  # one outcome for every rank: go on, skip, or raise
            failure = data_parallel.agree_on_outcome(self.group, failure, skippable)
        if failure is not None:
            self._skip(str(failure))
            self.steps += 1
            return loss
        self.safety.keep(params, self.state)  # for an exact undo
        for p, u in zip(params, updates):
            p.add_(u)
        if self.rescale is not None:  # δ₀ of the next step
            QuadraticModelUpdate.remember(params, self.state, updates)
        self.safety.succeeded()
        if self.damping_policy.due(self.steps) and closure is not None and loss is not None:
            self._adapt_damping(closure, loss, gradient, updates, predicted, batch)
        self.steps += 1
        return loss

    def _updates(self, gradient: list[Tensor], batch, decays: list[float], raw_gradient: list[Tensor]):
        """``(updates, predicted decrease or None)``: curvature and inverse refreshed as due.

        Raises ``SkipStep`` (or ``NonFiniteError`` from the curvature code) when the
        batch, the curvature, the direction or the update is not finite.
        """
        if self.estimate.statistics.due(self.steps):
            statistics_batch = self._head(batch, self.curvature_examples)
            fresh = self._own_pass_curvature(batch, raw_gradient)
            self.estimate.refresh(self.steps, self._build_at, self._problem, statistics_batch, fresh)
        if self.estimate.inverse_due(self.steps):
            self._refresh_inverse(self.damping)
        with torch.enable_grad():
            direction = self.direction(gradient)
        self._records = None  # frees the recorded activations
        if not all_finite(direction):
            raise SkipStep("the preconditioned direction is not finite")
        predicted = None
        if self.update_rule.needs_problem:
            with torch.enable_grad():
                problem = self._problem(self._head(batch, self.update_rule.examples))
                updates, predicted = self.update_rule(
                    self.param_groups, self.state, direction, gradient, problem, decays, self.damping
                )
        else:
            updates = self.update_rule(self.param_groups, self.state, direction)
        if not all_finite(updates):
            raise SkipStep("the update is not finite")
        return updates, predicted

    def _own_pass_curvature(self, batch, gradient: list[Tensor]) -> CurvatureOperator | None:
        """The curvature from this step's own pass where the optimizer and the pass allow it.

        Needs the whole batch (no ``curvature_examples``) and the pass' records; sets
        ``last_statistics`` to ``"own pass"`` or ``"separate pass"``.
        """
        self.last_statistics = "separate pass"
        if self.curvature_examples is not None or not self._records or batch is None:
            return None
        outputs = self.own_pass_outputs()
        if outputs is None:
            return None
        problem = self._problem(batch)
        second_moments = outputs == "second moments"
        statistics = factored.pass_statistics(problem, self._records, gradient, second_moments)
        fresh = None if statistics is None else self.curvature_from_pass(problem, statistics)
        if fresh is not None:
            self.last_statistics = "own pass"
        return fresh

    def _adapt_damping(self, closure, loss: Tensor, gradient, step, predicted=None, batch=None) -> None:
        """Levenberg–Marquardt: ρ = (L(θ + s) − L(θ)) / (gᵀs + ½ sᵀCs).

        ``predicted`` is the model decrease if the caller has it (the exact model of
        rescaling); otherwise it is computed with the optimizer's curvature. Under a
        process group the new loss is the global minibatch's (``batch``: this rank's share).
        """
        with torch.enable_grad():
            new_loss = closure()
        if self.group is not None:
            new_loss = data_parallel.share_loss(self.group, self.loss_fn, new_loss, batch)
        if not all_finite([new_loss]):  # the step made the loss non-finite: take it back
            self.safety.undo(self._params(), self.state)
            self.damping_policy.increase(at_least=0.0)
            self.estimate.drop_inverse()
            self.damping_policy.last_rho = -float("inf")
            return
        if predicted is None:
            g, s = flat(gradient), flat(step)
            curvature_product = self.curvature @ s if self.curvature is not None else torch.zeros_like(s)
            predicted = (g @ s + 0.5 * s @ curvature_product).item()
        actual = (new_loss - loss).item()
        self.damping_policy.adapt(reduction_ratio(actual, predicted))
        if self.damping_policy.reject_uphill and actual > 0:
            self.safety.undo(self._params(), self.state)  # momentum and δ₀ go with it
            self.damping_policy.rejected += 1

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``torch.optim`` state plus the step count and every part's ``state_dict``."""
        state = super().state_dict()
        state["curvlab"] = {
            "param_shapes": [list(p.shape) for p in self._params()],
            "steps": self.steps,
            "damping": self.damping_policy.state_dict(),
            "estimate": self.estimate.state_dict(),
            "update_rule": self.update_rule.state_dict(),
            "safety": self.safety.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore everything ``state_dict`` saved; the inverse is rebuilt identically."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None)
        check_state_shapes(self._params(), state_dict, extra.get("param_shapes") if extra else None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.steps = extra["steps"]
        self.damping_policy.load_state_dict(extra["damping"])
        self.update_rule.load_state_dict(extra["update_rule"])
        self.safety.load_state_dict(extra["safety"])
        params = self._params()
        names = Problem._names_of(unwrap(self.model), params)
        like = ([p.shape for p in params], names, params[0].dtype, params[0].device)
        self.estimate.load_state_dict(
            extra["estimate"], self._build_at, self._make_inverse, self._problem, like, self.safety
        )
