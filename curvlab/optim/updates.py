r"""Update rules: how a preconditioned direction d becomes the change of the parameters.

* ``MomentumUpdate``: m ← μ m + d, θ ← θ − lr · m, with each parameter group's ``lr`` and
  momentum μ (the buffers live in the optimizer's state, as in ``torch.optim.SGD``).
* ``QuadraticModelUpdate``: Martens & Grosse's (2015, §7) rescaling, δ = lr · (αΔ + μδ₀)
  with (α, μ) minimising the exact damped quadratic model on the minibatch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.operators.exact import exact_class

RESCALE_CURVATURES = ("ggn", "fisher", "hessian")  # exact matrices whose quadratic model rescales a step


def flat(tensors: list[Tensor]) -> Tensor:
    """The tensors flattened and concatenated."""
    return torch.cat([t.reshape(-1) for t in tensors])


def scratch(store: dict[int, Tensor], p: Tensor, dtype: torch.dtype) -> Tensor:
    """A work tensor shaped like ``p``, kept in ``store`` and reused from step to step."""
    tensor = store.get(id(p))
    if tensor is None or tensor.shape != p.shape or tensor.dtype != dtype or tensor.device != p.device:
        tensor = store[id(p)] = torch.empty_like(p, dtype=dtype)
    return tensor


class MomentumUpdate:
    """−lr · m per parameter with m ← momentum · m + d (each group's ``lr`` and ``momentum``)."""

    needs_problem = False

    def __init__(self):
        self._scratch: dict[int, Tensor] = {}  # per-parameter work tensors (not state: not saved)

    def __call__(self, param_groups: list[dict], state: dict, direction: list[Tensor]) -> list[Tensor]:
        """The updates, one per parameter; the momentum buffers are kept in ``state``."""
        updates = []
        for group in param_groups:
            for p in group["params"]:
                d = direction[len(updates)].reshape_as(p)
                entry = state[p]
                if group["momentum"] > 0:
                    buffer = entry.get("momentum_buffer")
                    buffer = d.clone() if buffer is None else buffer.mul_(group["momentum"]).add_(d)
                    entry["momentum_buffer"] = buffer
                    d = buffer
                # Written into a kept scratch tensor: a fresh one per step would fault in new pages.
                updates.append(torch.mul(d, -group["lr"], out=scratch(self._scratch, p, d.dtype)))
        return updates

    def state_dict(self) -> dict:
        """Nothing beyond the optimizer's per-parameter state (the momentum buffers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class QuadraticModelUpdate:
    r"""δ = lr · (αΔ + μδ₀) minimising the exact damped quadratic model (Martens & Grosse §7).

    With V = [Δ, δ₀] (n × k, k ≤ 2; Δ = −d the preconditioned step, δ₀ the previous
    update) the model M(Vx) = bᵀx + ½ xᵀ(VᵀEV + λVᵀV)x (E the exact matrix plus weight
    decay η, b = Vᵀg) is minimised by x = −(VᵀEV + λVᵀV)⁻¹ b: two exact products per
    step. If the 2×2 system is singular or not positive definite (δ₀ parallel to Δ, an
    indefinite Hessian) only α is chosen; if even ΔᵀEΔ + λ‖Δ‖² ≤ 0, the step is Δ itself.

    Args:
        curvature: ``"ggn"``, ``"fisher"`` or ``"hessian"``: the exact matrix E.
        examples: Take E's products on the first m examples of the batch (default all);
            for a mean loss an unbiased estimate, the gradient staying the batch's.
    """

    needs_problem = True

    def __init__(self, curvature: str = "ggn", examples: int | None = None):
        if curvature not in RESCALE_CURVATURES:
            raise ValueError(
                f"rescale must be None or one of {sorted(RESCALE_CURVATURES)}, got {curvature!r}"
            )
        self.curvature = curvature
        self.examples = examples
        self.last_rescale: tuple = ()  # (α, μ) of the last step, for inspection

    def __call__(self, param_groups, state, direction, gradient, problem, decays, damping):
        """``(updates, predicted)``: the updates and the undamped model decrease gᵀδ + ½δᵀ(E + η)δ."""
        params = [p for group in param_groups for p in group["params"]]
        lrs = [group["lr"] for group in param_groups for _ in group["params"]]
        columns = [flat([-d.reshape_as(p) for d, p in zip(direction, params)])]
        previous = [state[p].get("last_update") for p in params]
        if all(u is not None for u in previous):
            columns.append(flat(previous))
        V = torch.stack(columns, dim=1)
        exact = exact_class(self.curvature)(problem)
        EV = exact @ V
        if any(decays):
            EV = EV + V * flat([torch.full_like(p, d) for p, d in zip(params, decays)])[:, None]
        quadratic = (V.T @ EV).double()  # the undamped model's curvature
        damped = quadratic + damping * (V.T @ V).double()
        b = (V.T @ flat(gradient)).double()
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
        self.last_rescale = tuple(x.tolist())
        predicted = float(b @ x + 0.5 * x @ quadratic @ x)
        step = exact.flat_to_list((V @ x.to(V.dtype))[:, None])
        return [s[0] * lr for s, lr in zip(step, lrs)], predicted

    @staticmethod
    def remember(params: list[Tensor], state: dict, updates: list[Tensor]) -> None:
        """Keep each update as δ₀ of the next step."""
        for p, u in zip(params, updates):
            state[p]["last_update"] = u

    def state_dict(self) -> dict:
        """The last (α, μ) (δ₀ itself is in the optimizer's per-parameter state)."""
        return {"last_rescale": list(self.last_rescale)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
        self.last_rescale = tuple(state.get("last_rescale", ()))
