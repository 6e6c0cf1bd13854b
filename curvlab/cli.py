"""The ``curvlab`` command: ``analyze`` (the main job), ``show`` and ``plot`` of its files.

``curvlab analyze`` trains a small MLP on the embedded digits data (or MNIST IDX
files / an ``.npz`` the user has) and analyses its curvature at checkpoints:
exact Hessian, GGN, Fisher and empirical Fisher, KFAC, EKFAC, ACP and diagonal
approximations, spectra, diagnostics and comparisons, written to one HDF5 file
with figures (PNG) beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

import curvlab as cl
from curvlab import distributed, plot, storage
from curvlab.analysis import SUMMARY_HEADER, Settings, train_and_analyse
from curvlab.data import load_digits, load_mnist_idx, load_npz
from curvlab.errors import CurvlabError
from curvlab.models import ACTIVATIONS, mlp
from curvlab.storage import read

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Parser(argparse.ArgumentParser):
    """argparse with bad arguments reported in one line (``curvlab: argument --steps: …``), status 2."""

    def error(self, message):
        """Print one line naming the flag and exit with status 2 (argparse prints usage first)."""
        self.exit(2, f"curvlab: {message} ({self.prog} --help lists the options)\n")


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:<index>, got {text!r}")
    return text


def _load_data(args, dtype):
    """(train, test) pairs and the data set's name, from the flags."""
    if args.mnist_images or args.mnist_labels:
        if not (args.mnist_images and args.mnist_labels):
            raise SystemExit("curvlab: --mnist-images and --mnist-labels go together")
        X, y = load_mnist_idx(args.mnist_images, args.mnist_labels, dtype=dtype)
        name = f"MNIST IDX {Path(args.mnist_images).name}"
    elif args.npz:
        X, y = load_npz(args.npz, dtype=dtype)
        name = f"npz {Path(args.npz).name}"
    else:
        return (*load_digits(dtype=dtype, seed=args.seed), "digits (scikit-learn)")
    X = X.reshape(X.shape[0], -1)
    if args.examples:
        X, y = X[: args.examples], y[: args.examples]
    split = max(1, int(0.8 * X.shape[0]))
    return (X[:split], y[:split]), (X[split:], y[split:]), name


def analyze(args) -> int:
    """Train with checkpoints; analyse each; write HDF5 and figures; print a summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains the same model on
    the same minibatches, the curvature is computed over each process' contiguous
    share of the training batches (one global matrix, ``curvlab.distributed``), and
    rank 0 alone prints and writes.
    """
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise CurvlabError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    with distributed.launched(args.device) as device:
        return _analyze(args, device)


def _quiet(*args, **kwargs) -> None:
    """``print`` on ranks other than 0: nothing."""


