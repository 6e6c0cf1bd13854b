"""The one interface every curvature object shares.

A subclass implements a single batched product on parameter-shaped tensors,
``_matmat(Vs)`` with ``Vs[i]`` of shape ``(k, *param_shapes[i])``; this base turns
it into ``C @ v`` for flat vectors ``(n,)``, flat matrices ``(n, k)`` and lists of
parameter-shaped tensors, and derives ``to_dense``, ``to_scipy``, ``blocks`` and
``solve`` from it.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Sequence

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from curvlab.errors import DataError, UnsupportedError
from curvlab.memory import block_budget, check_fits
from curvlab.operators.cg import conjugate_gradient
from curvlab.options import check_finite, check_nonnegative, check_positive


def in_fixed_state(function):
    """Run ``function(C, ...)`` inside ``C.fixed_state()`` (an algorithm of many products of C)."""

    @functools.wraps(function)
    def wrapper(C, *args, **kwargs):
        scope = C.fixed_state() if isinstance(C, CurvatureOperator) else contextlib.nullcontext()
        with scope:
            return function(C, *args, **kwargs)

    return wrapper


class CurvatureOperator:
    """A symmetric n × n curvature matrix over a list of parameter tensors.

    Flattening convention: the parameters in the order given, each tensor
    row-major, so a flat vector is ``torch.cat([t.flatten() for t in tensors])``.

    Attributes:
        param_shapes: Shapes of the parameter tensors, in order.
        param_names: Their names (from ``model.named_parameters()``) when known.
        max_columns: Largest number of columns pushed through one batched
            product; wider matrices are processed in chunks of at most this
            size (fewer when the columns are long: ``columns_per_chunk``).
    """

    max_columns = 64
    _fixed_depth = 0  # > 0 inside ``fixed_state()``

    def __init__(
        self,
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        param_names: Sequence[str] | None = None,
    ):
        self.param_shapes = [torch.Size(s) for s in param_shapes]
        self.param_names = list(param_names) if param_names is not None else None
        self._dtype = dtype
        self._device = torch.device(device)
        self._sizes = [s.numel() for s in self.param_shapes]

    # ------------------------------------------------------------ the one product
    def _matmat(self, Vs: list[Tensor]) -> list[Tensor]:
        """C applied to k vectors in list format: ``Vs[i]`` is ``(k, *param_shapes[i])``."""
        raise NotImplementedError

    # ------------------------------------------------------------ state kept between products
    @contextlib.contextmanager
    def fixed_state(self):
        """A scope whose products all see one model: the caller changes no parameter, buffer or data.

        Operators that keep state between products (the Hessian's graph, a plain MLP's
        primal pass) check it against the model's current values on every public call
        (``C @ v``, ``to_dense``, ``solve``, ``quadratic_forms``); inside this scope they
        check once, on entry, and not before each of an algorithm's many products
        (Lanczos, SLQ, traces). Scopes nest. Operators without such state ignore it.
        """
        self._drop_stale_state()
        with contextlib.ExitStack() as inner:
            for operator in self._operands():
                inner.enter_context(operator.fixed_state())
            self._fixed_depth += 1
            try:
                yield self
            finally:
                self._fixed_depth -= 1

    def _drop_stale_state(self) -> None:
        """Forget state kept between products if the model or data changed since (override)."""

    def _operands(self) -> list[CurvatureOperator]:
        """Operators whose products this one uses (a block's parent, the blocks of a sum)."""
        return []

    @property
    def process_group(self):
        """The ``curvlab.distributed.Group`` whose ranks share this operator's products, or ``None``.

        Products are summed over its ranks; the iterative algorithms take their
        decisions on rank 0 (``agree``) so that no rank takes another branch.
        """
        for operand in self._operands():
            if operand.process_group is not None:
                return operand.process_group
        return None

    def agree(self, flag: bool) -> bool:
        """``flag`` as rank 0 of the process group decides it (``flag`` itself without a group)."""
        group = self.process_group
        return flag if group is None else group.agree(flag)

    def _agreed_mask(self, mask: Tensor) -> Tensor:
        """A boolean decision tensor as rank 0 has it (itself without a process group)."""
        if self.process_group is None:
            return mask
        decided = mask.to(torch.float64)
        return self.process_group.broadcast_(decided).to(torch.bool)

    def from_rank_zero(self, *tensors: Tensor) -> None:
        """Overwrite ``tensors`` in place with rank 0's (nothing without a process group).

        Algorithms end with it, so every rank returns the very numbers of rank 0.
        """
        group = self.process_group
        if group is not None:
            for t in tensors:
                group.broadcast_(t)

    # ------------------------------------------------------------ basic facts
    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        n = sum(self._sizes)
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of products and dense matrices."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device the products run on."""
        return self._device

    def description(self) -> dict:
        """Kind, size, construction options, dtype and device (a result's provenance)."""
        return {
            "kind": type(self).__name__,
            "num_params": self.shape[0],
            **self._described(),
            "dtype": str(self.dtype),
            "device": str(self.device),
        }

    def _described(self) -> dict:
        """The construction options worth recording (override)."""
        return {}

    def __repr__(self) -> str:
        """Class name, size, dtype and device."""
        n = self.shape[0]
        return f"{type(self).__name__}(n={n}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------ formats
    def _check_tensor(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise DataError(f"{what} is on {t.device} but the operator is on {self.device}")
        if t.dtype != self.dtype:
            raise DataError(f"{what} has dtype {t.dtype} but the operator has dtype {self.dtype}")
        if t.requires_grad:
            raise DataError(
                f"{what} requires grad: curvature products are not differentiable in curvlab "
                "(they run autograd themselves); pass it detached: v.detach()"
            )

    def flat_to_list(self, V: Tensor) -> list[Tensor]:
        """``(n, k)`` → list of ``(k, *shape)`` tensors."""
        k = V.shape[1]
        parts = V.T.split(self._sizes, dim=1)
        return [part.reshape(k, *shape) for part, shape in zip(parts, self.param_shapes)]

    def list_to_flat(self, Vs: Sequence[Tensor]) -> Tensor:
        """List of ``(k, *shape)`` tensors → ``(n, k)``."""
        k = Vs[0].shape[0]
        return torch.cat([v.reshape(k, -1) for v in Vs], dim=1).T

    def columns_per_chunk(self) -> int:
        """Columns per batched product: ``max_columns``, fewer where a chunk would exceed ``block_budget``."""
        column_bytes = self.shape[0] * torch.empty((), dtype=self.dtype).element_size()
        return max(1, min(self.max_columns, block_budget(self.device) // column_bytes))

    def _matmat_flat(self, V: Tensor) -> Tensor:
        """``(n, k)`` → ``(n, k)``, chunked into at most ``max_columns`` columns.

        The result is stored probe-major (column-major, a transposed ``(k, n)``):
        the layout the list format converts to without a transposing copy.
        """
        with self.fixed_state():
            chunks = [
                self.list_to_flat(self._matmat(self.flat_to_list(chunk)))
                for chunk in V.split(self.columns_per_chunk(), dim=1)
            ]
        if len(chunks) == 1:
            return chunks[0]
        return torch.cat([chunk.T for chunk in chunks]).T

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """vᵢᵀ C vᵢ for the columns of a flat ``V`` ``(n, k)``: shape ``(k,)``.

        By products in chunks of ``columns_per_chunk`` columns (the memory bound
        of ``C @ V``), summed block by block (no flat ``(n, k)`` product is
        assembled); operators with a cheaper route override it (the Hessian and
        GGN where a fast path covers the model: ``curvlab.passes.fast``).
        """
        self._check_tensor(V, "V")
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise DataError(f"quadratic_forms needs V of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        with self.fixed_state():
            return self._quadratic_forms(V)

    def _quadratic_forms(self, V: Tensor) -> Tensor:
        """``quadratic_forms`` for a checked ``V``: by chunked products (override for a cheaper route)."""
        forms = []
        for chunk in V.split(self.columns_per_chunk(), dim=1):
            k = chunk.shape[1]
            pieces = self.flat_to_list(chunk)
            total = torch.zeros(k, dtype=V.dtype, device=V.device)
            for piece, product in zip(pieces, self._matmat(pieces)):
                total += torch.linalg.vecdot(piece.reshape(k, -1), product.reshape(k, -1))
            forms.append(total)
        return torch.cat(forms)

    def _matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """C v for a flat ``(n,)`` v, written into the flat ``(n,)`` ``out``.

        For iterative solvers that keep products in a preallocated basis (Lanczos):
        no new n-vector per product, and no copy into the basis.
        """
        products = self._matmat(self.flat_to_list(v.unsqueeze(1)))
        return torch.cat([p.reshape(-1) for p in products], out=out)

    def _check_vectors(self, v, what: str) -> None:
        """``DataError`` unless ``v`` is flat ``(n,)`` or ``(n, k)`` or a list of parameter-shaped tensors."""
        if isinstance(v, (list, tuple)):
            if len(v) != len(self.param_shapes):
                raise DataError(f"{what}: expected {len(self.param_shapes)} tensors, got {len(v)}")
            for i, (t, shape) in enumerate(zip(v, self.param_shapes)):
                self._check_tensor(t, f"{what}[{i}]")
                if t.shape != shape:
                    raise DataError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
            return
        self._check_tensor(v, what)
        if v.dim() not in (1, 2) or v.shape[0] != self.shape[0]:
            raise DataError(
                f"cannot multiply an operator of shape {self.shape} with a {what} of shape {tuple(v.shape)}: "
                f"it must be ({self.shape[0]},), ({self.shape[0]}, k) or a list of parameter-shaped tensors"
            )

    def __matmul__(self, v):
        """C v for a flat ``(n,)``, a flat ``(n, k)`` or a list of parameter-shaped tensors."""
        self._check_vectors(v, "vector")
        if isinstance(v, (list, tuple)):
            with self.fixed_state():
                result = self._matmat([t.unsqueeze(0) for t in v])
            return [r.squeeze(0) for r in result]
        if v.dim() == 1:
            return self._matmat_flat(v.unsqueeze(1)).squeeze(1)
        return self._matmat_flat(v)

    # ------------------------------------------------------------ derived views
    def to_dense(self, max_bytes: int | None = None) -> Tensor:
        """The dense ``(n, n)`` matrix, built from products with identity columns.

        Raises:
            DenseTooLargeError: if n² entries would not fit in the free memory of
                the device (or in ``max_bytes``); the message states the bytes.
        """
        n = self.shape[0]
        check_fits(f"dense {type(self).__name__}", (n, n), self.dtype, self.device, max_bytes)
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return self._matmat_flat(eye)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator``: numpy in, numpy out."""
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            squeeze = V.dim() == 1
            result = self._matmat_flat(V.reshape(V.shape[0], -1))
            result = result.squeeze(1) if squeeze else result
            return result.detach().cpu().numpy()

        return scipy.sparse.linalg.LinearOperator(
            self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat, rmatmat=matmat, dtype=np_dtype
        )

    def block_offsets(self) -> list[int]:
        """Start of each parameter tensor in the flat vector (length = tensors + 1)."""
        offsets = [0]
        for size in self._sizes:
            offsets.append(offsets[-1] + size)
        return offsets

    def blocks(self, by: str = "parameter") -> list[CurvatureOperator]:
        """Diagonal blocks, each again a curvature object.

        Args:
            by: ``"parameter"`` (one block per tensor) or ``"layer"`` (tensors of the
                same module together, e.g. a layer's weight and bias).
        """
        if by == "parameter":
            groups = [[i] for i in range(len(self.param_shapes))]
        elif by == "layer":
            groups = self._layer_groups()
        else:
            raise ValueError(f"by must be 'parameter' or 'layer', got {by!r}")
        return [self._block(indices) for indices in groups]

    def _layer_groups(self) -> list[list[int]]:
        if self.param_names is None:
            return [[i] for i in range(len(self.param_shapes))]
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.param_names):
            groups.setdefault(name.rpartition(".")[0], []).append(index)
        return list(groups.values())

    def _block(self, indices: list[int]) -> CurvatureOperator:
        """The diagonal block of the tensors ``indices`` as an operator.

        Generic: products of the whole operator with zero-padded vectors;
        subclasses with cheaper blocks override it.
        """
        return RestrictedOperator(self, indices)

    # ------------------------------------------------------------ matrix functions
    structured_eigvalsh = False  # eigvalsh comes from the structure, not a dense eigendecomposition

    def diag(self) -> Tensor:
        """The exact diagonal, flat ``(n,)``: here by products with unit vectors, in chunks.

        Structured objects read it off their structure; the exact GGN, Fisher and
        empirical Fisher take one statistics pass where the layers allow it.
        """
        return self._diag_route()[0]

    def _diag_route(self) -> tuple[Tensor, str]:
        """``(diagonal, how)``: ``"products"`` here; ``"structure"``, ``"layerwise"`` in subclasses."""
        return self._diagonal_by_products(), "products"

    def _diagonal_by_products(self) -> Tensor:
        n = self.shape[0]
        pieces = []
        with self.fixed_state():
            for start in range(0, n, self.columns_per_chunk()):
                stop = min(n, start + self.columns_per_chunk())
                rows = torch.arange(start, stop, device=self.device)
                columns = torch.arange(stop - start, device=self.device)
                units = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
                units[rows, columns] = 1
                pieces.append(self._matmat_flat(units)[rows, columns])
        return torch.cat(pieces)

    def trace(self) -> Tensor:
        """tr(C), exactly: the sum of ``diag()`` (structured objects: from their structure)."""
        return self.diag().sum()

    def frobenius_norm(self) -> Tensor:
        """‖C‖_F, exactly: from products with unit vectors in chunks (structured: from the structure)."""
        n = self.shape[0]
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with self.fixed_state():
            for start in range(0, n, self.columns_per_chunk()):
                stop = min(n, start + self.columns_per_chunk())
                units = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
                units[torch.arange(start, stop), torch.arange(stop - start)] = 1
                total += self._matmat_flat(units).pow(2).sum()
        return total.sqrt()

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """All eigenvalues, ascending: structured objects from their structure.

        Here of the dense matrix (``to_dense`` refuses one that would not fit, with
        the bytes it needs).
        """
        return torch.linalg.eigvalsh(self.to_dense(max_bytes=max_bytes))

    def logdet(self, damping: float = 0.0) -> Tensor:
        """The log-determinant log det(C + damping·I) from ``eigvalsh``; ``ValueError`` if not PD."""
        damping = check_nonnegative("damping", damping)
        shifted = self.eigvalsh() + damping
        if bool((shifted <= 0).any()):
            raise ValueError(
                f"log det(C + {damping:g}·I) is undefined: its smallest eigenvalue is "
                f"{shifted.min().item():.3e} ≤ 0 (raise the damping)"
            )
        return torch.log(shifted).sum()

    # ------------------------------------------------------------ sums and multiples
    def _check_compatible(self, other: CurvatureOperator) -> None:
        if self.param_shapes != other.param_shapes:
            raise DataError(f"cannot add operators over different parameters: {self.shape} and {other.shape}")
        if self.dtype != other.dtype or self.device != other.device:
            raise DataError(
                f"cannot add a {self.dtype} operator on {self.device} "
                f"and a {other.dtype} one on {other.device}"
            )

    def _added(self, other: CurvatureOperator) -> CurvatureOperator | None:
        """``self + other`` keeping a structure both share, or ``None`` (a general sum)."""
        return None

    def _scaled(self, scale: float) -> CurvatureOperator:
        """``scale · self``; structured objects scale their structure."""
        from curvlab.operators.combined import ScaledOperator

        return ScaledOperator(scale, self)

    def __add__(self, other):
        """C + D: structured where both share a structure (dense, diagonal, same blocks), else a sum."""
        if not isinstance(other, CurvatureOperator):
            if isinstance(other, numbers.Number) and other == 0:
                return self  # sum([...]) starts from 0
            return NotImplemented
        self._check_compatible(other)
        combined = self._added(other)
        if combined is not None:
            return combined
        from curvlab.operators.combined import SumOperator

        return SumOperator([self, other])

    __radd__ = __add__

    def __mul__(self, scale):
        """C · C for a finite real c."""
        if isinstance(scale, CurvatureOperator) or not isinstance(scale, numbers.Real):
            return NotImplemented
        return self._scaled(check_finite("scale", scale))

    __rmul__ = __mul__

    def __truediv__(self, scale):
        """C / c."""
        if not isinstance(scale, numbers.Real):
            return NotImplemented
        if check_finite("divisor", scale) == 0:
            raise ValueError("cannot divide an operator by 0")
        return self._scaled(1.0 / float(scale))

    def __neg__(self):
        return self._scaled(-1.0)

    def __sub__(self, other):
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return self + (-1.0) * other

    # ------------------------------------------------------------ solves
    @property
    def has_inverse(self) -> bool:
        """Whether ``inverse`` is exact and cheap (structured objects); else ``solve`` runs CG."""
        return type(self).inverse is not CurvatureOperator.inverse

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> CurvatureOperator:
        """(C + damping·I)⁻¹ as a new operator, where the structure gives it exactly.

        Args:
            damping: λ ≥ 0 added to the diagonal.
            pi_damping: For Kronecker-factored blocks, Martens & Grosse's factored
                damping (G + π√λ I)⁻¹ ⊗ (A + √λ/π I)⁻¹ instead of the exact
                (G ⊗ A + λI)⁻¹; every other block is damped exactly.

        Raises:
            UnsupportedError: for matrix-free operators (the exact Hessian, GGN,
                Fisher): use ``solve`` (CG) or ``cl.BlockDiagonal`` blocks.
        """
        raise UnsupportedError(
            f"{type(self).__name__} is matrix-free and has no explicit inverse: use solve(v, damping) "
            "(conjugate gradient), or the inverse of a structured approximation (cl.KFAC, "
            "cl.BlockDiagonal, cl.Diagonal)"
        )

    def solve(
        self, v, damping: float = 0.0, tol: float = 1e-6, maxiter: int | None = None, pi_damping: bool = False
    ):
        """(C + damping·I)⁻¹ v; v in any format.

        Structured objects (``has_inverse``) solve exactly through ``inverse``;
        matrix-free ones by conjugate gradient (Hessian-free).

        Args:
            v: Flat ``(n,)`` or ``(n, k)`` or a list of parameter-shaped tensors.
            damping: λ ≥ 0 added to the diagonal.
            tol: CG only: relative residual ‖b − (C + λI)x‖ / ‖b‖ at which a column stops.
            maxiter: CG only: iteration cap (default 10 n); a warning if it is reached first.
            pi_damping: Structured only: factored damping of Kronecker blocks (``inverse``).

        Raises:
            NotPositiveDefiniteError: if C + λI is not positive definite along the
                CG directions (an indefinite Hessian with too little damping).
        """
        self._check_vectors(v, "right-hand side")
        damping = check_nonnegative("damping", damping)
        if self.has_inverse:
            return self.inverse(damping, pi_damping=pi_damping) @ v
        tol = check_positive("tol", tol)
        as_list = isinstance(v, (list, tuple))
        if as_list:
            B = self.list_to_flat([t.unsqueeze(0) for t in v])
        else:
            B = v.unsqueeze(1) if v.dim() == 1 else v

        def damped(X: Tensor) -> Tensor:
            return self._matmat_flat(X) + damping * X

        with self.fixed_state():
            X, _residual, _iterations = conjugate_gradient(
                damped, B, tol=tol, maxiter=maxiter, agree=self._agreed_mask
            )
        if as_list:
            return [x.squeeze(0) for x in self.flat_to_list(X)]
        return X.squeeze(1) if v.dim() == 1 else X


class RestrictedOperator(CurvatureOperator):
    """Pᵀ C P: the diagonal block of ``parent`` over the tensors ``indices``."""

    def __init__(self, parent: CurvatureOperator, indices: list[int]):
        names = [parent.param_names[i] for i in indices] if parent.param_names else None
        super().__init__([parent.param_shapes[i] for i in indices], parent.dtype, parent.device, names)
        self.parent = parent
        self.indices = list(indices)

    def _operands(self):
        return [self.parent]

    def _matmat(self, Vs):
        k = Vs[0].shape[0]
        padded = [torch.zeros(k, *s, dtype=self.dtype, device=self.device) for s in self.parent.param_shapes]
        for i, V in zip(self.indices, Vs):
            padded[i] = V
        result = self.parent._matmat(padded)
        return [result[i] for i in self.indices]
