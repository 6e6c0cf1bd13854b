r"""One optimizer = a curvature estimate + a damping policy + an update rule.

``CurvatureOptimizer`` is a ``torch.optim.Optimizer``. Every ``curvature_every``
steps it builds its curvature estimate on the current minibatch with the very
classes of the diagnostics (``cl.KFAC``, ``cl.ACP``, ``cl.GGN``, …; averaged with
the previous estimate when ``ema_decay > 0``), every ``inverse_every`` steps it
refreshes the damped inverse (a new curvature waits for that refresh, as in
K-FAC), and each step it applies

    d = (C + λI)⁻¹ (g + weight_decay · θ),   m ← momentum · m + d,   θ ← θ − lr · m.

With ``rescale="ggn"`` (or ``"fisher"``, ``"hessian"``) the learning rate and
momentum are instead chosen every step by minimising the exact quadratic model
on the minibatch (Martens & Grosse 2015, §7): with Δ = −(C + λI)⁻¹g and δ₀ the
previous update, δ = αΔ + μδ₀ where (α, μ) minimise
M(δ) = gᵀδ + ½ δᵀ(E + (λ + η)I)δ, E the exact matrix (two products per step;
a 2×2 linear system). ``lr`` then scales the chosen δ (default 1).

Damping λ is constant or adapted by Levenberg–Marquardt from the ratio ρ of the
actual to the predicted decrease of the loss (Martens 2010, §4.1): λ ← λ·ω if
ρ > 3/4, λ ← λ/ω if ρ < 1/4 (``damping_factor`` ω = 2/3 by default, as for
Hessian-free; K-FAC uses a slower ω close to 1; one extra loss evaluation, and
one curvature product unless the step was rescaled, per adapted step).

Safety: a batch with NaN or Inf inputs or targets is skipped with a warning and
changes nothing (bad data, not bad weights). On finite data, a step whose loss,
gradient, curvature or update is not finite is skipped with a warning and the
damping raised tenfold, so parameters are never left NaN; a non-finite loss at
the start of a step also undoes the previous
update (a finite update can still blow the loss up), as does Levenberg–Marquardt
when the step it just took makes the loss non-finite; more than 10 skipped steps
in a row are an error; a failed inverse (a factorisation that fails, an indefinite damped
matrix) is retried in float64 with more damping before a clear error.
Data-parallel training (``torchrun``, one process per device): when
``torch.distributed`` is initialised with several processes (``process_group="auto"``),
each rank's closure and ``batch`` are its share of one global minibatch; the
gradient and loss are averaged over the ranks (or by the user's
``DistributedDataParallel``), the curvature is that of the global minibatch, and
every skip decision is agreed, so the parameters stay bit-identical on every rank
(``curvlab.optim.data_parallel``). ``distribute_inverses=True`` inverts each
Kronecker block on one rank and gathers the inverses.
Everything needed to continue bit-identically — momentum buffers, step count,
damping, the curvature (snapshot) and the damping its inverse was built with —
is in ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.distributed import Group, RankFailure, resolve, unwrap
from curvlab.errors import CurvlabError, NonFiniteError, NotPositiveDefiniteError, UnsupportedError
from curvlab.operators.base import CurvatureOperator
from curvlab.operators.exact import exact_class
from curvlab.optim import data_parallel
from curvlab.optim import state as curvature_state
from curvlab.optim.factored import precondition, record_linear_factors
from curvlab.options import check_count, check_nonnegative, check_positive
from curvlab.passes.capture import Calls
from curvlab.problem import Problem
from curvlab.structured.block_diagonal import BlockDiagonalOperator

DAMPING_POLICIES = ("constant", "levenberg-marquardt")
RESCALE_CURVATURES = ("ggn", "fisher", "hessian")  # exact matrices whose quadratic model rescales a step
MAX_SKIPPED_IN_ROW = 10  # then a clear error instead of raising the damping forever
_INVERSE_FAILURES = (torch.linalg.LinAlgError, NotPositiveDefiniteError, ValueError, RuntimeError)


def check_group(group: dict) -> None:
    """``ValueError`` for a group's negative or NaN ``lr``, ``momentum`` or ``weight_decay``.

    A group's ``lr`` may be 0 (a frozen group, as torch allows); the default must be > 0.
    """
    for option in ("lr", "momentum", "weight_decay"):
        if option in group:
            check_nonnegative(option, group[option])


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def scratch(store: dict[int, Tensor], p: Tensor, dtype: torch.dtype) -> Tensor:
    """A work tensor shaped like ``p``, kept in ``store`` and reused from step to step."""
    tensor = store.get(id(p))
    if tensor is None or tensor.shape != p.shape or tensor.dtype != dtype or tensor.device != p.device:
        tensor = store[id(p)] = torch.empty_like(p, dtype=dtype)
    return tensor


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite.

    One sum per tensor (any NaN/Inf entry makes the sum non-finite); the elementwise
    check runs only where a sum is not finite (finite entries whose sum overflows).
    """
    for t in tensors:
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


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