def _analyze(args, device: torch.device) -> int:
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    writer = distributed.is_writer()
    say = print if writer else _quiet
    (X, y), (X_test, y_test), dataset = _load_data(args, dtype)
    if args.examples and dataset.startswith("digits"):
        X, y = X[: args.examples], y[: args.examples]
    X, y = X.to(device), y.to(device)
    classes = int(y.max().item()) + 1
    sizes = [X.shape[1], *args.hidden, classes]
    model = mlp(sizes, args.activation).to(device, dtype)
    out = Path(args.out)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    path = out / "analysis.h5"
    # The run writes beside the previous one and replaces it only when it has finished: a
    # run that fails leaves the previous file and figures as they were.
    partial = out / "analysis.partial.h5"
    if writer:
        storage.remove(partial)
    store = cl.Store(partial)  # written by rank 0 alone under torchrun
    settings = Settings(
        steps=args.steps,
        checkpoints=args.checkpoints,
        lr=args.lr,
        batch_size=args.batch_size,
        k=args.k,
        exact_limit=args.exact_limit,
        seed=args.seed,
        progress=False if args.no_progress or not writer else None,
        dataset=dataset,
    )
    start = time.perf_counter()
    n = sum(p.numel() for p in model.parameters())
    if args.k > n:
        say(f"note    --k {args.k} is more than the model's {n} parameters: using k = {n}")
        settings.k = n
    say(f"model   MLP {'-'.join(map(str, sizes))} ({args.activation}), {n} parameters, {dtype}, {device}")
    spread = distributed.describe()
    over = ""
    if spread["world_size"] > 1:
        over = f", split over {spread['world_size']} processes ({spread['backend']})"
    say(f"data    {dataset}: {X.shape[0]} training examples (curvature over all of them{over})")
    mode = "exact eigendecompositions" if n <= args.exact_limit else "Lanczos top-k, Hutch++ traces, SLQ"
    say(f"spectra {mode}; {args.steps} SGD steps (lr {args.lr}), {args.checkpoints} checkpoints\n")
    say(SUMMARY_HEADER)
    try:
        summaries = train_and_analyse(model, (X, y), store, settings, log=say)
    except BaseException:
        if partial.exists():
            say(
                f"curvlab: the run stopped; its finished checkpoints are in {partial}, "
                f"and {path} is still the previous run's",
                file=sys.stderr,
            )
        raise
    with torch.no_grad():
        accuracy = (model(X_test.to(device)).argmax(1) == y_test.to(device)).double().mean().item()
    last = summaries[-1]
    say(f"\ntest accuracy {accuracy:.3f}")
    say("\napproximation A against the exact GGN G at the last checkpoint:")
    say(f"  {'':<22}{'‖A − G‖_F/‖G‖_F':>18}{'up to scale':>14}")
    for key, value in last.items():
        if key.endswith(" rel_frobenius"):
            label = key.removesuffix(" rel_frobenius")
            say(f"  {label:<22}{value:>18.4f}{last[label + ' scaled']:>14.4f}")
    ok = True
    if writer:
        gap = _fisher_ggn_gap(partial)
        tolerance = 1e-8 if dtype == torch.float64 else 1e-3
        ok = gap <= tolerance
        status = "OK" if ok else "MISMATCH"
        say(f"\ncheck   |λ(Fisher) − λ(GGN)| / λmax(GGN) = {gap:.1e} ({status}, tolerance {tolerance:.0e})")
        storage.move(partial, path)
        figures = _replace_figures(path, out / "figures")
        say(f"wrote   {path} ({len(read(path))} records) and {len(figures)} figures in {out / 'figures'}")
        say(f"done in {time.perf_counter() - start:.1f} s")
    group = distributed.resolve("auto")
    if group is not None:
        ok = group.agree(ok)  # rank 0's check: every rank exits with the same status
    return 0 if ok else 1


def _replace_figures(path: Path, folder: Path) -> list[Path]:
    """The figures of ``path`` in ``folder``, replacing the previous run's (none left stale)."""
    fresh = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    figures = plot.plot_store(path, fresh)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return [folder / figure.name for figure in figures]


def _fisher_ggn_gap(path) -> float:
    """The exact Fisher equals the GGN for these losses: compare their stored spectra."""
    records = read(path)
    spectra = {}
    for kind in ("eigenvalues", "top_eigen"):
        for name in ("fisher", "ggn"):
            chosen = [r for r in records if r.kind == kind and r.name == name]
            if chosen:
                spectra.setdefault(kind, {})[name] = torch.as_tensor(chosen[-1].data["values"])
    kind = "eigenvalues" if len(spectra.get("eigenvalues", {})) == 2 else "top_eigen"
    fisher, ggn = spectra[kind]["fisher"], spectra[kind]["ggn"]
    scale = ggn.abs().max().item()
    return (fisher - ggn).abs().max().item() / (scale if scale > 0 else 1.0)  # absolute for G = 0


def show(args) -> int:
    """Summarise a store file: header, then one line per record."""
    records = read(args.file)
    import h5py

    with h5py.File(args.file, "r") as f:
        header = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    print(
        f"{args.file}: {header.get('format')} schema {header.get('schema_version')}, "
        f"written by curvlab {header.get('curvlab_version')}, created {header.get('created')}"
    )
    steps = sorted({r.step for r in records if r.step is not None})
    print(f"{len(records)} records, steps {steps}")
    if records and records[0].provenance.get("model"):
        origin = records[0].provenance
        model = " ".join(origin["model"].split())
        print(f"model   {model[:100]}{'…' if len(model) > 100 else ''}")
        print(
            f"problem {origin.get('loss')}(reduction={origin.get('reduction')!r}), "
            f"{origin.get('num_examples')} examples, {origin.get('num_params')} parameters, "
            f"{origin.get('dtype')}, {origin.get('device')}, data: {origin.get('dataset', '?')}"
        )
    print(f"\n{'#':>4} {'step':>6}  {'kind':<17}{'name':<28}summary")
    for r in records:
        print(
            f"{r.index:>4} {'' if r.step is None else r.step:>6}  {r.kind:<17}{r.name[:27]:<28}{_describe(r)}"
        )
    return 0


