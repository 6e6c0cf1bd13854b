"""The curvature problem: a model, a loss, data and the parameters to differentiate."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.distributed import Group, check_same, resolve, unwrap
from curvlab.errors import CurvlabError, DataError, NonFiniteError, UnsupportedError
from curvlab.losses import LossRule, rule_for
from curvlab.passes.capture import own_pass
from curvlab.shims import curvature_pass


def call_with(model: nn.Module, tensors: dict[str, Tensor], args: tuple):
    """``torch.func.functional_call``, leaving the model's own tensors exactly in place.

    functional_call can leave a submodule reachable by two paths (the same
    ``nn.Linear`` twice in a ``Sequential``) with *new* parameter objects after it
    returns (pytorch/pytorch#164759): the model would then no longer hold the
    tensors an optimizer updates. Every module's parameter and buffer slots are
    put back as they were.
    """
    slots = [
        (store, name, tensor)
        for module in model.modules()
        for store in (module._parameters, module._buffers)
        for name, tensor in store.items()
    ]
    try:
        with own_pass():  # the user's recording hooks (an optimizer's) ignore it
            return functional_call(model, tensors, args)
    finally:
        for store, name, tensor in slots:
            if store.get(name) is not tensor:
                store[name] = tensor


def uses_in_graph(output: Tensor, leaves: Sequence[Tensor]) -> list[int]:
    """How many edges of ``output``'s autograd graph end at each leaf tensor.

    An edge is one operation reading the leaf (``nn.Linear`` reads its weight
    once); 0 means the output does not depend on the leaf. Each graph node is
    visited once, so this is linear in the size of the graph.
    """
    counts: Counter[int] = Counter()
    root = output.grad_fn
    stack, seen = ([root], {root}) if root is not None else ([], set())
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                counts[id(variable)] += 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return [counts[id(leaf)] for leaf in leaves]


def _fingerprint(X: Tensor, y: Tensor) -> tuple:
    """Shapes, dtypes and float64 sums (plain, position-weighted, absolute) of a batch's rows."""
    sums = []
    for t in (X, y):
        rows = t.detach().reshape(t.shape[0], -1).sum(1, dtype=torch.float64)
        weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.float64, device=rows.device)
        sums.append(torch.stack([rows.sum(), (rows * weights).sum(), rows.abs().sum() * rows.shape[0]]))
    return (tuple(X.shape), tuple(y.shape), X.dtype, y.dtype), torch.stack(sums).cpu()


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    """Equal shapes and dtypes, and sums equal up to float64 rounding of the same numbers."""
    if a[0] != b[0]:
        return False
    tolerance = 1e-9 * (b[1][:, 2:3] + 1e-300)  # relative to the size of the sums
    return bool(((a[1] - b[1]).abs() <= tolerance).all())


def _changing_data_error(what: str) -> DataError:
    return DataError(
        f"the data {what}: curvature reads the data many times and needs the same batches in every "
        "pass (a DataLoader with shuffle=True, drop_last, random augmentation, or a one-shot iterable?). "
        "Pass DataLoader(..., shuffle=False) without random transforms, or a list of the batches: "
        "list(loader)"
    )


