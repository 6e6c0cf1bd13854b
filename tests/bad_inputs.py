"""The bad inputs curvlab refuses, as a table: input → error class and message.

``tests/test_bad_inputs.py`` runs every row; ``docs/bad_inputs.md`` is generated
from the same rows (``python -m tests.bad_inputs > docs/bad_inputs.md``) and a
test checks it is current, so the page lists exactly what the tests check.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab import cli, optim, tune
from curvlab.storage import SCHEMA_VERSION, Store, read


class CommandFailed(Exception):
    """The ``curvlab`` command ended with exit status 2; the message is what it printed."""


@dataclass(frozen=True)
class BadInput:
    """One refused input: where, what, the call that passes it, the error and a regex of its message."""

    area: str
    given: str
    call: Callable[[], object]
    error: type[BaseException]
    match: str

    @property
    def id(self) -> str:
        return f"{self.area}: {self.given}"


# ---------------------------------------------------------------- small problems
def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _batch(n=5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=generator).to(dtype), torch.randn(n, 2, generator=generator).to(dtype)


def _problem(loss=None, data=None, model=None, **options) -> cl.Problem:
    data = _batch() if data is None else data
    return cl.Problem(model or _mlp(), loss or nn.MSELoss(), data, **options)


def _labels(dtype, n=5):
    return torch.tensor([0, 1, 0, 1, 0][:n]).to(dtype)


def _shuffled_loader():
    torch.manual_seed(0)
    X, y = _batch(40)
    return DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)


class _OneShot:
    """An iterable whose ``__iter__`` returns the same iterator: empty after one pass."""

    def __init__(self):
        self.batches = iter([_batch()])

    def __iter__(self):
        return self.batches


class _ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.linear(x), x


def _ggn(**options):
    return cl.GGN(_problem(**options))


def _vector(n=26, dtype=torch.float64, **options):
    return torch.ones(n, dtype=dtype, **options)


def _layernorm_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    return cl.Problem(model, nn.MSELoss(), _batch())


# ---------------------------------------------------------------- store and command
_SCRATCH: list[Path] = []


@atexit.register
def _remove_scratch() -> None:
    for folder in _SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)


def _scratch() -> Path:
    _SCRATCH.append(Path(tempfile.mkdtemp(prefix="curvlab-bad-inputs-")))
    return _SCRATCH[-1]


def _tampered_store(change) -> Path:
    path = _scratch() / "run.h5"
    Store(path).save("numbers", {"a": 1.0}, step=1)
    with h5py.File(path, "a") as f:
        change(f)
    return path


def _command(*argv: str) -> int:
    """``curvlab *argv``; ``CommandFailed`` with its one line of stderr if it exits with status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_info:
            code = exit_info.code
    if code == 2:
        raise CommandFailed(err.getvalue().strip())
    return code


def _analyze(*flags: str) -> int:
    return _command("analyze", *flags, "--steps", "1", "--out", str(_scratch() / "out"))


