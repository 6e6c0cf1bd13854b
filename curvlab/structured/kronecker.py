r"""Layer blocks with Kronecker structure: G ⊗ A, and Q_G diag(D) Q_Gᵀ ⊗ Q_A (eigenbasis form).

For a weight W of shape (d_out, d_in) flattened row-major, (G ⊗ A) vec(M) =
vec(G M A) (A symmetric), so a product never forms the Kronecker matrix. With the
bias folded in, M = [W b] of shape (d_out, d_in + 1) and A's last row/column
belongs to the constant input 1 (docs/theory.md, Approximations).
eig(G ⊗ A) = {λ_i(G) λ_j(A)}: the spectrum of a huge block from two small ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.memory import check_fits
from curvlab.operators.base import CurvatureOperator
from curvlab.options import check_nonnegative


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, retried in float64 when LAPACK fails to converge (ill-conditioned float32)."""
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(M.double())
        return values.to(M.dtype), vectors.to(M.dtype)


def _spd_inverse(M: Tensor, shift: float) -> Tensor:
    """(M + shift·I)⁻¹ for a PSD factor M: Cholesky, else eigenvalues clamped at 0.

    Cholesky fails when round-off leaves M slightly indefinite (float32, a shift
    below ε‖M‖); the factors are PSD by construction, so the fallback clamps
    their negative eigenvalues to 0. Raises ``ValueError`` when M + shift·I is
    still singular (shift 0 and M singular).
    """
    shifted = M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    values, vectors = symmetric_eigh(M)
    values = values.clamp_min(0) + shift
    if bool((values <= 0).any()):
        raise ValueError("the damped block is singular or indefinite: increase damping")
    return (vectors / values) @ vectors.T


def _scaled_identity_scalar(G: Tensor) -> float | None:
    """α when G = α I, else ``None``; reads G (no d × d temporary), stops early at G[0, 1] ≠ 0."""
    if G.shape[0] > 1 and bool(G[0, 1] != 0):
        return None
    diagonal = G.diagonal()
    scalar = diagonal[0]
    if not bool((diagonal == scalar).all()):
        return None
    off_diagonal_zero = int(torch.count_nonzero(G)) == int(torch.count_nonzero(diagonal))
    return scalar.item() if off_diagonal_zero else None


class LayerMatrixBlock(CurvatureOperator):
    """A block over one layer's weight [and folded bias], acting on M = [W b]."""

    def __init__(self, d_out: int, param_shapes, bias_folded: bool, dtype, device, param_names=None):
        super().__init__(param_shapes, dtype, device, param_names)
        self.d_out = d_out
        self.bias_folded = bias_folded

    def _to_matrix(self, Vs: list[Tensor]) -> Tensor:
        """List format → (k, d_out, d_A)."""
        k = Vs[0].shape[0]
        parts = [V.reshape(k, self.d_out, -1) for V in Vs]
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _from_matrix(self, M: Tensor) -> list[Tensor]:
        k = M.shape[0]
        if len(self.param_shapes) == 1:
            return [M.reshape(k, *self.param_shapes[0])]
        weight, bias = M[:, :, :-1], M[:, :, -1]
        return [weight.reshape(k, *self.param_shapes[0]), bias.reshape(k, *self.param_shapes[1])]

    def _apply_matrix(self, M: Tensor) -> Tensor:
        raise NotImplementedError

    def prefers_factors(self, n: int) -> bool:
        """Whether ``outer_sum_product`` with n rows costs fewer multiply-adds than ``_apply_matrix``."""
        return False

    def outer_sum_product(self, U: Tensor, X: Tensor) -> Tensor:
        """The block applied to M = Uᵀ X, from the factors: ``(d_out, d_A)``.

        U ``(n, d_out)``, X ``(n, d_A)``: a minibatch gradient Σ_n δ_n ã_nᵀ is of this
        form. With n below the layer's widths (``prefers_factors``) the factors go
        through the block's own factors first and M is never formed: cheaper than
        ``_apply_matrix(M)`` even when M is at hand.
        """
        raise NotImplementedError

    def _check_outer_factors(self, U: Tensor, X: Tensor, d_A: int) -> None:
        if U.dim() != 2 or X.dim() != 2 or U.shape[0] != X.shape[0]:
            raise ValueError(
                f"U and X must be (n, d) with equal n, got {tuple(U.shape)} and {tuple(X.shape)}"
            )
        if U.shape[1] != self.d_out or X.shape[1] != d_A:
            raise ValueError(
                f"expected U (n, {self.d_out}) and X (n, {d_A}), got {tuple(U.shape)} and {tuple(X.shape)}"
            )

    def _matmat(self, Vs):
        return self._from_matrix(self._apply_matrix(self._to_matrix(Vs)))

    def _map(self, v, fn):
        """Apply ``fn`` on the matrix form to v given in any vector format."""
        if isinstance(v, (list, tuple)):
            result = self._from_matrix(fn(self._to_matrix([t.unsqueeze(0) for t in v])))
            return [r.squeeze(0) for r in result]
        flat = v.unsqueeze(1) if v.dim() == 1 else v
        out = self.list_to_flat(self._from_matrix(fn(self._to_matrix(self.flat_to_list(flat)))))
        return out.squeeze(1) if v.dim() == 1 else out

    structured_eigvalsh = True

    def _diag_route(self):
        return self._from_flat_matrix(self._diagonal_matrix()), "structure"

    def _diagonal_matrix(self) -> Tensor:
        """The diagonal as a ``(d_out, d_A)`` matrix M (entry i, j belongs to M[i, j] of [W b])."""
        raise NotImplementedError

    def _from_flat_matrix(self, M: Tensor) -> Tensor:
        """A ``(d_out, d_A)`` matrix in [W b] layout as a flat ``(n,)`` vector in parameter order."""
        return torch.cat([t.reshape(-1) for t in self._from_matrix(M.unsqueeze(0))])

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """All eigenvalues, ascending."""
        raise NotImplementedError


