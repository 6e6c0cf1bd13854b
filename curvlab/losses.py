r"""Per-loss rules: reduction count, output-space Hessian, Fisher, gradients, sampling.

Every rule works on a batch of model outputs ``f`` (the logits) and targets ``y``
and uses the **sum** form of the loss, ℓ_n summed over every entry of example n;
the global reduction factor c (docs/theory.md) is applied by the caller. Output-space
vectors ``u`` have the shape of ``f``.

The curvature matrices differ only in the output-space matrix M_n placed between
the Jacobians, C = c Σ_n J_nᵀ M_n J_n:

* GGN: M_n = Λ_n = ∇²_f ℓ_n (``hessian_vp``; it depends on the targets only through a
  scale s, ``hessian_scale``),
* exact Fisher: M_n = E_{ŷ~p(·|f_n)}[∇_f ℓ(f_n, ŷ) ∇_f ℓ(f_n, ŷ)ᵀ] (``fisher_vp``),
* Monte-Carlo Fisher: the expectation replaced by samples (``sample_targets``),
* empirical Fisher: M_n = r_n r_nᵀ with r_n = ∇_f ℓ(f_n, y_n) (``output_gradient``).

Likelihoods (negative log = loss): MSE ↔ Gaussian with variance 1/2 for ‖f − y‖²,
cross-entropy ↔ categorical over ``softmax(f)`` along dim 1, BCE-with-logits ↔
independent Bernoulli(σ(f)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import DataError, NonFiniteError, UnsupportedError

SUPPORTED_REDUCTIONS = ("mean", "sum")


def _scaled(t: Tensor, scale: Tensor | None) -> Tensor:
    return t if scale is None else t * scale


class LossRule:
    """Rules of one loss class; subclasses implement the closed forms."""

    loss_class: type = nn.Module
    name = "loss"

    def __init__(self, loss_fn: nn.Module):
        self.loss_fn = loss_fn
        self.reduction = loss_fn.reduction

    def check(self, output: Tensor, target: Tensor) -> None:
        """``validate``, then ``NonFiniteError`` if the output or a float target has NaN or Inf.

        Every curvature computation checks its model outputs here, so a NaN in the
        parameters or the data is an error naming it, not a NaN eigenvalue.
        """
        self.validate(output, target)
        for what, t in (("model output", output), ("target", target)):
            # One sum first (finite entries almost never overflow it), the full check only then.
            if t.is_floating_point() and not bool(torch.isfinite(t.detach().sum())):
                if not bool(torch.isfinite(t.detach()).all()):
                    raise NonFiniteError(
                        f"{self.name}: the {what} has NaN or Inf entries; check the model's parameters "
                        "and the data"
                    )

    def check_target_type(self, target: Tensor, where: str) -> None:
        """``DataError`` for targets of a dtype the loss does not take (``where``: e.g. "batch 2").

        Called once per batch, before the model runs. This base accepts what ``MSELoss``
        accepts: floating, integer and bool targets (torch promotes them).
        """
        if target.is_complex():
            raise DataError(f"{self.name}: {where} has complex targets ({target.dtype}); use real ones")

    def prepare_target(self, target: Tensor, dtype: torch.dtype) -> Tensor:
        """The target as curvature uses it: here cast to the parameters' ``dtype``."""
        return target.to(dtype)

    def validate(self, output: Tensor, target: Tensor) -> None:
        """Raise ``DataError`` if ``output`` and ``target`` shapes do not fit."""
        if output.shape != target.shape:
            raise DataError(
                f"{self.name}: model output has shape {tuple(output.shape)} but the target "
                f"has shape {tuple(target.shape)}; they must be equal (no broadcasting)"
            )

    def count(self, target: Tensor) -> int:
        """Number of loss terms the ``"mean"`` reduction divides by for this batch."""
        return target.numel()

    def mask(self, target: Tensor) -> Tensor | None:
        """Which output entries have a loss term: a bool tensor broadcastable to the output.

        ``None`` when every entry has one (always, except cross-entropy targets equal
        to ``ignore_index``). Curvature of an entry without a term is zero: callers
        multiply their output-space vectors by the mask.
        """
        return None

    def example_mask(self, target: Tensor) -> Tensor | None:
        """Which examples have at least one loss term: bool ``(N,)``, or ``None`` for all."""
        return None

    def sum_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of the batch with ``reduction="sum"`` (a scalar)."""
        raise NotImplementedError

    def output_gradient(self, output: Tensor, target: Tensor) -> Tensor:
        """R = ∇_f ℓ(f, y), shaped like ``output``."""
        raise NotImplementedError

    def sampled_gradient(self, output: Tensor, sampled: Tensor) -> Tensor:
        """∇_f ℓ(f, ŷ) for targets ŷ drawn from the model (``sample_targets``).

        Unlike ``output_gradient`` no target is ever ignored: ``ignore_index`` marks
        data, and a sampled class equal to it is an ordinary outcome.
        """
        return self.output_gradient(output, sampled)

    def hessian_vp(self, output: Tensor, u: Tensor, target: Tensor) -> Tensor:
        """∇²_f ℓ u = s · Λ(f) u per example for these targets; ``u`` shaped like ``output``."""
        return _scaled(self._lambda_vp(output, u), self.hessian_scale(target))

    def hessian_sqrt_columns(self, output: Tensor, target: Tensor) -> Tensor:
        """Columns r_v with ∇²_f ℓ_n = Σ_v r_v r_vᵀ per example: ``(V, *output.shape)``.

        V is the number of output entries per example; these are the vectors
        type-2 KFAC backpropagates (√s times the square-root columns of Λ(f)).
        """
        return _scaled(self._lambda_sqrt_columns(output), self._sqrt_scale(target))

    def diagonal_hessian_sqrt(self, output: Tensor, target: Tensor) -> Tensor | None:
        """√(∇²_f ℓ) entrywise, shaped like ``output``, where it is diagonal; else ``None``."""
        root = self._lambda_diagonal_sqrt(output)
        return None if root is None else _scaled(root, self._sqrt_scale(target))

    def hessian_scale(self, target: Tensor) -> Tensor | None:
        """The s ≥ 0 with ∇²_f ℓ = s · Λ(f) per loss term, broadcastable to the output (``None``: 1).

        Λ(f) (``_lambda_*``) depends on the model output only; the three methods
        above apply s for the targets. Only BCE's ``pos_weight`` and cross-entropy
        probability targets that do not sum to 1 have s ≠ 1.
        """
        return None

    def _sqrt_scale(self, target: Tensor) -> Tensor | None:
        scale = self.hessian_scale(target)
        return None if scale is None else scale.sqrt()

    def fisher_vp(self, output: Tensor, u: Tensor) -> Tensor:
        """E_ŷ[r̂ r̂ᵀ] u computed from the likelihood (not from Λ), per example."""
        raise NotImplementedError

    def _lambda_vp(self, output: Tensor, u: Tensor) -> Tensor:
        """Λ(f) u per example, Λ(f) the output Hessian without the targets' scale."""
        raise NotImplementedError

    def _lambda_sqrt_columns(self, output: Tensor) -> Tensor:
        """Columns s_v with Λ(f)_n = Σ_v s_v s_vᵀ per example: ``(V, *output.shape)``."""
        diagonal = self._lambda_diagonal_sqrt(output)
        if diagonal is None:
            raise NotImplementedError(f"{type(self).__name__} must define _lambda_sqrt_columns")
        per_example = output[0].numel()
        eye = torch.eye(per_example, dtype=output.dtype, device=output.device)
        columns = eye.reshape(per_example, 1, *output.shape[1:])
        return columns * diagonal.unsqueeze(0)

    def _lambda_diagonal_sqrt(self, output: Tensor) -> Tensor | None:
        """√Λ(f) entrywise, shaped like ``output``, where Λ(f)_n is diagonal; else ``None``."""
        return None

    def noise_shape(self, target: Tensor, num_samples: int) -> tuple[int, ...]:
        """Shape of the standard noise that ``sample_targets`` transforms."""
        return (num_samples, *target.shape)

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """Device-independent noise drawn on the CPU in ``dtype`` (the problem's)."""
        return torch.rand(shape, generator=generator, dtype=dtype)

    def sample_targets(self, output: Tensor, noise: Tensor) -> Tensor:
        """Targets ŷ ~ p(·|f), one per leading noise index: ``(S, *target.shape)``."""
        raise NotImplementedError


