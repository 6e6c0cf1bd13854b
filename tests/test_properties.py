"""A property-based sweep (hypothesis): random small problems, records and command lines.

* Every exact operator's dense matrix, products and quadratic forms against the
  independent ``curvlab.reference`` matrices, over random Linear/Conv1d/Conv2d
  stacks (widths, activations, kernels, strides, paddings, dilations, bias on/off),
  losses, reductions, batch splits, parameter subsets and dtypes.
* The exact diagonal of each; KFAC and EKFAC where they are provably exact: one
  example, Linear layers, type-2 (their blocks are the exact GGN's).
* ``Store`` round trips of random records (names, shapes, dtypes, keys named like
  record attributes or holding ``/``).
* The ``curvlab`` command's arguments from random strings: a valid value is
  parsed as given, anything else is one line and exit status 2.

Profiles: ``ci`` (default; derandomized, so CI sees the same examples every run,
bounded to well under a minute) and ``long`` (20× the examples, random):
``CURVLAB_HYPOTHESIS=long python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from torch import nn

import curvlab as cl
from curvlab import cli, reference
from curvlab.storage import Record, Store, read
from tests.helpers import assert_close_rel

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
PROFILE = os.environ.get("CURVLAB_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)
SCALE = 20 if PROFILE == "long" else 1


def examples(n: int):
    """``n`` examples in CI, 20 n in the long profile."""
    return settings(max_examples=n * SCALE)


# ---------------------------------------------------------------- random problems
ACTIVATIONS = [nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.Softplus, nn.ReLU, nn.Identity]
OPERATORS = {
    "hessian": (cl.Hessian, reference.hessian_matrix),
    "ggn": (cl.GGN, reference.ggn),
    "fisher": (cl.Fisher, reference.fisher),
    "ef": (cl.EmpiricalFisher, reference.empirical_fisher),
}


def _conv_output(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def architectures(draw, linear_only: bool = False):
    """``(model builder, input shape (without N), output width)`` of a random small stack."""
    kind = "linear" if linear_only else draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    layers: list = []
    if kind == "linear":
        width = draw(st.integers(1, 4))
        input_shape = (width,)
    else:
        spatial = 1 if kind == "conv1d" else 2
        channels = draw(st.integers(1, 2))
        side = draw(st.integers(2, 5))
        input_shape = (channels, *([side] * spatial))
        conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        for _ in range(draw(st.integers(1, 2))):
            kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            padding, dilation = draw(st.integers(0, 1)), draw(st.integers(1, 2))
            if _conv_output(side, kernel, stride, padding, dilation) < 1:
                continue
            out_channels = draw(st.integers(1, 3))
            bias = draw(st.booleans())
            mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if padding else "zeros"
            if mode == "reflect" and padding >= side:
                mode = "zeros"
            layers.append(
                (
                    conv,
                    (channels, out_channels, kernel),
                    {
                        "stride": stride,
                        "padding": padding,
                        "dilation": dilation,
                        "bias": bias,
                        "padding_mode": mode,
                    },
                )
            )
            layers.append((draw(st.sampled_from(ACTIVATIONS)), (), {}))
            channels, side = out_channels, _conv_output(side, kernel, stride, padding, dilation)
        layers.append((nn.Flatten, (), {}))
        width = channels * side**spatial
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(1, 4))
        layers.append((nn.Linear, (width, out), {"bias": draw(st.booleans())}))
        layers.append((draw(st.sampled_from(ACTIVATIONS)), (), {}))
        width = out
    outputs = draw(st.integers(2, 3))
    layers.append((nn.Linear, (width, outputs), {"bias": draw(st.booleans())}))

    def build():
        return nn.Sequential(*[layer(*args, **options) for layer, args, options in layers])

    return build, input_shape, outputs


@st.composite
def problems(draw, linear_only: bool = False, max_examples: int = 6, dtype=None):
    """A random ``cl.Problem`` (with a description for failure messages)."""
    build, input_shape, outputs = draw(architectures(linear_only))
    loss = draw(st.sampled_from(["mse", "ce", "bce"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    sizes = []
    for size in draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)):
        size = min(size, max_examples - sum(sizes))
        if size > 0:
            sizes.append(size)
    dtype = dtype or draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = build().to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    data = []
    for size in sizes:
        X = torch.randn((size, *input_shape), generator=generator, dtype=torch.float64).to(dtype)
        if loss == "ce":
            y = torch.randint(0, outputs, (size,), generator=generator)
        elif loss == "bce":
            y = torch.rand((size, outputs), generator=generator, dtype=torch.float64).to(dtype)
        else:
            y = torch.randn((size, outputs), generator=generator, dtype=torch.float64).to(dtype)
        data.append((X, y))
    all_params = list(model.parameters())
    chosen = draw(st.lists(st.sampled_from(range(len(all_params))), min_size=1, unique=True))
    params = (
        None
        if len(chosen) == len(all_params) and chosen == sorted(chosen)
        else [all_params[i] for i in chosen]
    )
    loss_fn = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[loss](
        reduction=reduction
    )
    problem = cl.Problem(model, loss_fn, data, params=params)
    problem.description = f"{model} {loss}/{reduction} batches {sizes} params {chosen} {dtype}"
    return problem


def _tolerance(dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 5e-4


@examples(60)
@given(problem=problems(), name=st.sampled_from(sorted(OPERATORS)))
def test_exact_operators_match_the_reference(problem, name):
    operator_class, reference_fn = OPERATORS[name]
    C = operator_class(problem)
    expected = reference_fn(problem)
    rtol, what = _tolerance(problem.dtype), f"{name}: {problem.description}"
    assert_close_rel(C.to_dense(), expected, rtol, what)
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(C.shape[0], 2, generator=generator, dtype=torch.float64)
    product = C @ V.to(problem.dtype)
    assert_close_rel(product, expected.to(problem.dtype) @ V.to(problem.dtype), rtol, f"product, {what}")
    forms = C.quadratic_forms(V.to(problem.dtype))
    assert_close_rel(forms, ((expected @ V) * V).sum(0), rtol, f"forms, {what}")
    assert_close_rel(cl.Diagonal(C).diagonal, expected.diagonal(), rtol, f"diagonal, {what}")


@examples(30)
@given(problem=problems(linear_only=True, max_examples=1, dtype=torch.float64))
def test_kfac_and_ekfac_on_one_example_are_the_exact_ggn_blocks(problem):
    """One example, Linear layers, type-2 KFAC (expand) and EKFAC: each block is the GGN's block."""
    problem = cl.Problem(problem.model, problem.loss_fn, problem.data)  # every parameter: whole layers
    G = reference.ggn(problem)
    offsets = cl.GGN(problem).block_offsets()
    for K in (cl.KFAC(problem, fisher_type="type-2"), cl.EKFAC(problem)):
        for block, indices in zip(K.blocks(), K.block_indices):
            index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
            what = f"{type(K).__name__} block {indices}: {problem.model} {problem.loss_fn}"
            assert_close_rel(block.to_dense(), G[index][:, index], 1e-9, what)