class KroneckerBlock(LayerMatrixBlock):
    """G ⊗ A for one layer; the parameters are the weight and optionally the bias.

    Args:
        G: Output-side factor, (d_out, d_out).
        A: Input-side factor, (d_in [+ 1], d_in [+ 1]); with ``bias_folded`` the last
            index is the bias' constant input.
        param_shapes: Shapes of the block's tensors: ``[weight]``, ``[weight, bias]``,
            or ``[bias]`` alone (then A is 1 × 1).
        bias_folded: Whether the block's last tensor is a bias folded into A.
        param_names: Names of the tensors.
    """

    def __init__(self, G: Tensor, A: Tensor, param_shapes, bias_folded: bool, param_names=None):
        super().__init__(G.shape[0], param_shapes, bias_folded, G.dtype, G.device, param_names)
        self.G = G
        self.A = A
        self._eigen = None
        # ACP's output side is α I: products then skip a d_out × d_out GEMM.
        self._G_scalar = _scaled_identity_scalar(G)

    def _apply_matrix(self, M):
        if self._G_scalar is not None:
            product = M @ self.A
            return product if self._G_scalar == 1.0 else product * self._G_scalar
        return self.G @ M @ self.A

    def prefers_factors(self, n):  # noqa: D102
        # G (UᵀX) A = (UG)ᵀ(XA), G and A symmetric: n(d_out² + d_A² + d_out·d_A)
        # multiply-adds against d_out·d_A·(d_out + d_A) for G M A (d_out·d_A² when G = αI).
        d_out, d_A = self.G.shape[0], self.A.shape[0]
        if self._G_scalar is not None:
            return n * d_A * (d_A + d_out) < d_out * d_A * d_A
        return n * (d_out * d_out + d_A * d_A + d_out * d_A) < d_out * d_A * (d_out + d_A)

    def outer_sum_product(self, U, X):  # noqa: D102
        self._check_outer_factors(U, X, self.A.shape[0])
        if self._G_scalar is not None:
            product = U.T @ (X @ self.A)
            return product if self._G_scalar == 1.0 else product * self._G_scalar
        return (U @ self.G).T @ (X @ self.A)

    def _block(self, indices):
        if len(indices) == len(self.param_shapes):
            return self
        (index,) = indices
        names = [self.param_names[index]] if self.param_names else None
        A = self.A[:-1, :-1] if index == 0 else self.A[-1:, -1:]
        return KroneckerBlock(self.G, A, [self.param_shapes[index]], False, names)

    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cached eigendecompositions ``(λ_G, Q_G, λ_A, Q_A)`` of the factors."""
        if self._eigen is None:
            # The factors are second-moment matrices (PSD): negative eigenvalues are
            # round-off (~ε‖G‖), and λ_G·λ_A of two of them could swamp the damping.
            lam_G, Q_G = symmetric_eigh(self.G)
            lam_A, Q_A = symmetric_eigh(self.A)
            lam_G, lam_A = lam_G.clamp_min(0), lam_A.clamp_min(0)
            self._eigen = (lam_G, Q_G, lam_A, Q_A)
        return self._eigen

    def _diagonal_matrix(self):
        return torch.outer(self.G.diagonal(), self.A.diagonal())  # (G ⊗ A)_(ij),(ij) = G_ii A_jj

    def _scaled(self, scale):
        return KroneckerBlock(self.G * scale, self.A, self.param_shapes, self.bias_folded, self.param_names)

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """All eigenvalues λ_i(G) λ_j(A), ascending, without forming G ⊗ A."""
        lam_G, _, lam_A, _ = self.eigen()
        return torch.outer(lam_G, lam_A).flatten().sort().values

    def trace(self) -> Tensor:
        """tr(G ⊗ A) = tr G · tr A."""
        return self.G.trace() * self.A.trace()

    def frobenius_norm(self) -> Tensor:
        """‖G ⊗ A‖_F = ‖G‖_F ‖A‖_F."""
        return self.G.norm() * self.A.norm()

    def eigenbasis_form(self) -> EigenbasisBlock:
        """The same matrix as Q_G ⊗ Q_A with the diagonal λ_G λ_Aᵀ."""
        lam_G, Q_G, lam_A, Q_A = self.eigen()
        return EigenbasisBlock(
            Q_G, Q_A, torch.outer(lam_G, lam_A), self.param_shapes, self.bias_folded, self.param_names
        )

    def pi(self) -> float:
        """Martens & Grosse's π = √((tr G / d_G) / (tr A / d_A))."""
        mean_G = self.G.trace() / self.G.shape[0]
        mean_A = self.A.trace() / self.A.shape[0]
        return torch.sqrt(mean_G / mean_A).item() if mean_A > 0 and mean_G > 0 else 1.0

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> LayerMatrixBlock:
        """The damped inverse as a new block.

        Exactly (G ⊗ A + λI)⁻¹ in the factors' eigenbases, or with ``pi_damping`` the
        factored Kronecker inverse (G + π√λ I)⁻¹ ⊗ (A + √λ/π I)⁻¹ (Martens & Grosse
        2015, §6.3). A block with a 1 × 1 factor (a bias on its own: A = [a]) is a scaled
        matrix, nothing to factor: it is damped exactly under either option.
        """
        damping = check_nonnegative("damping", damping)
        if pi_damping and min(self.A.shape[0], self.G.shape[0]) == 1:
            pi_damping = False
        if not pi_damping and self._G_scalar is not None and self._G_scalar > 0:
            # (cI ⊗ A + λI)⁻¹ = I ⊗ (cA + λI)⁻¹: one factor, by Cholesky (no eigensolver).
            A_inv = _spd_inverse(self._G_scalar * self.A, damping)
            eye = torch.eye(self.G.shape[0], dtype=self.dtype, device=self.device)
            return KroneckerBlock(eye, A_inv, self.param_shapes, self.bias_folded, self.param_names)
        if not pi_damping:
            return self.eigenbasis_form().inverse(damping)
        pi, root = self.pi(), damping**0.5
        G_inv = _spd_inverse(self.G, pi * root)
        A_inv = _spd_inverse(self.A, root / pi)
        return KroneckerBlock(G_inv, A_inv, self.param_shapes, self.bias_folded, self.param_names)