class MSERule(LossRule):
    """``nn.MSELoss``: ℓ = ‖f − y‖², Λ = 2I, Gaussian likelihood with variance 1/2."""

    loss_class = nn.MSELoss
    name = "MSELoss"

    def sum_loss(self, output, target):  # noqa: D102
        return ((output - target) ** 2).sum()

    def output_gradient(self, output, target):  # noqa: D102
        return 2.0 * (output - target)

    def _lambda_vp(self, output, u):
        return 2.0 * u

    def _lambda_diagonal_sqrt(self, output):
        return torch.full_like(output, math.sqrt(2.0))

    def fisher_vp(self, output, u):  # noqa: D102
        # r̂ = 2(f − ŷ), ŷ ~ N(f, σ²I) with σ² = 1/2  ⇒  E[r̂ r̂ᵀ] = 4σ² I = 2I.
        return 4.0 * 0.5 * u

    def draw_noise(self, shape, generator, dtype):  # noqa: D102
        return torch.randn(shape, generator=generator, dtype=dtype)

    def sample_targets(self, output, noise):  # noqa: D102
        return output.detach() + math.sqrt(0.5) * noise


class BCEWithLogitsRule(LossRule):
    """``nn.BCEWithLogitsLoss``: independent Bernoulli(σ(f)) per output entry.

    ``pos_weight`` w (broadcast over the output like torch does) weighs the
    positive term: ℓ = −w y log σ − (1 − y) log(1 − σ), so ∇_f ℓ = s σ − w y and
    ∇²_f ℓ = s σ(1 − σ) with s = 1 + (w − 1) y (``hessian_scale``): the GGN, the
    Hessian, the empirical Fisher and KFAC follow it. The Fisher, exact and
    Monte-Carlo, stays the model's Bernoulli likelihood (ŷ ~ σ, score σ − ŷ).
    """

    loss_class = nn.BCEWithLogitsLoss
    name = "BCEWithLogitsLoss"

    def __init__(self, loss_fn: nn.Module):
        super().__init__(loss_fn)
        self.pos_weight = loss_fn.pos_weight

    def check_target_type(self, target, where):  # noqa: D102
        if not target.is_floating_point():
            raise DataError(
                f"BCEWithLogitsLoss: {where} has targets of dtype {target.dtype}; the loss takes "
                "floating-point targets (probabilities in [0, 1]), as torch requires: use y.float()"
            )

    def _weight_like(self, t: Tensor) -> Tensor:
        return self.pos_weight.to(t.device, t.dtype)

    def sum_loss(self, output, target):  # noqa: D102
        pos_weight = None if self.pos_weight is None else self._weight_like(output)
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum", pos_weight=pos_weight)

    def output_gradient(self, output, target):  # noqa: D102
        if self.pos_weight is None:
            return torch.sigmoid(output) - target
        return torch.sigmoid(output) * self.hessian_scale(target) - self._weight_like(output) * target

    def sampled_gradient(self, output, sampled):  # noqa: D102
        return torch.sigmoid(output) - sampled  # the likelihood's score: no pos_weight

    def hessian_scale(self, target):  # noqa: D102
        if self.pos_weight is None:
            return None
        return 1 + (self._weight_like(target) - 1) * target

    def _lambda_vp(self, output, u):
        s = torch.sigmoid(output)
        return s * (1 - s) * u

    def _lambda_diagonal_sqrt(self, output):
        s = torch.sigmoid(output)
        return (s * (1 - s)).sqrt()

    def fisher_vp(self, output, u):  # noqa: D102
        # Enumerate ŷ ∈ {0, 1} per entry: E[(σ − ŷ)²] = P(ŷ=1)(σ − 1)² + P(ŷ=0)σ²;
        # off-diagonal terms vanish because E[σ − ŷ] = 0 and the entries are independent.
        s = torch.sigmoid(output)
        second_moment = s * (s - 1) ** 2 + (1 - s) * s**2
        return second_moment * u

    def sample_targets(self, output, noise):  # noqa: D102
        return (noise.to(output.dtype) < torch.sigmoid(output.detach())).to(output.dtype)