def _step_on(name: str, **options):
    """Load into an optimizer of a 3-5-2 MLP the state of one of a 3-4-2 MLP after one step."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    large = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    X, y = torch.randn(8, 3), torch.randn(8, 2)
    first = getattr(optim, name)(small, nn.MSELoss(), lr=0.1, **options)

    def closure():
        first.zero_grad()
        loss = nn.functional.mse_loss(small(X), y)
        loss.backward()
        return loss

    first.step(closure, batch=(X, y))
    getattr(optim, name)(large, nn.MSELoss(), lr=0.1, **options).load_state_dict(first.state_dict())


NAN = float("nan")

ROWS = [
    # ------------------------------------------------------------ losses
    BadInput(
        "loss",
        "an unsupported loss class (L1Loss)",
        lambda: _problem(nn.L1Loss()),
        cl.UnsupportedError,
        "L1Loss is not supported.*MSELoss",
    ),
    BadInput(
        "loss",
        "reduction='none'",
        lambda: _problem(nn.MSELoss(reduction="none")),
        cl.UnsupportedError,
        "reduction='none'",
    ),
    BadInput(
        "loss",
        "CrossEntropyLoss with a class weight",
        lambda: _problem(nn.CrossEntropyLoss(weight=torch.ones(2)), (_batch()[0], _labels(torch.long))),
        cl.UnsupportedError,
        "options \\['weight'\\]",
    ),
    BadInput(
        "loss",
        "a class index outside [0, C)",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], torch.tensor([0, 1, 2, 1, 0]))),
        cl.DataError,
        r"class indices in \[0, 2\) or ignore_index=-100; got \[2\]",
    ),
    BadInput(
        "loss",
        "every target equal to ignore_index",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], torch.full((5,), -100))),
        cl.DataError,
        "no loss terms",
    ),
    BadInput(
        "loss",
        "float class labels (N,) for CrossEntropyLoss",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], _labels(torch.float64))),
        cl.DataError,
        r"float targets of shape \(5,\).*class probabilities.*y.long\(\)",
    ),
    BadInput(
        "loss",
        "int32 class labels for CrossEntropyLoss (torch refuses them too)",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], _labels(torch.int32))),
        cl.DataError,
        "class labels of dtype torch.int32; torch takes int64 \\(long\\) or uint8",
    ),
    BadInput(
        "loss",
        "bool class labels for CrossEntropyLoss",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], _labels(torch.bool))),
        cl.DataError,
        "class labels of dtype torch.bool",
    ),
    BadInput(
        "loss",
        "integer targets for BCEWithLogitsLoss (torch refuses them too)",
        lambda: _problem(nn.BCEWithLogitsLoss(), (_batch()[0], torch.ones(5, 2, dtype=torch.long))),
        cl.DataError,
        "floating-point targets.*y.float\\(\\)",
    ),
    BadInput(
        "loss",
        "CrossEntropyLoss targets shaped like neither labels nor logits",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], torch.zeros(5, 2, dtype=torch.long))),
        cl.DataError,
        "target must have shape",
    ),
    BadInput(
        "loss",
        "probability targets of the wrong shape",
        lambda: _problem(nn.CrossEntropyLoss(), (_batch()[0], torch.rand(5, 3, dtype=torch.float64))),
        cl.DataError,
        "probability targets must have the output's shape",
    ),
    # ------------------------------------------------------------ data
    BadInput("data", "an empty list", lambda: _problem(data=[]), cl.DataError, "empty"),
    BadInput("data", "an exhausted iterator", lambda: _problem(data=iter([])), cl.DataError, "empty"),
    BadInput(
        "data",
        "a batch with 0 rows",
        lambda: _problem(data=[_batch(), (torch.zeros(0, 3).double(), torch.zeros(0, 2).double())]),
        cl.DataError,
        "batch 1 has no examples",
    ),
    BadInput(
        "data",
        "inputs and targets of different lengths",
        lambda: _problem(data=[_batch(), (torch.zeros(4, 3).double(), torch.zeros(3, 2).double())]),
        cl.DataError,
        "batch 1: inputs have 4 examples but targets have 3",
    ),
    BadInput(
        "data",
        "outputs and targets of different shapes",
        lambda: _problem(data=(_batch()[0], torch.zeros(5, 3).double())),
        cl.DataError,
        r"output has shape \(5, 2\).*target has shape \(5, 3\)",
    ),
    BadInput(
        "data",
        "a batch that is not an (X, y) pair",
        lambda: _problem(data=[torch.zeros(5, 3)]),
        cl.DataError,
        "not an \\(X, y\\) pair",
    ),
    BadInput(
        "data",
        "a NumPy array as inputs",
        lambda: _problem(data=[(_batch()[0].numpy(), _batch()[1])]),
        cl.DataError,
        "inputs X are a ndarray, not a torch.Tensor",
    ),
    BadInput(
        "data",
        "a 0-d tensor as a batch's inputs",
        lambda: _problem(data=[(torch.tensor(1.0), torch.tensor(2.0))]),
        cl.DataError,
        "leading dimension of examples",
    ),
    BadInput(
        "data",
        "a shuffling DataLoader (another matrix on every pass)",
        lambda: _problem(data=_shuffled_loader()),
        cl.DataError,
        "different from the first pass.*shuffle=True.*list\\(loader\\)",
    ),
    BadInput(
        "data",
        "a one-shot iterable (empty on its second pass)",
        lambda: _problem(data=_OneShot()),
        cl.DataError,
        "gave 0 batches, the first pass 1",
    ),
    BadInput(
        "data",
        "NaN in a parameter",
        lambda: cl.GGN(_nan_parameter()) @ _vector(),
        cl.NonFiniteError,
        "the model output has NaN or Inf",
    ),
    # ------------------------------------------------------------ model and parameters
    BadInput(
        "model",
        "a model that returns a tuple",
        lambda: _problem(model=_ReturnsTuple()),
        cl.UnsupportedError,
        "returned a tuple, not a tensor.*wrap the model",
    ),
    BadInput(
        "model",
        "float16 parameters",
        lambda: _problem(model=_mlp(torch.float16), data=_batch(dtype=torch.float16)),
        cl.UnsupportedError,
        "torch.float16 are not supported.*float32",
    ),
    BadInput(
        "model",
        "bfloat16 parameters",
        lambda: _problem(model=_mlp(torch.bfloat16), data=_batch(dtype=torch.bfloat16)),
        cl.UnsupportedError,
        "torch.bfloat16 are not supported",
    ),
    BadInput(
        "model",
        "parameters of mixed dtypes",
        lambda: _problem(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())),
        ValueError,
        "one dtype",
    ),
    BadInput(
        "model",
        "a parameter that is not the model's",
        lambda: _problem(params=[nn.Parameter(torch.zeros(3))]),
        ValueError,
        r"params\[0\].*not a parameter of the model",
    ),
    BadInput(
        "model",
        "the same parameter twice",
        lambda: _problem(params=[_mlp()[0].weight] * 2),
        ValueError,
        "same tensor twice",
    ),
    BadInput(
        "model",
        "KFAC of a LayerNorm without other_structure",
        lambda: cl.KFAC(_layernorm_problem()),
        cl.UnsupportedError,
        "LayerNorm.*other_structure",
    ),
    # ------------------------------------------------------------ operators
    BadInput(
        "operator",
        "an operator built on a module, not a Problem",
        lambda: cl.GGN(nn.Linear(2, 2)),
        TypeError,
        "curvlab.Problem",
    ),
    BadInput(
        "operator",
        "a vector of the wrong length",
        lambda: _ggn() @ _vector(27),
        cl.DataError,
        r"shape \(26, 26\) with a vector of shape \(27,\)",
    ),
    BadInput(
        "operator",
        "a vector of another dtype",
        lambda: _ggn() @ _vector(dtype=torch.float32),
        cl.DataError,
        "dtype torch.float32 but the operator has dtype torch.float64",
    ),
    BadInput(
        "operator",
        "a list with too few tensors",
        lambda: _ggn() @ [torch.zeros(1)],
        cl.DataError,
        "expected 4 tensors, got 1",
    ),
    BadInput(
        "operator",
        "a vector that requires grad",
        lambda: _ggn() @ _vector(requires_grad=True),
        cl.DataError,
        "requires grad.*v.detach\\(\\)",
    ),
    BadInput(
        "operator",
        "a right-hand side of the wrong length",
        lambda: _ggn().solve(_vector(25), 1.0),
        cl.DataError,
        "right-hand side of shape \\(25,\\)",
    ),
    BadInput(
        "operator",
        "a right-hand side of another dtype",
        lambda: _ggn().solve(_vector(dtype=torch.float32), 1.0),
        cl.DataError,
        "right-hand side has dtype torch.float32",
    ),
    BadInput(
        "operator",
        "solve with damping=nan",
        lambda: _ggn().solve(_vector(), damping=NAN),
        ValueError,
        "damping must be a finite number ≥ 0, got nan",
    ),
    BadInput(
        "operator",
        "solve with damping < 0",
        lambda: _ggn().solve(_vector(), damping=-1.0),
        ValueError,
        "damping must be a finite number ≥ 0, got -1.0",
    ),
    BadInput(
        "operator",
        "KFAC inverse with damping=inf",
        lambda: cl.KFAC(_problem()).inverse(float("inf")),
        ValueError,
        "damping must be a finite number ≥ 0, got inf",
    ),
    BadInput(
        "operator",
        "solve with maxiter=0",
        lambda: _ggn().solve(_vector(), 1.0, maxiter=0),
        ValueError,
        "maxiter must be an integer ≥ 1, got 0",
    ),
    BadInput(
        "operator",
        "the explicit inverse of a matrix-free operator",
        lambda: _ggn().inverse(1.0),
        cl.UnsupportedError,
        "GGN is matrix-free.*solve",
    ),
    BadInput(
        "operator",
        "mc_samples=0",
        lambda: cl.Fisher(_problem(), mc_samples=0),
        ValueError,
        "mc_samples must be an integer ≥ 1, got 0",
    ),
    BadInput(
        "operator",
        "mc_samples=1.5",
        lambda: cl.Fisher(_problem(), mc_samples=1.5),
        ValueError,
        "mc_samples must be an integer ≥ 1, got 1.5",
    ),
    BadInput(
        "operator",
        "a seed that is not an integer",
        lambda: cl.Fisher(_problem(), mc_samples=1, seed=0.5),
        ValueError,
        "seed must be an integer, got 0.5",
    ),
    BadInput(
        "operator",
        "a dense matrix larger than allowed",
        lambda: _ggn().to_dense(max_bytes=100),
        cl.DenseTooLargeError,
        "would need 5,408 bytes",
    ),
    BadInput(
        "operator",
        "compare across dtypes",
        lambda: cl.compare(
            cl.KFAC(_problem(model=_mlp(torch.float32), data=_batch(dtype=torch.float32))), _ggn()
        ),
        cl.DataError,
        "approx is torch.float32 on cpu but exact is torch.float64",
    ),
    BadInput(
        "operator",
        "compare with k=0",
        lambda: cl.compare(cl.KFAC(_problem()), _ggn(), k=0),
        ValueError,
        "k must be an integer ≥ 1, got 0",
    ),
    BadInput(
        "operator",
        "KFAC with max_vectors=0",
        lambda: cl.KFAC(_problem(), max_vectors=0),
        ValueError,
        "max_vectors must be an integer ≥ 1, got 0",
    ),
    # ------------------------------------------------------------ spectra
    BadInput(
        "spectra",
        "top_eigen with tol=nan",
        lambda: cl.top_eigen(_ggn(), 1, tol=NAN),
        ValueError,
        "tol must be a finite number > 0, got nan",
    ),
    BadInput(
        "spectra",
        "top_eigen with k=1.5",
        lambda: cl.top_eigen(_ggn(), 1.5),
        ValueError,
        "k must be an integer ≥ 1, got 1.5",
    ),
    BadInput(
        "spectra",
        "top_eigen with k > n",
        lambda: cl.top_eigen(_ggn(), 27),
        ValueError,
        "k must be between 1 and n = 26, got 27",
    ),
    BadInput(
        "spectra",
        "top_eigen with max_matvecs=0",
        lambda: cl.top_eigen(_ggn(), 1, max_matvecs=0),
        ValueError,
        "max_matvecs must be an integer ≥ 1, got 0",
    ),
    BadInput(
        "spectra",
        "trace with num_matvecs=2.5",
        lambda: cl.trace(_ggn(), "hutchinson", 2.5),
        ValueError,
        "num_matvecs must be an integer ≥ 1, got 2.5",
    ),
    BadInput(
        "spectra",
        "spectral_density with sigma=-1",
        lambda: cl.spectral_density(_ggn(), 2, 4, sigma=-1),
        ValueError,
        "sigma must be a finite number > 0, got -1",
    ),
    BadInput(
        "spectra",
        "spectral_density with sigma=0",
        lambda: cl.spectral_density(_ggn(), 2, 4, sigma=0),
        ValueError,
        "sigma must be a finite number > 0, got 0",
    ),
    BadInput(
        "spectra",
        "spectral_density on a grid with NaN",
        lambda: cl.spectral_density(_ggn(), 2, 4, grid=torch.tensor([NAN, 1.0])),
        ValueError,
        "grid must be a 1-d tensor of finite values",
    ),
    BadInput(
        "spectra",
        "condition_number with rtol=-1",
        lambda: cl.condition_number(_ggn(), rtol=-1),
        ValueError,
        "rtol must be a finite number ≥ 0, got -1",
    ),
    BadInput(
        "spectra",
        "a non-symmetric matrix",
        lambda: cl.eigvalsh(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)),
        cl.DataError,
        "not symmetric",
    ),
    # ------------------------------------------------------------ store
    BadInput(
        "store",
        "a result it cannot store",
        lambda: Store(_scratch() / "run.h5").save("x", object()),
        cl.StoreError,
        "cannot store a object",
    ),
    BadInput(
        "store",
        "a file of a newer schema",
        lambda: read(_tampered_store(lambda f: f.attrs.__setitem__("schema_version", SCHEMA_VERSION + 1))),
        cl.StoreError,
        "newer curvlab",
    ),
    BadInput(
        "store",
        "a record whose step is not an integer",
        lambda: read(_tampered_store(lambda f: f["records/00000000"].attrs.__setitem__("step", 1.5))),
        cl.StoreError,
        "step must be an integer, got 1.5",
    ),
    BadInput(
        "store",
        "a record whose value is text",
        lambda: read(
            _tampered_store(
                lambda f: (
                    f["records/00000000/data"].__delitem__("a"),
                    f["records/00000000/data"].attrs.__setitem__("a", "x"),
                )
            )
        ),
        cl.StoreError,
        "'a' must be numeric, got str",
    ),
    # ------------------------------------------------------------ optimizers
    BadInput(
        "optimizer",
        "the state of a model with other shapes (KFAC)",
        lambda: _step_on("KFAC"),
        ValueError,
        r"state is of another model: parameter 0 has shape \(4, 3\) in the state but \(5, 3\)",
    ),
    BadInput(
        "optimizer",
        "the state of a model with other shapes (CenteredSGD)",
        lambda: _step_on("CenteredSGD", momentum=0.9),
        ValueError,
        r"parameter 0 has shape \(4, 3\) in the state",
    ),
    BadInput(
        "optimizer",
        "lr=nan",
        lambda: optim.KFAC(_mlp(), nn.MSELoss(), lr=NAN),
        ValueError,
        "lr must be a finite number > 0, got nan",
    ),
    BadInput(
        "optimizer",
        "momentum=nan",
        lambda: optim.KFAC(_mlp(), nn.MSELoss(), momentum=NAN),
        ValueError,
        "momentum must be a finite number ≥ 0, got nan",
    ),
    BadInput(
        "optimizer",
        "damping=nan",
        lambda: optim.HessianFree(_mlp(), nn.MSELoss(), damping=NAN),
        ValueError,
        "damping must be a finite number ≥ 0, got nan",
    ),
    BadInput(
        "optimizer",
        "curvature_every=1.5",
        lambda: optim.KFAC(_mlp(), nn.MSELoss(), curvature_every=1.5),
        ValueError,
        "curvature_every must be an integer ≥ 1, got 1.5",
    ),
    BadInput(
        "optimizer",
        "a parameter group with lr=-1",
        lambda: optim.KFAC(_mlp(), nn.MSELoss(), [{"params": _mlp().parameters(), "lr": -1.0}]),
        ValueError,
        "lr must be a finite number ≥ 0, got -1.0",
    ),
    BadInput(
        "optimizer",
        "HessianFree cg_tol=nan",
        lambda: optim.HessianFree(_mlp(), nn.MSELoss(), cg_tol=NAN),
        ValueError,
        "cg_tol must be a finite number > 0, got nan",
    ),
    BadInput(
        "optimizer",
        "ACP alpha=nan",
        lambda: optim.ACP(_mlp(), nn.MSELoss(), alpha=NAN),
        ValueError,
        "alpha must be a finite number > 0, got nan",
    ),
    BadInput(
        "optimizer",
        "CenteredSGD lr=nan",
        lambda: optim.CenteredSGD(_mlp(), nn.MSELoss(), lr=NAN),
        ValueError,
        "lr must be a finite number > 0, got nan",
    ),
    BadInput(
        "optimizer",
        "grid_search with points=0",
        lambda: tune.grid_search(lambda p: p["x"], {"x": tune.Uniform(0.0, 1.0)}, points=0),
        ValueError,
        "points must be an integer ≥ 1, got 0",
    ),
    # ------------------------------------------------------------ the curvlab command
    BadInput(
        "command",
        "--steps -5",
        lambda: _analyze("--steps", "-5"),
        CommandFailed,
        "argument --steps: must be an integer ≥ 0, got '-5'",
    ),
    BadInput(
        "command",
        "--hidden 0",
        lambda: _analyze("--hidden", "0"),
        CommandFailed,
        "argument --hidden: must be an integer ≥ 1",
    ),
    BadInput(
        "command",
        "--lr nan",
        lambda: _analyze("--lr", "nan"),
        CommandFailed,
        "argument --lr: must be a finite number > 0",
    ),
    BadInput(
        "command",
        "--batch-size 0",
        lambda: _analyze("--batch-size", "0"),
        CommandFailed,
        "argument --batch-size: must be an integer ≥ 1",
    ),
    BadInput(
        "command",
        "--k 0",
        lambda: _analyze("--k", "0"),
        CommandFailed,
        "argument --k: must be an integer ≥ 1",
    ),
    BadInput(
        "command",
        "--examples 0",
        lambda: _analyze("--examples", "0"),
        CommandFailed,
        "argument --examples: must be an integer ≥ 1",
    ),
    BadInput(
        "command",
        "--checkpoints 0",
        lambda: _analyze("--checkpoints", "0"),
        CommandFailed,
        "argument --checkpoints: must be an integer ≥ 1",
    ),
    BadInput(
        "command",
        "--device tpu",
        lambda: _analyze("--device", "tpu"),
        CommandFailed,
        "argument --device: must be cpu, cuda or cuda:<index>",
    ),
    BadInput(
        "command",
        "show of a file that is not HDF5",
        lambda: _command("show", str(_text_file())),
        CommandFailed,
        "not a readable HDF5 file",
    ),
    BadInput(
        "command",
        "show of a record with a fractional step",
        lambda: _command(
            "show", str(_tampered_store(lambda f: f["records/00000000"].attrs.__setitem__("step", 1.5)))
        ),
        CommandFailed,
        "step must be an integer, got 1.5",
    ),
]


def _nan_parameter() -> cl.Problem:
    problem = _problem()
    with torch.no_grad():
        problem.params[0][0, 0] = NAN
    return problem


def _text_file() -> Path:
    path = _scratch() / "notes.h5"
    path.write_text("not hdf5")
    return path


# ---------------------------------------------------------------- the documentation page
def message_of(row: BadInput) -> str:
    """The row's error message, with temporary paths shortened (for the page)."""
    try:
        row.call()
    except row.error as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        return re.sub(r"\S*curvlab-bad-inputs-[^/\s]*/", ".../", text)
    raise AssertionError(f"{row.id}: no {row.error.__name__} raised")


def markdown() -> str:
    """``docs/bad_inputs.md``: one table per area."""
    lines = [
        "# Bad inputs curvlab refuses",
        "",
        "Generated from `tests/bad_inputs.py` (`python -m tests.bad_inputs > docs/bad_inputs.md`); every",
        "row is a test. Errors are `curvlab` classes (`cl.DataError`, `cl.UnsupportedError`, ...) or",
        "`ValueError`/`TypeError` for an option of the wrong value or type; the command prints one line",
        "and exits with status 2.",
    ]
    area = None
    for row in ROWS:
        if row.area != area:
            area = row.area
            lines += ["", f"## {area}", "", "| input | error | message |", "|---|---|---|"]
        error = "exit status 2" if row.error is CommandFailed else f"`{row.error.__name__}`"
        message = message_of(row).replace("|", "\\|")
        lines.append(f"| {row.given} | {error} | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
