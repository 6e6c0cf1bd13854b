"""Exceptions raised by curvlab.

Every error names the offending object and what is supported instead, so that a
wrong input never turns into a silently wrong number.
"""


class CurvlabError(Exception):
    """Base class of all curvlab errors."""


class UnsupportedError(CurvlabError, ValueError):
    """A model, loss, layer, reduction or option that curvlab does not support."""


class DataError(CurvlabError, ValueError):
    """Data that cannot be used: empty, mismatched shapes, wrong dtype or device."""


class NonFiniteError(DataError):
    """NaN or Inf where curvature is computed: the model's output, the targets, or a product."""


class DenseTooLargeError(CurvlabError, MemoryError):
    """Materialising a dense matrix would need more memory than is available.

    Attributes:
        bytes_needed: Size of the dense matrix in bytes.
        bytes_available: Memory available on the target device in bytes.
    """

    def __init__(self, what: str, bytes_needed: int, bytes_available: int, hint: str | None = None):
        self.bytes_needed = int(bytes_needed)
        self.bytes_available = int(bytes_available)
        hint = hint or (
            "use matrix-free products (C @ v, cl.top_eigen, cl.trace) or pass a larger max_bytes "
            "if you know better"
        )
        super().__init__(
            f"{what} would need {self.bytes_needed:,} bytes "
            f"({self.bytes_needed / 2**30:.2f} GiB) but only {self.bytes_available:,} bytes "
            f"({self.bytes_available / 2**30:.2f} GiB) are available; {hint}"
        )


class NotPositiveDefiniteError(CurvlabError, ValueError):
    """Conjugate gradient met non-positive curvature: the damped matrix is not PD."""