# ---------------------------------------------------------------- store round trips
KEYS = st.one_of(
    st.sampled_from(["kind", "name", "step", "created", "curvature", "method", "settings", "provenance"]),
    st.text(alphabet=string.ascii_letters + string.digits + "_-./ λ", min_size=1, max_size=12),
)
ARRAYS = arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_]),
    shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


@examples(40)
@given(
    name=st.text(min_size=1, max_size=20).filter(lambda text: "\x00" not in text),
    step=st.one_of(st.none(), st.integers(0, 2**40)),
    data=st.dictionaries(KEYS, ARRAYS, min_size=1, max_size=4),
    numbers=st.dictionaries(KEYS, st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
)
def test_store_round_trips_random_records(tmp_path_factory, name, step, data, numbers):
    path = tmp_path_factory.mktemp("store") / "run.h5"
    store = Store(path)
    with store.transaction():
        store.append(Record("arrays", name, step, data))
        store.save(name, numbers, step=step)
    arrays_record, scalars_record = read(path)
    assert (arrays_record.name, arrays_record.step) == (name, step)
    assert sorted(arrays_record.data) == sorted(data)
    for key, value in data.items():
        back = arrays_record.data[key]
        assert np.asarray(back).dtype == value.dtype and np.shape(back) == value.shape, key
        np.testing.assert_array_equal(back, value)
    assert sorted(scalars_record.data) == sorted(numbers)
    for key, value in numbers.items():
        back = float(scalars_record.data[key])
        assert back == value or (math.isnan(back) and math.isnan(value)), key


# ---------------------------------------------------------------- the command line
FLAGS = {
    "--steps": 0,
    "--checkpoints": 1,
    "--hidden": 1,
    "--batch-size": 1,
    "--k": 1,
    "--exact-limit": 0,
    "--examples": 1,
    "--seed": 0,
}


def _parse(argv: list[str]):
    """``(namespace, None)`` or ``(None, stderr)`` when the parser exits with status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return cli.build_parser().parse_args(argv), None
        except SystemExit as exit_info:
            assert exit_info.code == 2
            return None, err.getvalue()


@examples(60)
@given(flag=st.sampled_from(sorted(FLAGS)), text=st.text(max_size=8))
def test_integer_flags_take_valid_integers_and_refuse_the_rest_in_one_line(flag, text):
    args, err = _parse(["analyze", flag, text])
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is not None and value >= FLAGS[flag]:
        assert args is not None, err
        parsed = getattr(args, flag[2:].replace("-", "_"))
        assert parsed == ([value] if flag == "--hidden" else value)
    else:
        assert args is None and err.startswith(f"curvlab: argument {flag}: ") and err.count("\n") == 1, err


@examples(40)
@given(text=st.text(max_size=10))
def test_the_learning_rate_and_device_flags(text):
    args, err = _parse(["analyze", "--lr", text])
    try:
        valid = math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        valid = False
    assert (args is not None and args.lr == float(text)) if valid else (args is None and err.count("\n") == 1)
    args, err = _parse(["analyze", "--device", text])
    if args is None:
        assert err.startswith("curvlab: argument --device: ") and err.count("\n") == 1
    else:
        assert torch.device(text).type in ("cpu", "cuda")


@examples(4)
@given(
    hidden=st.integers(1, 3),
    examples_=st.integers(1, 40),
    steps=st.integers(0, 2),
    checkpoints=st.integers(1, 2),
    k=st.integers(1, 5),
    batch_size=st.integers(1, 64),
    exact_limit=st.sampled_from([0, 10_000]),
)
def test_the_main_job_runs_on_random_valid_settings(
    tmp_path_factory, hidden, examples_, steps, checkpoints, k, batch_size, exact_limit
):
    out = tmp_path_factory.mktemp("analyze")
    argv = ["analyze", "--hidden", str(hidden), "--examples", str(examples_), "--steps", str(steps)]
    argv += ["--checkpoints", str(checkpoints), "--k", str(k), "--batch-size", str(batch_size)]
    argv += ["--exact-limit", str(exact_limit), "--out", str(out), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    assert code == 0, argv
    assert read(out / "analysis.h5")


@pytest.mark.parametrize("command", ["show", "plot"])
@examples(10)
@given(text=st.binary(max_size=64))
def test_show_and_plot_of_random_bytes_are_one_line(tmp_path_factory, command, text):
    path = tmp_path_factory.mktemp("bytes") / "random.h5"
    path.write_bytes(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main([command, str(path)]) == 2
    assert err.getvalue().startswith("curvlab: ") and err.getvalue().count("\n") == 1