class EigenbasisBlock(LayerMatrixBlock):
    """(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ: KFAC's eigenbasis with any diagonal D.

    Covers KFAC itself (D = λ_G λ_Aᵀ), its damped inverse (D = 1/(λ_G λ_Aᵀ + λ)) and
    EKFAC (D refit to the exact second moments in the eigenbasis).

    A thin Q_A (d_A × r, r < d_A: a low-rank input factor) spans part of the input
    space; on the rest, row i of the G-eigenbasis has the eigenvalue ``complement[i]``:
    the block is Σ_i q_i q_iᵀ ⊗ (Q_A diag(D_i) Q_Aᵀ + c_i (I − Q_A Q_Aᵀ)), q_i = Q_G[:, i].

    Args:
        Q_G: Orthogonal (d_out, d_out).
        Q_A: Orthonormal columns (d_A, r), r ≤ d_A.
        D: Eigenvalues as a (d_out, r) matrix.
        param_shapes: As for ``KroneckerBlock``.
        bias_folded: As for ``KroneckerBlock``.
        param_names: Names of the tensors.
        complement: ``(d_out,)`` eigenvalues on the complement of Q_A's columns
            (needed when r < d_A; ignored, and ``None``, when Q_A is square).
    """

    def __init__(
        self,
        Q_G: Tensor,
        Q_A: Tensor,
        D: Tensor,
        param_shapes,
        bias_folded: bool,
        param_names=None,
        complement: Tensor | None = None,
    ):
        super().__init__(Q_G.shape[0], param_shapes, bias_folded, D.dtype, D.device, param_names)
        self.Q_G = Q_G
        self.Q_A = Q_A
        self.D = D
        thin = Q_A.shape[1] < Q_A.shape[0]
        if thin and (complement is None or complement.shape != (Q_G.shape[0],)):
            raise ValueError(
                f"a thin Q_A {tuple(Q_A.shape)} needs complement eigenvalues of shape ({Q_G.shape[0]},)"
            )
        self.complement = complement if thin else None

    @property
    def _missing(self) -> int:
        """How many input directions Q_A leaves to the complement (d_A − r)."""
        return self.Q_A.shape[0] - self.Q_A.shape[1]

    def _in_basis(self, R: Tensor) -> Tensor:
        """Q_G (the block's diagonal applied to R = Q_Gᵀ M) — the rotation back included."""
        if self.complement is None:
            return self.Q_G @ ((R @ self.Q_A) * self.D) @ self.Q_A.T
        c = self.complement[:, None]
        # c·R on every direction, corrected to D on Q_A's span: c R + ((R Q_A) ∘ (D − c)) Q_Aᵀ
        return self.Q_G @ (((R @ self.Q_A) * (self.D - c)) @ self.Q_A.T + c * R)

    def _apply_matrix(self, M):
        return self._in_basis(self.Q_G.T @ M)

    def prefers_factors(self, n):  # noqa: D102
        # Only the rotation into the eigenbasis can use the factors: n(d_out² + d_A² + d_out·d_A)
        # against d_out·d_A·(d_out + d_A); the rotation back is the same either way.
        d_out, d_A = self.Q_G.shape[0], self.Q_A.shape[0]
        return n * (d_out * d_out + d_A * d_A + d_out * d_A) < d_out * d_A * (d_out + d_A)

    def outer_sum_product(self, U, X):  # noqa: D102
        # The rotation into the eigenbasis from the factors: Q_Gᵀ(UᵀX)Q_A = (UQ_G)ᵀ(XQ_A).
        self._check_outer_factors(U, X, self.Q_A.shape[0])
        if self.complement is not None:
            return self._in_basis((U @ self.Q_G).T @ X)
        rotated = (U @ self.Q_G).T @ (X @ self.Q_A)
        return self.Q_G @ (rotated * self.D) @ self.Q_A.T

    def _diagonal_matrix(self):
        # Entry (i, j) of (Q_G ⊗ Q_A) diag(D) (Q_G ⊗ Q_A)ᵀ's diagonal: Σ_ab Q_G[i,a]² D[a,b] Q_A[j,b]².
        if self.complement is None:
            return self.Q_G.pow(2) @ self.D @ self.Q_A.pow(2).T
        # The complement's projector I − Q_A Q_Aᵀ has the diagonal 1 − Σ_b Q_A[j,b]².
        c = self.complement[:, None]
        G_squares = self.Q_G.pow(2)
        return G_squares @ (self.D - c) @ self.Q_A.pow(2).T + G_squares @ c

    def _scaled(self, scale):
        complement = None if self.complement is None else self.complement * scale
        return EigenbasisBlock(
            self.Q_G,
            self.Q_A,
            self.D * scale,
            self.param_shapes,
            self.bias_folded,
            self.param_names,
            complement,
        )

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:  # noqa: D102
        if self.complement is None:
            return self.D.flatten().sort().values
        rest = self.complement.repeat_interleave(self._missing)
        return torch.cat([self.D.flatten(), rest]).sort().values

    def trace(self) -> Tensor:
        """Sum of the eigenvalues."""
        if self.complement is None:
            return self.D.sum()
        return self.D.sum() + self.complement.sum() * self._missing

    def frobenius_norm(self) -> Tensor:
        """‖eigenvalues‖₂ (the basis is orthogonal)."""
        if self.complement is None:
            return self.D.norm()
        return (self.D.pow(2).sum() + self.complement.pow(2).sum() * self._missing).sqrt()

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> EigenbasisBlock:
        """(B + damping·I)⁻¹ in the same basis.

        ``pi_damping`` (factored damping) needs Kronecker factors, which this block does
        not have (an EKFAC diagonal is no Kronecker product): it is damped exactly.
        """
        damping = check_nonnegative("damping", damping)
        shifted = self.D + damping
        complement = None if self.complement is None else self.complement + damping
        if bool((shifted <= 0).any()) or (complement is not None and bool((complement <= 0).any())):
            raise ValueError("the damped block is singular or indefinite: increase damping")
        return EigenbasisBlock(
            self.Q_G,
            self.Q_A,
            1.0 / shifted,
            self.param_shapes,
            self.bias_folded,
            self.param_names,
            None if complement is None else 1.0 / complement,
        )