def _non_finite_part(batch) -> str | None:
    """``"inputs"`` or ``"targets"`` if that part of ``batch = (X, y)`` has NaN or Inf; else ``None``."""
    if batch is None:
        return None
    for what, t in zip(("inputs", "targets"), batch):
        if isinstance(t, Tensor) and t.is_floating_point() and not all_finite([t.detach()]):
            return what
    return None


class _SkipStep(Exception):
    """A step cannot be taken; the message says why (the step is skipped, not an error)."""


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
        curvature_every: Steps between curvature estimates (amortisation).
        inverse_every: Steps between inverses (default ``curvature_every``); a curvature
            refreshed in between is used from the next inverse on.
        ema_decay: Running-average weight of the previous curvature (0: none).
        min_damping: Lower bound for the adapted damping.
        damping_factor: Levenberg–Marquardt's ω in (0, 1).
        rescale: ``None`` (default) or the exact curvature (``"ggn"``, ``"fisher"``,
            ``"hessian"``) whose quadratic model picks step size and momentum each
            step (Martens & Grosse 2015, §7); needs ``momentum=0``.
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

    Optimizers with Kronecker blocks (``factored_gradients = True``: KFAC, EKFAC,
    ACP) record each Linear layer's inputs and output gradients while the closure
    runs and precondition from those factors where that is cheaper (small
    minibatches, wide layers; ``curvlab.optim.factored``); the result is the same.
    ``last_factored_blocks`` says how many blocks the last step did so.
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
    ):
        damping, min_damping = (
            check_nonnegative("damping", damping),
            check_nonnegative("min_damping", min_damping),
        )
        if damping_policy not in DAMPING_POLICIES:
            raise ValueError(f"damping_policy must be one of {DAMPING_POLICIES}, got {damping_policy!r}")
        curvature_every = check_count("curvature_every", curvature_every)
        inverse_every = None if inverse_every is None else check_count("inverse_every", inverse_every)
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0 < damping_factor < 1:
            raise ValueError(f"damping_factor must be in (0, 1), got {damping_factor}")
        if rescale is not None and rescale not in RESCALE_CURVATURES:
            raise ValueError(f"rescale must be None or one of {sorted(RESCALE_CURVATURES)}, got {rescale!r}")
        if rescale is not None and momentum > 0:
            raise ValueError("rescale chooses the momentum coefficient itself: pass momentum=0")
        damping_every = check_count("damping_every", damping_every)
        subsamples = {"curvature_examples": curvature_examples, "rescale_examples": rescale_examples}
        for name, value in subsamples.items():
            if value is not None:
                check_count(name, value)
        if rescale_examples is not None and rescale is None:
            raise ValueError("rescale_examples sets the quadratic model's batch: it needs rescale")
        if not isinstance(distribute_inverses, bool):
            raise TypeError(f"distribute_inverses must be True or False, got {distribute_inverses!r}")
        defaults = {"lr": check_positive("lr", lr), "momentum": momentum, "weight_decay": weight_decay}
        check_group(defaults)
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
        self.damping = float(damping)
        self.damping_policy = damping_policy
        self.curvature_every = int(curvature_every)
        self.inverse_every = int(inverse_every or curvature_every)
        self.ema_decay = float(ema_decay)
        self.min_damping = float(min_damping)
        self.rescale = rescale
        self.damping_factor = float(damping_factor)
        self.steps = 0
        self.curvature: CurvatureOperator | None = None
        self._inverse = None
        self._inverse_damping: float | None = None
        self._inverse_curvature: CurvatureOperator | None = None  # what the inverse was built from
        self._curvature_source: tuple | None = None  # (step, batch) the curvature was built from
        self.counts = {"curvature": 0, "inverse": 0, "skipped": 0}
        self._skipped_in_row = 0
        self._records: dict | None = None  # the Linear layers' factors of this step's gradient
        self._scratch: dict[int, Tensor] = {}  # per-parameter work tensors (not state: not saved)
        self.last_factored_blocks = 0
        self.group: Group | None = resolve(process_group)
        self.distribute_inverses = distribute_inverses
        self.damping_every = int(damping_every)
        self.curvature_examples = curvature_examples
        self.rescale_examples = rescale_examples
        self._kept_problems: dict = {}  # by batch size: later batches of that size reuse its checks
        self._hooks: contextlib.ExitStack | bool | None = None  # None: not installed; False: closed
        self._persistent: dict | None = None  # what those hooks recorded since the last step
        self._own_pass_records()  # Kronecker optimizers: hooks for a step after the user's backward

    def add_param_group(self, param_group: dict) -> None:
        """Torch's ``add_param_group``, refusing a group with a nonsense ``lr``, ``momentum`` or decay."""
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])

    # ------------------------------------------------------------ subclass hooks
    def build_curvature(self, problem: Problem) -> CurvatureOperator:
        """The curvature estimate on one minibatch problem."""
        raise NotImplementedError

    def direction(self, gradient: list[Tensor]) -> list[Tensor]:
        """(C + λI)⁻¹ g with the cached inverse; g and the result are parameter-shaped lists."""
        direction, self.last_factored_blocks = precondition(
            self._inverse, self._params(), gradient, self._records
        )
        return direction

    def make_inverse(self, C: CurvatureOperator, damping: float):
        """The damped inverse of ``C`` (an operator); exact operators override ``direction``."""
        return C.inverse(damping)

    # ------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
                self.group, C, lambda share: self.make_inverse(share, damping), _INVERSE_FAILURES
            )
        return self.make_inverse(C, damping)

    def _refresh_inverse(self, damping: float, curvature: CurvatureOperator | None = None) -> None:
        """Damped inverse of ``curvature`` (default: the current one).

        On failure it is retried in float64 with 10× more damping (3 times).
        """
        built_from = self.curvature if curvature is None else curvature
        C, attempt_damping = built_from, damping
        last_error = None
        for attempt in range(4):
            try:
                inverse = self._make_inverse(C, attempt_damping)
            except _INVERSE_FAILURES as error:
                last_error = error
            else:
                if inverse is None or curvature_state.all_finite(inverse):
                    if inverse is not None and inverse.dtype != built_from.dtype:
                        inverse = curvature_state.restore(  # back to the parameters' dtype
                            curvature_state.snapshot(inverse),
                            inverse.param_shapes,
                            inverse.param_names,
                            built_from.dtype,
                            inverse.device,
                        )
                    self._inverse, self._inverse_damping = inverse, attempt_damping
                    self._inverse_curvature = built_from
                    self.counts["inverse"] += 1
                    if attempt:
                        self.damping = max(self.damping, attempt_damping)
                    return
                last_error = FloatingPointError("non-finite inverse")
            if attempt == 0 and C.dtype != torch.float64 and curvature_state.is_snapshotable(C):
                C = curvature_state.restore(
                    curvature_state.snapshot(C), C.param_shapes, C.param_names, torch.float64, C.device
                )
            attempt_damping = max(attempt_damping * 10, 1e-8)
        raise CurvlabError(
            f"{type(self).__name__}: the damped curvature could not be inverted even in float64 with "
            f"damping {attempt_damping / 10:.1e}: {last_error}"
        )

    def _skip(self, reason: str, bad_weights: bool = True) -> None:
        """Skip this step with a warning; ``bad_weights``: the model, not the data, is at fault.

        Bad weights (a non-finite loss, gradient or curvature on finite data) raise the
        damping tenfold; bad data (a batch with NaN or Inf) changes nothing.
        """
        self._records = None
        self.counts["skipped"] += 1
        self._skipped_in_row += 1
        if self._skipped_in_row > MAX_SKIPPED_IN_ROW:
            raise CurvlabError(
                f"{type(self).__name__}: {self._skipped_in_row} steps in a row skipped, the last one "
                f"because {reason}; the damping is {self.damping:.1e}. Check the data and lower the "
                "learning rate or raise the initial damping."
            )
        outcome = "the model is unchanged"
        if bad_weights:
            self.damping = max(self.damping * 10, 1e-8)
            self._inverse = None  # rebuilt with the new damping
            outcome = f"damping raised to {self.damping:.1e}"
        warnings.warn(
            f"{type(self).__name__}: step skipped ({reason}); {outcome}", RuntimeWarning, stacklevel=3
        )

    # ------------------------------------------------------------ the step
    def _own_pass_records(self) -> dict | None:
        """What the persistent hooks recorded of the user's own pass since the last step.

        Installed on first use for optimizers with Kronecker blocks (one process), removed
        by ``close()`` or when the optimizer is garbage-collected. Only passes with
        gradients enabled are recorded (an evaluation under ``no_grad`` is not).
        """
        if not self.factored_gradients or self.group is not None or self._hooks is False:
            return None
        if self._hooks is None:
            self._hooks = contextlib.ExitStack()
            self._persistent = self._hooks.enter_context(
                record_linear_factors(self.model, self._params(), user_passes_only=True)
            )
        return self._persistent

    def close(self) -> None:
        """Remove the optimizer's hooks from the model (also done when it is garbage-collected)."""
        if self._hooks:
            self._hooks.close()
        self._hooks, self._persistent = False, None

    def __del__(self):
        hooks = getattr(self, "_hooks", None)
        if hooks:
            hooks.close()

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
        bad_data = _non_finite_part(batch)
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
            undone = self._undo_last_update(params)
            self._skip(f"loss is {loss.item()}" + ("; the previous update was undone" if undone else ""))
            return loss
        gradient = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if not all_finite(gradient):
            self._skip("the gradient is not finite")
            return loss
        decays = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        if any(decays):
            gradient = [g + decay * p if decay else g for g, p, decay in zip(gradient, params, decays)]
        skippable = (_SkipStep, NonFiniteError, RankFailure)  # NaN/Inf in the batch, curvature or direction
        failure = None
        try:
            updates, predicted = self._updates(gradient, batch, decays)
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
        for p, u in zip(params, updates):
            # Kept for an exact undo (θ + u − u need not be θ); the buffer is reused.
            previous = self.state[p].get("previous_value")
            if previous is None:
                self.state[p]["previous_value"] = p.detach().clone()
            else:
                previous.copy_(p)
            p.add_(u)
            if self.rescale is not None:  # δ₀ of the next step
                self.state[p]["last_update"] = u
        self._skipped_in_row = 0
        adapt = self.damping_policy == "levenberg-marquardt" and self.steps % self.damping_every == 0
        if adapt and closure is not None and loss is not None:
            self._adapt_damping(closure, loss, gradient, updates, predicted, batch)
        self.steps += 1
        return loss

    def _updates(self, gradient: list[Tensor], batch, decays: list[float]):
        """``(updates, predicted decrease or None)``: curvature and inverse refreshed as due.

        Raises ``_SkipStep`` (or ``NonFiniteError`` from the curvature code) when the
        batch, the curvature, the direction or the update is not finite.
        """
        refresh = self.steps % self.curvature_every == 0
        if refresh:
            statistics_batch = self._head(batch, self.curvature_examples)
            with torch.enable_grad():
                fresh = self.build_curvature(self._problem(statistics_batch))
            self._curvature_source = (self.steps, tuple(t.detach() for t in statistics_batch))
            self.counts["curvature"] += 1
            if not curvature_state.all_finite(fresh):
                raise _SkipStep("the curvature is not finite")
            # The inverse is kept until its own refresh (``inverse_every``), as in K-FAC.
            self.curvature = curvature_state.running_average(self.curvature, fresh, self.ema_decay)
        if self._inverse is None or self.steps % self.inverse_every == 0:
            self._refresh_inverse(self.damping)
        with torch.enable_grad():
            direction = self.direction(gradient)
        self._records = None  # frees the recorded activations
        if not all_finite(direction):
            raise _SkipStep("the preconditioned direction is not finite")
        predicted = None
        if self.rescale is not None:
            with torch.enable_grad():
                problem = self._problem(self._head(batch, self.rescale_examples))
                updates, predicted = self._rescaled_updates(direction, gradient, problem, decays)
        else:
            updates = self._momentum_updates(direction)
        if not all_finite(updates):
            raise _SkipStep("the update is not finite")
        return updates, predicted

    def _momentum_updates(self, direction: list[Tensor]) -> list[Tensor]:
        """−lr · m per parameter, m ← momentum · m + d (the momentum buffers live in the state)."""
        updates = []
        for group in self.param_groups:
            for p in group["params"]:
                d = direction[len(updates)].reshape_as(p)
                state = self.state[p]
                if group["momentum"] > 0:
                    buffer = state.get("momentum_buffer")
                    buffer = d.clone() if buffer is None else buffer.mul_(group["momentum"]).add_(d)
                    state["momentum_buffer"] = buffer
                    d = buffer
                # Written into a kept scratch tensor: a fresh one per step would fault in
                # new pages.
                updates.append(torch.mul(d, -group["lr"], out=scratch(self._scratch, p, d.dtype)))
        return updates

    def _rescaled_updates(self, direction, gradient, problem, decays) -> tuple[list[Tensor], float]:
        r"""δ = lr · (αΔ + μδ₀) minimising the exact damped quadratic model (Martens & Grosse §7).

        With V = [Δ, δ₀] (n × k, k ≤ 2) the model M(Vx) = bᵀx + ½ xᵀ(VᵀEV + λVᵀV)x
        (E the exact matrix plus weight decay η, b = Vᵀg) is minimised by
        x = −(VᵀEV + λVᵀV)⁻¹ b. If the 2×2 system is singular or not positive
        definite (δ₀ parallel to Δ, an indefinite Hessian) only α is chosen; if even
        ΔᵀEΔ + λ‖Δ‖² ≤ 0, the step is Δ itself.
        Returns the updates and the undamped model decrease gᵀδ + ½δᵀ(E + η)δ (for LM).
        """
        params = self._params()
        lrs = [group["lr"] for group in self.param_groups for _ in group["params"]]
        columns = [_flat([-d.reshape_as(p) for d, p in zip(direction, params)])]
        previous = [self.state[p].get("last_update") for p in params]
        if all(u is not None for u in previous):
            columns.append(_flat(previous))
        V = torch.stack(columns, dim=1)
        exact = exact_class(self.rescale)(problem)
        EV = exact @ V
        if any(decays):
            EV = EV + V * _flat([torch.full_like(p, d) for p, d in zip(params, decays)])[:, None]
        quadratic = (V.T @ EV).double()  # the undamped model's curvature
        damped = quadratic + self.damping * (V.T @ V).double()
        b = (V.T @ _flat(gradient)).double()
        x = None
        for k in (V.shape[1], 1):
            A = damped[:k, :k]
            if bool(torch.isfinite(A).all()) and bool(torch.linalg.eigvalsh(A).min() > 0):
                x = torch.zeros_like(b)
                x[:k] = -torch.linalg.solve(A, b[:k])
                break
        if x is None:
            x = torch.zeros_like(b)
            x[0] = 1.0
        self.last_rescale = tuple(x.tolist())  # (α, μ) for inspection
        predicted = float(b @ x + 0.5 * x @ quadratic @ x)
        step = exact.flat_to_list((V @ x.to(V.dtype))[:, None])
        return [s[0] * lr for s, lr in zip(step, lrs)], predicted

    def _undo_last_update(self, params: list[Tensor]) -> bool:
        """θ back to its value before the last update, momentum cleared; whether there was one."""
        undone = False
        for p in params:
            state = self.state[p]
            if "previous_value" in state:
                p.copy_(state.pop("previous_value"))
                state.pop("momentum_buffer", None)
                state.pop("last_update", None)
                undone = True
        return undone

    def _adapt_damping(
        self,
        closure,
        loss: Tensor,
        gradient: list[Tensor],
        step: list[Tensor],
        predicted: float | None = None,
        batch=None,
    ) -> None:
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
            self._undo_last_update(self._params())
            self.damping = self.damping * 10
            self._inverse = None
            self.last_rho = -math.inf
            return
        if predicted is None:
            g, s = _flat(gradient), _flat(step)
            curvature_product = self.curvature @ s if self.curvature is not None else torch.zeros_like(s)
            predicted = (g @ s + 0.5 * s @ curvature_product).item()
        actual = (new_loss - loss).item()
        rho = actual / predicted if predicted < 0 else -math.inf
        if rho > 0.75:
            self.damping = max(self.damping * self.damping_factor, self.min_damping)
        elif rho < 0.25:
            self.damping = self.damping / self.damping_factor
        self.last_rho = rho

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``torch.optim`` state plus step count, damping and the curvature snapshot."""
        state = super().state_dict()
        extra = {
            "param_shapes": [list(p.shape) for p in self._params()],
            "steps": self.steps,
            "damping": self.damping,
            "inverse_damping": self._inverse_damping,
            "counts": dict(self.counts),
            "skipped_in_row": self._skipped_in_row,
            "curvature": None,
        }
        if self.curvature is not None and curvature_state.is_snapshotable(self.curvature):
            extra["curvature"] = curvature_state.snapshot(self.curvature)
        elif self.curvature is not None:  # a matrix-free operator: keep what rebuilds it
            step, batch = self._curvature_source
            extra["curvature_source"] = {"step": step, "batch": list(batch)}
        built_from = self._inverse_curvature
        if built_from is not None and built_from is not self.curvature and self._inverse is not None:
            # Curvature refreshed since the last inverse (inverse_every > curvature_every).
            extra["inverse_curvature"] = curvature_state.snapshot(built_from)
        state["curvlab"] = extra
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore everything ``state_dict`` saved; the inverse is rebuilt identically."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None)
        check_state_shapes(self._params(), state_dict, extra.get("param_shapes") if extra else None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.steps, self.damping, self.counts = extra["steps"], extra["damping"], dict(extra["counts"])
        self._skipped_in_row = extra.get("skipped_in_row", 0)
        params = self._params()
        self.curvature, self._inverse = None, None
        if extra["curvature"] is not None:
            shapes = [p.shape for p in params]
            names = Problem._names_of(unwrap(self.model), params)
            self.curvature = curvature_state.restore(
                extra["curvature"], shapes, names, params[0].dtype, params[0].device
            )
        elif extra.get("curvature_source") is not None:
            source = extra["curvature_source"]
            steps, self.steps = self.steps, source["step"]  # the MC seed of that step
            with torch.enable_grad():
                self.curvature = self.build_curvature(self._problem(source["batch"]))
            self.steps = steps
            self._curvature_source = (source["step"], tuple(source["batch"]))
        if self.curvature is not None and extra["inverse_damping"] is not None:
            built_from = None
            if extra.get("inverse_curvature") is not None:
                C = self.curvature
                built_from = curvature_state.restore(
                    extra["inverse_curvature"], C.param_shapes, C.param_names, C.dtype, C.device
                )
            self._refresh_inverse(extra["inverse_damping"], built_from)
            self.counts = dict(extra["counts"])