class CrossEntropyRule(LossRule):
    """``nn.CrossEntropyLoss`` on logits; classes on dim 1; class-index or probability targets.

    Targets equal to ``ignore_index`` (default −100, e.g. padding in sequences) have
    no loss term, as in torch: they add nothing to the loss, its gradient or any
    curvature, and ``"mean"`` divides by the number of the other targets.

    ``label_smoothing`` ε trains on the target distribution t = (1 − ε) e_y + ε/C.
    Its entries sum to 1, so the loss' Hessian in the logits is still
    Λ = diag(p) − ppᵀ (GGN, KFAC type-2 unchanged); the gradient is p − t (empirical
    Fisher, empirical KFAC, the Hessian's second term).

    Probability (float) targets ``(N, C, …)``, non-negative, work as in torch:
    ℓ = −Σ_c t_c log p_c with t' = (1 − ε) t + ε/C under smoothing, one loss term
    per position (``"mean"`` divides by N·d₁·…), no ``ignore_index``. Then
    ∇_f ℓ = s p − t and ∇²_f ℓ = s (diag(p) − ppᵀ) with s = Σ_c t_c
    (``hessian_scale``; 1 for soft labels that are distributions).

    The Fisher, exact and Monte-Carlo, is the model's own in every case: labels
    ŷ ~ p with the score p − e_ŷ of the likelihood, whatever the training targets
    (docs/conventions.md); it equals the GGN where s = 1.
    """

    loss_class = nn.CrossEntropyLoss
    name = "CrossEntropyLoss"

    def __init__(self, loss_fn: nn.Module):
        super().__init__(loss_fn)
        self.ignore_index = loss_fn.ignore_index
        self.label_smoothing = float(loss_fn.label_smoothing)

    def check_target_type(self, target, where):  # noqa: D102
        if target.is_floating_point():
            if target.dim() < 2:
                raise DataError(
                    f"CrossEntropyLoss: {where} has float targets of shape {tuple(target.shape)}; float "
                    "targets are class probabilities shaped like the logits (N, C, ...). For class "
                    "labels use an integer tensor: y.long()"
                )
        elif target.dtype not in (torch.int64, torch.uint8):
            raise DataError(
                f"CrossEntropyLoss: {where} has class labels of dtype {target.dtype}; torch takes "
                "int64 (long) or uint8 class indices: use y.long()"
            )

    def prepare_target(self, target, dtype):  # noqa: D102
        if target.is_floating_point():
            return target.to(dtype)
        return target.long()  # uint8 labels, as torch's loss accepts them

    def validate(self, output, target):  # noqa: D102
        if target.is_floating_point():
            if output.dim() < 2 or target.shape != output.shape:
                raise DataError(
                    f"CrossEntropyLoss: probability targets must have the output's shape (N, C, ...) "
                    f"{tuple(output.shape)}, got {tuple(target.shape)}"
                )
            if bool((target < 0).any()):
                raise DataError("CrossEntropyLoss: probability targets must be non-negative")
            return
        expected = (output.shape[0], *output.shape[2:])
        if output.dim() < 2 or tuple(target.shape) != expected:
            raise DataError(
                f"CrossEntropyLoss: model output has shape {tuple(output.shape)} (N, C, ...) "
                f"so the target must have shape {expected}, got {tuple(target.shape)}"
            )
        num_classes = output.shape[1]
        valid = ((target >= 0) & (target < num_classes)) | ~self._kept(target)
        if not bool(valid.all()):
            bad = target[~valid].unique()[:5].tolist()
            raise DataError(
                f"CrossEntropyLoss: targets must be class indices in [0, {num_classes}) or "
                f"ignore_index={self.ignore_index}; got {bad}"
            )

    def _kept(self, target: Tensor) -> Tensor:
        """Targets with a loss term: bool, shaped like ``target`` (class indices)."""
        return target != self.ignore_index

    def count(self, target):  # noqa: D102
        if target.is_floating_point():  # one term per position
            return target.numel() // target.shape[1]
        return int(self._kept(target).sum())

    def mask(self, target):  # noqa: D102
        if target.is_floating_point():
            return None
        kept = self._kept(target)
        return None if bool(kept.all()) else kept.unsqueeze(1)  # (N, 1, ...): over the classes

    def example_mask(self, target):  # noqa: D102
        if target.is_floating_point():
            return None
        kept = self._kept(target).reshape(target.shape[0], -1).any(1)
        return None if bool(kept.all()) else kept

    def _target_distribution(self, target: Tensor) -> Tensor:
        """Probability targets with label smoothing applied: t' = (1 − ε) t + ε/C."""
        eps = self.label_smoothing
        return target if not eps else target * (1 - eps) + eps / target.shape[1]

    def hessian_scale(self, target):  # noqa: D102
        if not target.is_floating_point():
            return None  # class indices: the (smoothed) target distribution sums to 1
        return self._target_distribution(target).sum(1, keepdim=True)

    def sum_loss(self, output, target):  # noqa: D102
        return F.cross_entropy(
            output,
            target,
            reduction="sum",
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    @staticmethod
    def _onehot(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
        onehot = F.one_hot(target, num_classes).to(dtype)  # (N, ..., C)
        return onehot.movedim(-1, 1)

    def output_gradient(self, output, target):  # noqa: D102
        if target.is_floating_point():  # s p − t for the distribution t (s = Σ_c t_c)
            t = self._target_distribution(target)
            return output.softmax(1) * t.sum(1, keepdim=True) - t
        mask = self.mask(target)
        classes = target if mask is None else torch.where(mask.squeeze(1), target, 0)  # ignored: masked below
        gradient = self.sampled_gradient(output, classes)  # p − e_y
        if self.label_smoothing:  # p − t, t = (1 − ε) e_y + ε/C
            eps, num_classes = self.label_smoothing, output.shape[1]
            gradient = (output.softmax(1) * eps - eps / num_classes).add_(gradient, alpha=1 - eps)
        return gradient if mask is None else gradient * mask

    def sampled_gradient(self, output, sampled):  # noqa: D102
        return output.softmax(1) - self._onehot(sampled, output.shape[1], output.dtype)

    def _lambda_vp(self, output, u):
        # Λ = diag(p) − p pᵀ along the class dimension.
        p = output.softmax(1)
        return p * u - p * (p * u).sum(1, keepdim=True)

    def _lambda_sqrt_columns(self, output):
        # Λ = diag(p) − ppᵀ = Σ_j s_j s_jᵀ with s_j = √p_j (e_j − p), per location t;
        # column (j, t) is non-zero only at location t.
        N, C = output.shape[:2]
        p = output.softmax(1).reshape(N, C, -1)  # (N, C, T)
        T = p.shape[2]
        eye_c = torch.eye(C, dtype=p.dtype, device=p.device)
        eye_t = torch.eye(T, dtype=p.dtype, device=p.device)
        # s[j, t, n, i, t'] = √p[n, j, t] (δ_ij − p[n, i, t']) δ_tt'
        root = p.sqrt().permute(1, 2, 0).reshape(C, T, N, 1, 1)
        columns = root * (eye_c.view(C, 1, 1, C, 1) - p.view(1, 1, N, C, T)) * eye_t.view(1, T, 1, 1, T)
        return columns.reshape(C * T, N, *output.shape[1:])

    def fisher_vp(self, output, u):  # noqa: D102
        # Enumerate the classes: E[r̂ r̂ᵀ]u = Σ_k p_k (p − e_k)((p − e_k)·u).
        p = output.softmax(1)
        num_classes = output.shape[1]
        eye = torch.eye(num_classes, dtype=output.dtype, device=output.device)
        shape = [1, num_classes, num_classes] + [1] * (output.dim() - 2)
        residuals = p.unsqueeze(2) - eye.view(shape)  # (N, C[entry], C[class k], ...)
        weights = (residuals * u.unsqueeze(2)).sum(1, keepdim=True) * p.unsqueeze(1)
        return (residuals * weights).sum(2)

    def noise_shape(self, target, num_samples):  # noqa: D102
        if target.is_floating_point():  # one class index per position
            return (num_samples, target.shape[0], *target.shape[2:])
        return (num_samples, *target.shape)

    def sample_targets(self, output, noise):  # noqa: D102
        # Inverse-CDF sampling along the class dimension from uniform noise.
        cdf = output.detach().softmax(1).movedim(1, -1).cumsum(-1)
        cdf = cdf.expand(noise.shape[0], *cdf.shape).contiguous()
        uniform = noise.to(cdf.dtype).unsqueeze(-1).contiguous()
        samples = torch.searchsorted(cdf, uniform).squeeze(-1)
        return samples.clamp_(max=output.shape[1] - 1)


_RULES: dict[type, type[LossRule]] = {
    nn.MSELoss: MSERule,
    nn.CrossEntropyLoss: CrossEntropyRule,
    nn.BCEWithLogitsLoss: BCEWithLogitsRule,
}


def _check_options(loss_fn: nn.Module) -> None:
    """Reject loss options whose curvature curvlab does not implement."""
    name = type(loss_fn).__name__
    unsupported = []
    if getattr(loss_fn, "weight", None) is not None:
        unsupported.append("weight")
    if unsupported:
        raise UnsupportedError(f"{name}: the options {unsupported} are not supported")


def rule_for(loss_fn: nn.Module) -> LossRule:
    """Return the rule of a supported loss object.

    Raises:
        UnsupportedError: for another loss class, ``reduction="none"`` or an
            unsupported option (``weight``).
    """
    rule_class = _RULES.get(type(loss_fn))
    if rule_class is None:
        supported = ", ".join(cls.__name__ for cls in _RULES)
        raise UnsupportedError(
            f"loss {type(loss_fn).__name__} is not supported; supported losses: {supported}"
        )
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in SUPPORTED_REDUCTIONS:
        raise UnsupportedError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported; "
            f"use reduction 'mean' or 'sum' (curvature of a summed or averaged risk)"
        )
    _check_options(loss_fn)
    return rule_class(loss_fn)