class LowRankKroneckerBlock(KroneckerBlock):
    """G ⊗ A with a low-rank input factor A = ZᵀZ kept as Z ``(m, d_A)``, m < d_A.

    A layer input factor has rank at most the number of input vectors it averages
    (examples × weight-sharing locations); when that is below d_A, Z holds m·d_A
    numbers where A would hold d_A². Products, the diagonal, trace, norm, eigenvalues
    and the damped inverse are exact: eig(A) comes from the thin SVD Z = U S Vᵀ
    (λ_A = S², Q_A = V, d_A × m), every other input direction has eigenvalue 0, and
    the damped inverse is an ``EigenbasisBlock`` with a thin Q_A and the complement
    eigenvalues 1/λ (exact damping) or 1/((λ_G + π√λ) √λ/π) (π-damping).

    Args:
        G: Output-side factor, (d_out, d_out).
        Z: Input-side root, (m, d_A): A = ZᵀZ.
        param_shapes, bias_folded, param_names: As for ``KroneckerBlock``.
    """

    def __init__(self, G: Tensor, Z: Tensor, param_shapes, bias_folded: bool, param_names=None):
        LayerMatrixBlock.__init__(self, G.shape[0], param_shapes, bias_folded, G.dtype, G.device, param_names)
        self.G = G
        self.Z = Z
        self._eigen = None
        self._G_scalar = _scaled_identity_scalar(G)

    @property
    def A(self) -> Tensor:
        """The input factor ZᵀZ as a dense ``(d_A, d_A)`` matrix (for storage and checks; d_A² numbers)."""
        check_fits("the dense input factor A = ZᵀZ", (self.Z.shape[1],) * 2, self.dtype, self.device)
        return self.Z.T @ self.Z

    def _times_A(self, M: Tensor) -> Tensor:
        """M A = (M Zᵀ) Z: 2·m·d_A multiply-adds per row instead of d_A²."""
        return (M @ self.Z.T) @ self.Z

    def _apply_matrix(self, M):
        product = self._times_A(M)
        if self._G_scalar is not None:
            return product if self._G_scalar == 1.0 else product * self._G_scalar
        return self.G @ product

    def prefers_factors(self, n):  # noqa: D102
        d_out, (m, d_A) = self.d_out, self.Z.shape
        return n * (d_out * d_out + 2 * m * d_A + d_out * d_A) < d_out * d_A * (d_out + 2 * m)

    def outer_sum_product(self, U, X):  # noqa: D102
        self._check_outer_factors(U, X, self.Z.shape[1])
        return (U @ self.G).T @ self._times_A(X)

    def _block(self, indices):
        if len(indices) == len(self.param_shapes):
            return self
        (index,) = indices
        names = [self.param_names[index]] if self.param_names else None
        if index == 1:  # the bias on its own: a 1 × 1 factor
            A = self.Z[:, -1:].T @ self.Z[:, -1:]
            return KroneckerBlock(self.G, A, [self.param_shapes[index]], False, names)
        return LowRankKroneckerBlock(self.G, self.Z[:, :-1], [self.param_shapes[index]], False, names)

    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_G, Q_G, λ_A, Q_A)`` with A's nonzero part from the thin SVD of Z (Q_A: d_A × m)."""
        if self._eigen is None:
            lam_G, Q_G = symmetric_eigh(self.G)
            _, S, Vh = torch.linalg.svd(self.Z, full_matrices=False)
            self._eigen = (lam_G.clamp_min(0), Q_G, S.pow(2), Vh.T)
        return self._eigen

    def _diagonal_matrix(self):
        return torch.outer(self.G.diagonal(), self.Z.pow(2).sum(0))

    def _scaled(self, scale):
        return LowRankKroneckerBlock(
            self.G * scale, self.Z, self.param_shapes, self.bias_folded, self.param_names
        )

    def eigvalsh(self, max_bytes: int | None = None) -> Tensor:
        """λ_i(G) λ_j(A) for A's m eigenpairs from Z, and 0 for the d_out·(d_A − m) others; ascending."""
        return self.eigenbasis_form().eigvalsh()

    def trace(self) -> Tensor:
        """The trace tr G · ‖Z‖²_F."""
        return self.G.trace() * self.Z.pow(2).sum()

    def frobenius_norm(self) -> Tensor:
        """‖G‖_F ‖ZᵀZ‖_F, with ‖ZᵀZ‖_F = ‖ZZᵀ‖_F (m × m)."""
        return self.G.norm() * (self.Z @ self.Z.T).norm()

    def eigenbasis_form(self) -> EigenbasisBlock:
        """The same matrix with a thin Q_A and complement eigenvalue 0."""
        lam_G, Q_G, lam_A, Q_A = self.eigen()
        zero = torch.zeros_like(lam_G)
        return EigenbasisBlock(
            Q_G, Q_A, torch.outer(lam_G, lam_A), self.param_shapes, self.bias_folded, self.param_names, zero
        )

    def pi(self) -> float:
        """Martens & Grosse's π = √((tr G / d_G) / (tr A / d_A))."""
        mean_G = self.G.trace() / self.G.shape[0]
        mean_A = self.Z.pow(2).sum() / self.Z.shape[1]
        return torch.sqrt(mean_G / mean_A).item() if mean_A > 0 and mean_G > 0 else 1.0

    def inverse(self, damping: float = 0.0, pi_damping: bool = False) -> EigenbasisBlock:
        """The damped inverse, exact or π-damped as ``KroneckerBlock.inverse``, in the thin eigenbasis.

        Raises ``ValueError`` at damping 0 when A is rank-deficient (the block is singular).
        """
        damping = check_nonnegative("damping", damping)
        if not pi_damping or min(self.Z.shape[1], self.d_out) == 1:
            return self.eigenbasis_form().inverse(damping)
        lam_G, Q_G, lam_A, Q_A = self.eigen()
        pi, root = self.pi(), damping**0.5
        shift_G, shift_A = pi * root, root / pi
        if shift_A <= 0:
            raise ValueError("the damped block is singular or indefinite: increase damping")
        # (G + π√λ I)⁻¹ ⊗ (A + √λ/π I)⁻¹: on A's complement (λ_A = 0) the input side is π/√λ.
        G_part = 1.0 / (lam_G + shift_G)
        D = torch.outer(G_part, 1.0 / (lam_A + shift_A))
        return EigenbasisBlock(
            Q_G, Q_A, D, self.param_shapes, self.bias_folded, self.param_names, G_part / shift_A
        )


def average_input_factors(old: Tensor, old_is_root: bool, new: Tensor, new_is_root: bool, decay: float):
    """``(A or Z, is_root)`` of decay · A_old + (1 − decay) · A_new, each given as A or as its root Z.

    Two roots stay a root [√decay Zₒ; √(1 − decay) Zₙ] while it has fewer rows than
    columns (A = ZᵀZ); beyond that, or against a dense A, the average is dense.
    """
    if old_is_root and new_is_root and old.shape[0] + new.shape[0] < new.shape[1]:
        return torch.cat([decay**0.5 * old, (1 - decay) ** 0.5 * new]), True
    A = decay * (old.T @ old if old_is_root else old)
    A += (1 - decay) * (new.T @ new if new_is_root else new)
    return A, False