class Problem:
    r"""A model, a loss, data and the parameters θ that curvature is taken over.

    The risk is R(θ) = c Σ_n ℓ_n over **every** example of every batch, with
    c = 1 / (number of loss terms in all the data) for ``reduction="mean"`` and
    c = 1 for ``"sum"``. The number of terms is what the loss object itself
    divides by: N·C for ``MSELoss``/``BCEWithLogitsLoss`` with outputs (N, C),
    N·d₁·… for ``CrossEntropyLoss`` with targets (N, d₁, …). Batches of unequal
    size are therefore weighted exactly as one big batch would be.

    Args:
        model: Any differentiable ``nn.Module``. Curvature is evaluated in eval
            mode (dropout off, batch-norm running statistics) unless
            ``eval_mode=False``; the module's own mode is restored afterwards.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            with ``reduction`` ``"mean"`` or ``"sum"``.
        data: One ``(X, y)`` pair or any re-iterable of ``(X, y)`` batches (a
            ``DataLoader``, a list). A one-shot iterator is read into a list. Batches
            are moved to the model's device; floating inputs and targets are cast
            to the parameters' dtype.
        params: The parameters to differentiate, flattened in this order (each
            tensor row-major). Default: every model parameter that requires grad.
        eval_mode: Evaluate the model in eval mode (default ``True``). ``False``:
            in the model's own mode, except that dropout is off; a batch norm in
            training then normalizes by each batch's statistics, so an example's
            output depends on its batch and every curvature is that of the batch
            function (per-example terms are derivatives of ℓ_n(F(θ, X)_n)). Its
            running statistics are never updated by curvature computations. A
            model that is still random (a noise module of its own) is refused.

    Attributes:
        param_uses: ``{name: count}``, how many operations of the first batch's
            forward pass read each parameter (``nn.Linear`` reads its weight once;
            0: unused, its curvature is 0). The layerwise approximations use it to
            refuse shared or unused layers.

    Raises:
        UnsupportedError: unsupported loss, reduction or loss option; a model
            whose forward pass writes one of its buffers (batch norm's running
            statistics are left alone instead).
        DataError: empty data, a batch that is not an ``(X, y)`` pair, inputs and
            targets of different lengths, or outputs that do not fit the targets.
        ValueError: a parameter that is not in ``model``, a duplicate, or
            parameters of mixed dtype or device.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data,
        params: Sequence[Tensor] | None = None,
        eval_mode: bool = True,
        process_group="auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = unwrap(model)  # DistributedDataParallel: its module (its hooks must not fire)
        self.group: Group | None = resolve(process_group)
        self.model = model
        self.loss_fn = loss_fn
        self.loss_rule: LossRule = rule_for(loss_fn)
        if not isinstance(eval_mode, bool):
            raise TypeError(f"eval_mode must be True or False, got {eval_mode!r}")
        self.eval_mode = eval_mode
        self.params: list[Tensor] = self._check_params(model, params)
        self.param_names: list[str] = self._names_of(model, self.params)
        self.data = self._as_reiterable(data)
        self._count_globally()
        self._check_first_batch()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_params(model: nn.Module, params) -> list[Tensor]:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise ValueError("no parameters to differentiate: the list of params is empty")
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                raise ValueError("params contains the same tensor twice")
            seen.add(id(p))
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"params must share one dtype and device, got dtypes {sorted(map(str, dtypes))} "
                f"and devices {sorted(map(str, devices))}"
            )
        if not params[0].is_floating_point():
            raise UnsupportedError(f"parameters of dtype {params[0].dtype} are not supported")
        if params[0].dtype in (torch.float16, torch.bfloat16):
            raise UnsupportedError(
                f"parameters of dtype {params[0].dtype} are not supported: curvature in half precision "
                "keeps about 3 significant digits (products 4e-4 to 3e-3 off in relative terms), and "
                "spectra and solves amplify that. Compute it on a float32 copy: "
                "copy.deepcopy(model).float() (or .double())"
            )
        return params

    @staticmethod
    def _names_of(model: nn.Module, params: list[Tensor]) -> list[str]:
        by_id = {id(p): name for name, p in model.named_parameters()}
        names = []
        for i, p in enumerate(params):
            if id(p) not in by_id:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model "
                    f"{type(model).__name__}; pass tensors from model.parameters()"
                )
            names.append(by_id[id(p)])
        return names

    @staticmethod
    def _as_reiterable(data):
        """A list of the batches for a pair, a list or tuple, or an iterator; other iterables as given.

        A list is copied (the list, not its tensors): batches appended to the caller's
        list afterwards are not part of this problem.
        """
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            return [data]
        if isinstance(data, Tensor):
            raise DataError("data must be an (X, y) pair or an iterable of (X, y) batches")
        if not isinstance(data, Iterable):
            raise DataError(f"data must be an (X, y) pair or an iterable of batches, got {type(data)}")
        if isinstance(data, (list, tuple, Iterator)):
            return list(data)
        return data

    def _count_globally(self) -> None:
        """Counts over every rank's shard (one all-reduce); this process' batches are ``num_local_batches``.

        num_counted_examples: those with at least one loss term (fewer than num_examples
        only when cross-entropy targets equal ignore_index); KFAC's and ACP's averages over
        examples use it. ``batch_offset``: this rank's first batch in the global order
        (rank 0's batches, then rank 1's, ...), which Monte-Carlo labels are drawn by.
        """
        error, local = None, (0, 0, 0, 0)
        try:
            local = self._count()
        except CurvlabError as caught:
            error = caught
        self.num_local_batches, self.batch_offset = local[3], 0
        totals = local
        if self.group is not None:
            per_rank = torch.zeros(3 + self.group.size, dtype=torch.float64)
            per_rank[:3] = torch.tensor(local[:3], dtype=torch.float64)
            per_rank[3 + self.group.rank] = local[3]
            per_rank = self.group.sum_([per_rank], error)[0].long().tolist()
            batches = per_rank[3:]
            totals = (*per_rank[:3], sum(batches))
            self.batch_offset = sum(batches[: self.group.rank])
            names, params = self.param_names, self.params
            signature = [(name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params)]
            check_same(self.group, "the parameters (names, shapes, dtypes)", signature)
            check_same(self.group, "the loss", (self.loss_rule.name, self.loss_rule.reduction))
        elif error is not None:
            raise error
        self.num_terms, self.num_examples, self.num_counted_examples, self.num_batches = totals
        where = " on every rank" if self.group is not None else ""
        if self.num_batches == 0 or self.num_examples == 0:
            raise DataError(f"data is empty{where}: curvature needs at least one example")
        if self.num_terms == 0:
            raise DataError(f"no loss terms{where}: every target equals the loss' ignore_index")

    def _count(self) -> tuple[int, int, int, int]:
        """This process' loss terms, examples, counted examples and batches."""
        num_terms = num_examples = num_counted = num_batches = 0
        self.input_ndims: set[int] = set()  # X.dim() of the batches (MLP pass: {2})
        for index, (X, y) in enumerate(self._raw_batches()):
            if X.dim() == 0 or y.dim() == 0:
                raise DataError(
                    f"batch {index}: inputs and targets need a leading dimension of examples, got "
                    f"shapes {tuple(X.shape)} and {tuple(y.shape)}"
                )
            self.input_ndims.add(X.dim())
            if X.shape[0] != y.shape[0]:
                raise DataError(
                    f"batch {index}: inputs have {X.shape[0]} examples but targets have {y.shape[0]}"
                )
            if X.shape[0] == 0:
                raise DataError(f"batch {index} has no examples (0 rows): leave empty batches out")
            self.loss_rule.check_target_type(y, f"batch {index}")
            num_terms += self.loss_rule.count(y)
            num_examples += X.shape[0]
            counted = self.loss_rule.example_mask(y)
            num_counted += X.shape[0] if counted is None else int(counted.sum())
            num_batches += 1
        return num_terms, num_examples, num_counted, num_batches

    def _check_first_batch(self) -> None:
        """Check the model's output on the first batch; count each parameter's uses in its graph.

        Under a process group every rank checks its own first batch, and a parameter's
        uses are the largest count of any rank (a rank with an empty shard reads none).
        """
        if self.group is None:
            self._check_batch(*next(iter(self.batches())))
            self._checked_signature = self._signature()
            return
        error, uses = None, [0] * len(self.params)
        try:
            if self.num_local_batches:
                self._check_batch(*next(iter(self.batches())))
                uses = [self.param_uses[name] for name in self.param_names]
        except CurvlabError as caught:
            error = caught
        self.group.sum_([], error)
        counts = self.group.max_(torch.tensor(uses, dtype=torch.float64))
        self.param_uses = dict(zip(self.param_names, counts.long().tolist()))

    def _check_batch(self, X: Tensor, y: Tensor) -> None:
        """Check the model's output on one batch; count each parameter's uses in its graph."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        buffers = list(self.model.named_buffers())
        before = [(b._version, b.clone()) for _, b in buffers]
        with torch.enable_grad():
            output = self.forward(leaves, X)
        for (name, buffer), (version, copy) in zip(buffers, before):
            if buffer._version != version:  # written in place by the forward pass
                with torch.no_grad():
                    buffer.copy_(copy)  # undone: the model is left as it was
                raise UnsupportedError(
                    f"the model's forward pass writes its buffer {name!r} in place (a running "
                    "statistic?); curvature evaluates the model many times and must not change "
                    "it. Use eval_mode=True (the default), or a module that leaves its buffers alone"
                )
        if not isinstance(output, torch.Tensor):
            raise UnsupportedError(
                f"the model returned a {type(output).__name__}, not a tensor: curvlab needs the "
                "model's predictions as one tensor (the loss' input); wrap the model in an "
                "nn.Module whose forward returns that tensor"
            )
        self.loss_rule.check(output, y)
        if not self.eval_mode:
            self._check_deterministic(leaves, X, output.detach())
        # param_uses[name]: how many operations of the forward pass read the parameter
        # (0: not used, its curvature is 0; more than 1 for a layer: weight sharing).
        self.param_uses: dict[str, int] = dict(zip(self.param_names, uses_in_graph(output, leaves)))

    def _check_deterministic(self, params: list[Tensor], X: Tensor, output: Tensor) -> None:
        """UnsupportedError if a second forward pass of the first batch gives another output.

        In its own mode a model may be random (a noise layer in training): every product
        would then see another function, and the results would be noise.
        """
        with torch.no_grad():
            again = self.forward(params, X)
        scale = output.abs().max().item() if output.numel() else 0.0
        if not torch.allclose(again, output, rtol=1e-5, atol=1e-6 * scale):
            raise UnsupportedError(
                "with eval_mode=False the model gives different outputs for the same batch in two "
                "forward passes (a random module in training mode? dropout is switched off, other "
                "noise is not); curvature needs one function. Use eval_mode=True (the default) or put "
                "those modules in eval mode"
            )

    def _raw_batches(self):
        """The batches as the data gives them, checked to be the same on every pass.

        A list (a snapshot taken at construction) is the same by construction. Any
        other iterable (a ``DataLoader``) is read anew on every pass: each batch is
        compared with the first pass by a fingerprint (shapes, dtypes and
        position-weighted sums of X and y), and so is the number of batches. A
        shuffling loader (with or without ``drop_last``), random augmentation or a
        one-shot iterable would otherwise give every product another matrix.
        """
        recorded = getattr(self, "_fingerprints", None)
        fingerprints = []
        count = 0
        for index, batch in enumerate(self.data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise DataError(f"batch {index} is not an (X, y) pair: got {type(batch).__name__}")
            for what, t in zip(("inputs X", "targets y"), batch):
                if not isinstance(t, Tensor):
                    raise DataError(
                        f"batch {index}: the {what} are a {type(t).__name__}, not a torch.Tensor "
                        "(torch.as_tensor converts arrays)"
                    )
            count = index + 1
            if isinstance(self.data, list):
                yield batch
                continue
            fingerprint = _fingerprint(*batch)
            if recorded is None:
                fingerprints.append(fingerprint)
            elif index >= len(recorded):
                raise _changing_data_error(f"gave more batches than the {len(recorded)} of the first pass")
            elif not _same_fingerprint(fingerprint, recorded[index]):
                raise _changing_data_error(f"gave a batch {index} different from the first pass")
            yield batch
        if isinstance(self.data, list):
            return
        if recorded is None:
            self._fingerprints = fingerprints
        elif count != len(recorded):
            raise _changing_data_error(f"gave {count} batches, the first pass {len(recorded)}")

    # ------------------------------------------------------------------ public
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters (and of every curvature object of this problem)."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.params[0].device

    @property
    def num_params(self) -> int:
        """n, the total number of scalar parameters."""
        return sum(p.numel() for p in self.params)

    @property
    def reduction_factor(self) -> float:
        """c: 1 / (number of loss terms) for ``"mean"``, 1 for ``"sum"``."""
        return 1.0 / self.num_terms if self.loss_rule.reduction == "mean" else 1.0

    def batches(self):
        """Yield ``(X, y)`` on the parameters' device, floats in their dtype.

        Raises ``NonFiniteError`` for inputs with NaN or Inf: a saturating model can
        map them to a finite output whose derivatives are NaN.
        """
        for index, (X, y) in enumerate(self._raw_batches()):
            # Detached: curvature is taken in the parameters, never in the data.
            X = X.detach().to(self.device, self.dtype if X.is_floating_point() else None)
            y = self.loss_rule.prepare_target(y.detach().to(self.device), self.dtype)
            if (
                X.is_floating_point()
                and not bool(torch.isfinite(X.sum()))
                and not bool(torch.isfinite(X).all())
            ):
                raise NonFiniteError(f"the inputs of batch {index} have NaN or Inf entries")
            yield X, y

    def counted_batches(self):
        """Yield ``(index, X, y, counted)`` with only the examples that have a loss term.

        The same as ``enumerate(batches())`` (``counted`` is ``None``) unless
        cross-entropy targets equal ``ignore_index``: examples whose every target is
        ignored are left out, ``counted`` the bool ``(N,)`` mask of the batch's
        examples kept (a batch left empty is skipped; ``index`` stays the batch's
        position, in the global order of a process group: ``batch_offset`` + local
        position). The layerwise statistics (KFAC's input factors average over the
        examples) use this, so such examples count as if they were not in the data.
        """
        for index, (X, y) in enumerate(self.batches(), start=self.batch_offset):
            counted = self.loss_rule.example_mask(y)
            if counted is not None:
                if not bool(counted.any()):
                    continue
                X, y = X[counted], y[counted]
            yield index, X, y, counted

    def forward(self, params: Sequence[Tensor], X: Tensor) -> Tensor:
        """Model output on ``X`` with the chosen parameters replaced by ``params``.

        The model's other trainable parameters enter detached: no curvature result
        carries an autograd graph back to the model (a restricted problem's block
        built under ``enable_grad`` would otherwise keep one alive).
        """
        tensors = {name: p.detach() for name, p in self._other_trainable()}
        tensors.update(zip(self.param_names, params))
        with self.model_mode():
            return call_with(self.model, tensors, (X,))

    def _other_trainable(self) -> list[tuple[str, Tensor]]:
        """The model's trainable parameters outside ``params`` (found once per parameter choice)."""
        key = tuple(self.param_names)
        if getattr(self, "_others_key", None) != key:
            chosen = set(key)
            self._others = [
                (name, p)
                for name, p in self.model.named_parameters()
                if p.requires_grad and name not in chosen
            ]
            self._others_key = key
        return self._others

    def batch_loss(self, params: Sequence[Tensor], X: Tensor, y: Tensor) -> Tensor:
        """Sum-reduced loss of one batch (multiply by ``reduction_factor`` for the risk)."""
        output = self.forward(params, X)
        self.loss_rule.check(output, y)
        return self.loss_rule.sum_loss(output, y)

    def loss(self) -> Tensor:
        """The risk R(θ) over all batches (of every rank) at the current parameters."""

        def local():
            with torch.no_grad():
                total = torch.zeros((), dtype=self.dtype, device=self.device)
                for X, y in self.batches():
                    total += self.batch_loss(self.params, X, y)
            return [total * self.reduction_factor]

        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return self.sum_over_ranks(local, lambda: [zero])[0]

    def gradient(self) -> Tensor:
        """∇_θ R over all batches (of every rank), flat ``(n,)`` in parameter order (model untouched)."""

        def local():
            total = [torch.zeros_like(p) for p in self.params]
            for X, y in self.batches():
                params = [p.detach().requires_grad_(True) for p in self.params]
                grads = torch.autograd.grad(self.batch_loss(params, X, y), params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t.add_(g)
            return [torch.cat([t.reshape(-1) for t in total]).mul_(self.reduction_factor)]

        # Each rank's share scaled before the sum: ranks may take different routes to it
        # (a kept primal pass on one, a gradient pass on another).
        zeros = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        return self.sum_over_ranks(local, lambda: [zeros])[0]

    def sum_over_ranks(self, compute, placeholders, symmetric: bool = False) -> list[Tensor]:
        """``compute()``'s tensors summed over the ranks of the process group (one all-reduce).

        Without a group, ``compute()`` itself. With one, a rank where ``compute`` fails
        takes part with ``placeholders()`` (tensors of the same shapes) and raises its
        error after the collective; the other ranks raise ``RankFailure``: no hang.
        ``symmetric``: the tensors are symmetric matrices (Kronecker factors), sent as
        upper triangles.
        """
        if self.group is None:
            return compute()
        try:
            tensors, error = compute(), None
        except Exception as caught:  # noqa: BLE001 (raised again after the collective)
            tensors, error = placeholders(), caught
        if symmetric:
            return self.group.sum_symmetric_(tensors, error)
        return self.group.sum_(tensors, error)

    def on_batch(self, batch) -> Problem:
        """The same problem on another single batch ``(X, y)`` (an optimizer's next minibatch).

        The data is counted and checked as by the constructor; the model's check (a
        forward pass: the output against the targets, its buffers, each parameter's
        uses) is repeated only where the batch's shapes or dtypes differ from those
        of the batch it was made on, or under a process group. Optimizers refresh
        their curvature this way, so a refresh costs no validating forward pass.
        """
        checked = getattr(self, "_checked_signature", None)
        clone = object.__new__(Problem)
        clone.__dict__.update(self.__dict__)
        clone.__dict__.pop("_fingerprints", None)  # another data set
        clone.data = clone._as_reiterable(batch)
        clone._count_globally()
        if clone.group is not None or checked is None or clone._signature() != checked:
            clone._check_first_batch()
        return clone

    def _signature(self) -> tuple | None:
        """Shapes and dtypes of the one batch of the data (``None`` for several batches)."""
        if not isinstance(self.data, list) or len(self.data) != 1:
            return None
        X, y = self.data[0]
        return (tuple(X.shape), X.dtype, X.device, tuple(y.shape), y.dtype, y.device)

    def restrict(self, params: Sequence[Tensor]) -> Problem:
        """The same problem with curvature taken over ``params`` only (a block)."""
        clone = object.__new__(Problem)
        clone.__dict__.update(self.__dict__)
        clone.params = self._check_params(self.model, params)
        clone.param_names = self._names_of(self.model, clone.params)
        return clone

    def describe(self) -> str:
        """One line describing the problem, for logs and provenance."""
        return (
            f"{type(self.model).__name__}, {self.loss_rule.name}(reduction="
            f"{self.loss_rule.reduction!r}), {self.num_examples} examples in "
            f"{self.num_batches} batches, {self.num_params} parameters, {self.dtype}, {self.device}"
        )

    @contextlib.contextmanager
    def model_mode(self):
        """The model as curvature sees it: eval mode, or its own mode without side effects.

        In the model's own mode, a batch norm in training normalizes by the batch
        statistics as usual, but with ``track_running_stats`` off for the call its
        running statistics (and ``num_batches_tracked``) stay untouched: curvature
        evaluates the loss, it does not take a training step. Dropout is off: with a
        new random mask in every pass, products would not be of one matrix.

        Torch itself is switched for the call by ``curvlab.shims.curvature_pass``
        (attention's math path, weight norm from its parts, cuDNN off for recurrent
        models), and restored after.
        """
        if self.eval_mode:
            saved = [(m, "training", m.training) for m in self.model.modules()]
        else:
            saved = [
                (m, "track_running_stats", m.track_running_stats)
                for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            ]
            saved += [  # dropout modules, and attention's own dropout
                (m, "training", True)
                for m in self.model.modules()
                if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)) and m.training
            ]
        recurrent = any(isinstance(m, nn.RNNBase) for m in self.model.modules())
        try:
            for m, attribute, _ in saved:
                setattr(m, attribute, False)
            with curvature_pass(recurrent):
                yield
        finally:
            for m, attribute, value in saved:
                setattr(m, attribute, value)