def _describe(r) -> str:
    data = r.data
    if r.kind == "eigenvalues":
        values = data["values"]
        return f"n={len(values)}, λ ∈ [{values.min():.4g}, {values.max():.4g}]"
    if r.kind == "top_eigen":
        return (
            f"top {len(data['values'])}: {data['values'][0]:.6g} … (residual ≤ {data['residuals'].max():.1e})"
        )
    if r.kind == "trace":
        return f"{float(data['value']):.6g} ± {float(data['standard_error']):.2g} ({r.method})"
    if r.kind == "spectral_density":
        return f"SLQ, {r.settings.get('num_probes')} probes × {r.settings.get('lanczos_steps')} steps"
    if r.kind == "comparison":
        return f"rel_frobenius {data['overall'].get('rel_frobenius', float('nan')):.4g}"
    if r.kind == "scalars":
        return ", ".join(f"{k}={float(v):.4g}" for k, v in data.items())
    if r.kind == "dense_block":
        return f"{data['matrix'].shape[0]}×{data['matrix'].shape[1]}"
    return json.dumps(sorted(data))[:60]


def plot_command(args) -> int:
    """Redraw the figures of a store file."""
    figures = plot.plot_store(args.file, args.out or Path(args.file).parent / "figures")
    for figure in figures:
        print(figure)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command."""
    parser = _Parser(prog="curvlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    positive, nonnegative = _integer(1), _integer(0)
    run = commands.add_parser("analyze", help="train a small MLP and analyse its curvature at checkpoints")
    run.add_argument("--hidden", type=positive, nargs="+", default=[16], help="hidden layer widths")
    run.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS), help="hidden activation")
    run.add_argument("--steps", type=nonnegative, default=300, help="SGD steps")
    run.add_argument(
        "--checkpoints", type=positive, default=4, help="analyses, evenly spaced from step 0 to the last"
    )
    run.add_argument("--lr", type=_learning_rate, default=0.05, help="SGD learning rate (momentum 0.9)")
    run.add_argument(
        "--batch-size", type=positive, default=256, help="minibatch size (training and curvature)"
    )
    run.add_argument("--k", type=positive, default=10, help="top eigenpairs per matrix and in comparisons")
    run.add_argument(
        "--exact-limit",
        type=nonnegative,
        default=3000,
        help="largest parameter count for exact eigendecompositions",
    )
    run.add_argument("--examples", type=positive, default=None, help="use only the first N training examples")
    run.add_argument("--mnist-images", help="MNIST-format IDX image file (instead of digits)")
    run.add_argument("--mnist-labels", help="MNIST-format IDX label file")
    run.add_argument("--npz", help="an .npz with arrays X and y (instead of digits)")
    run.add_argument("--out", default="curvlab-output", help="output folder (HDF5 file and figures)")
    run.add_argument("--seed", type=nonnegative, default=0)
    run.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they are off anyway without a terminal)"
    )
    run.set_defaults(handler=analyze)
    show_parser = commands.add_parser("show", help="summarise a curvlab HDF5 file")
    show_parser.add_argument("file")
    show_parser.set_defaults(handler=show)
    plot_parser = commands.add_parser("plot", help="redraw the figures of a curvlab HDF5 file")
    plot_parser.add_argument("file")
    plot_parser.add_argument("--out", help="figure folder (default: figures/ beside the file)")
    plot_parser.set_defaults(handler=plot_command)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``curvlab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CurvlabError, OSError) as error:  # bad input: one line, not a traceback
        print(f"curvlab: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
