r"""Figures of spectra, densities, training curves and approximation errors (matplotlib).

Headless: figures are ``matplotlib.figure.Figure`` objects built without pyplot,
so no display or backend is needed; ``save(fig, path)`` writes PNG/PDF/SVG.
Every function takes the live objects (tensors, ``SpectralDensity``,
``ComparisonReport``) or the records of a ``curvlab.Store``, and an optional
``ax`` to draw into an existing figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from curvlab import distributed
from curvlab.operators.base import CurvatureOperator
from curvlab.storage import Record, read


def _axes(ax: Axes | None, size=(6.0, 4.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def save(fig: Figure, path, dpi: int = 150) -> Path:
    """Write ``fig`` (format from the suffix) and return the path.

    Under ``torch.distributed`` only rank 0 writes (the path is returned on every rank).
    """
    path = Path(path)
    if not distributed.is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _array(x) -> np.ndarray:
    if isinstance(x, Record):
        return np.asarray(x.data["values"])
    if isinstance(x, CurvatureOperator):
        x = x.to_dense()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


# ---------------------------------------------------------------- spectra
def spectrum_histogram(eigenvalues, title: str = "", bins: int = 60, ax: Axes | None = None) -> Figure:
    """Histogram of an exact spectrum with a log count axis.

    PSD spectra (no eigenvalue below −1e-12·max|λ|) get logarithmic bins on a log
    eigenvalue axis, with the (numerically) zero eigenvalues counted in the
    legend; signed spectra (a Hessian) get a symmetric-log axis so both the bulk
    near zero and the outliers on either side are visible.

    Args:
        eigenvalues: A 1-d tensor/array or an ``eigenvalues`` record.
        title: Axes title.
        bins: Number of bins.
        ax: Draw into this axes.
    """
    values = _array(eigenvalues)
    fig, ax = _axes(ax)
    scale = max(np.abs(values).max(), 1e-300)
    tiny = 1e-12 * scale
    signed = bool((values < -tiny).any())
    if signed:
        threshold = max(np.abs(values[np.abs(values) > tiny]).min(initial=scale), tiny)
        edges = np.concatenate(
            [-np.geomspace(scale, threshold, bins // 2), np.geomspace(threshold, scale, bins // 2)]
        )
        edges = np.unique(np.concatenate([edges, [values.min(), values.max()]]))
        ax.hist(values, bins=edges, color="tab:blue", edgecolor="none")
        ax.set_xscale("symlog", linthresh=threshold)
        ax.axvline(0, color="black", lw=0.6)
        negative = (values < -tiny).mean()
        ax.set_title(title or f"signed spectrum ({negative:.1%} negative)")
    else:
        positive = values[values > tiny]
        zero = len(values) - len(positive)
        if len(positive):
            edges = np.geomspace(positive.min(), positive.max() * (1 + 1e-9), bins)
            ax.hist(positive, bins=edges, color="tab:blue", edgecolor="none", label=f"{len(positive)} > 0")
        ax.set_xscale("log")
        if zero:
            ax.plot([], [], " ", label=f"{zero} ≈ 0 (not shown)")
        ax.legend(fontsize=8)
        ax.set_title(title or "spectrum")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("count")
    return fig


def _density_arrays(density) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(density, Record):
        return np.asarray(density.data["grid"]), np.asarray(density.data["density"])
    return _array(density.grid), _array(density.density)


def densities(items: dict, ax: Axes | None = None, floor: float = 1e-6, title: str = "") -> Figure:
    """Spectral densities (SLQ) of several matrices overlaid, on a log density axis.

    Args:
        items: Label → ``SpectralDensity`` or ``spectral_density`` record.
        ax: Draw into this axes.
        floor: Densities below ``floor`` · max are clipped (log axis).
        title: Axes title.
    """
    fig, ax = _axes(ax)
    peak = 0.0
    for label, density in items.items():
        grid, values = _density_arrays(density)
        peak = max(peak, values.max())
        ax.plot(grid, np.maximum(values, 1e-300), label=label, lw=1.2)
    if np.isfinite(peak) and peak > 0:
        ax.set_yscale("log")
        ax.set_ylim(max(peak * floor, 1e-300), 3 * peak)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density φ(λ)")
    ax.set_title(title or "spectral densities (stochastic Lanczos quadrature)")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- over training
def evolution(records, quantity: str = "top_eigen", learning_rate: float | None = None, ax=None) -> Figure:
    """Top eigenvalues (or traces) against the training step.

    Args:
        records: Records of one name (e.g. ``store.records(name="hessian")``);
            those of kind ``quantity`` with a step are used.
        quantity: ``"top_eigen"`` (one line per eigenvalue rank) or ``"trace"``
            (with ±2 standard errors).
        learning_rate: If given, draw the stability edge 2/lr (thesis §3.1.2).
        ax: Draw into this axes.
    """
    fig, ax = _axes(ax)
    chosen = sorted((r for r in records if r.kind == quantity and r.step is not None), key=lambda r: r.step)
    steps = np.array([r.step for r in chosen])
    if quantity == "top_eigen" and chosen:
        k = min(len(r.data["values"]) for r in chosen)
        values = np.stack([np.asarray(r.data["values"])[:k] for r in chosen])
        for i in range(k):
            ax.plot(steps, values[:, i], marker="o", ms=3, lw=1, label="λ_max" if i == 0 else None)
        ax.set_ylabel(f"top {k} eigenvalues")
    elif quantity == "trace" and chosen:
        values = np.array([float(r.data["value"]) for r in chosen])
        errors = np.array([float(r.data["standard_error"]) for r in chosen])
        ax.errorbar(steps, values, yerr=2 * errors, marker="o", ms=3, capsize=2, label="trace ± 2 s.e.")
        ax.set_ylabel("trace")
    elif quantity not in ("top_eigen", "trace"):
        raise ValueError(f"quantity must be 'top_eigen' or 'trace', got {quantity!r}")
    if learning_rate:
        ax.axhline(2 / learning_rate, color="black", ls="--", lw=1, label="2 / learning rate")
    ax.set_xlabel("training step")
    ax.set_yscale("log")
    if chosen:
        label = {"top_eigen": "top eigenvalues", "trace": "trace"}[quantity]
        ax.set_title(f"{chosen[0].name}: {label} during training")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- approximation errors
def _report_dict(report) -> dict:
    return report.data if isinstance(report, Record) else report.to_dict()


def _short(block_name: str) -> str:
    return str(block_name).split(" + ")[0].rsplit(".", 1)[0]


def approximation_errors(reports: dict, metric: str = "rel_frobenius", ax=None, title: str = "") -> Figure:
    """Grouped bars: ``metric`` per layer (and overall) for each approximation.

    KFAC-type reports also show the best single Kronecker product's error as a
    black tick, so the loss of KFAC against the Kronecker structure is visible.

    Args:
        reports: Method label → ``ComparisonReport`` or ``comparison`` record.
        metric: ``"rel_frobenius"``, ``"rel_spectral"`` or ``"topk_subspace_overlap"``.
        ax: Draw into this axes.
        title: Axes title.
    """
    fig, ax = _axes(ax, size=(7.5, 4.2))
    tables = {label: _report_dict(r) for label, r in reports.items()}
    first = next(iter(tables.values()))
    groups = [_short(row["name"]) for row in first["blocks"]] + ["overall"]
    width = 0.8 / len(tables)
    drawn = []  # the values on the axis: a log axis needs one that is finite and positive
    for j, (label, table) in enumerate(tables.items()):
        values = [float(row.get(metric, np.nan)) for row in table["blocks"]] + [
            float(table["overall"][metric])
        ]
        positions = np.arange(len(groups)) + (j - (len(tables) - 1) / 2) * width
        bars = ax.bar(positions, np.maximum(values, 1e-17), width, label=label)
        drawn += values
        for x, value in zip(positions, values):
            if value < 1e-12:  # exact: invisible on a log axis
                colour = bars.patches[0].get_facecolor()
                ax.annotate(
                    "0", (x, 0), xycoords=("data", "axes fraction"), ha="center", fontsize=7, color=colour
                )
        bound = [float(row.get("optimal_kronecker_rel_frobenius", np.nan)) for row in table["blocks"]]
        if metric == "rel_frobenius" and not np.isnan(bound).all() and label.startswith("KFAC"):
            ax.scatter(positions[:-1], bound, marker="_", s=200, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), [g if g == "overall" else f"layer {g}" for g in groups])
    ax.set_ylabel(
        {"rel_frobenius": "‖A − E‖_F / ‖E‖_F", "rel_spectral": "‖A − E‖₂ / ‖E‖₂"}.get(metric, metric)
    )
    if any(np.isfinite(v) and v > 0 for v in drawn):  # else undefined everywhere (E = 0): no bars
        ax.set_yscale("log")
    ax.set_title(title or f"error against {first.get('exact', 'exact')} (— best Kronecker product)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def block_heatmaps(exact, approx, labels=("exact", "approximation"), title: str = "") -> Figure:
    """A dense block next to its approximation and their difference, one colour scale.

    Args:
        exact: ``(n, n)`` tensor/array, a curvature operator or block (made
            dense), or a ``dense_block`` record.
        approx: Same shape.
        labels: Panel titles of the first two panels.
        title: Figure title.
    """
    E = np.asarray(exact.data["matrix"]) if isinstance(exact, Record) else _array(exact)
    A = np.asarray(approx.data["matrix"]) if isinstance(approx, Record) else _array(approx)
    if E.shape != A.shape:
        raise ValueError(f"blocks differ in shape: {E.shape} vs {A.shape}")
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    limit = max(np.abs(E).max(), np.abs(A).max(), 1e-300)
    for ax, matrix, label in zip(axes, (E, A, A - E), (*labels, "difference")):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- a whole file
def plot_store(path, out_dir) -> list[Path]:
    """Redraw the standard figures of a store file into ``out_dir``; returns the paths.

    Per name: the spectrum histogram and top-eigenvalue/trace evolution; all
    densities of the last step overlaid; approximation errors of the last step;
    heat maps of dense-block pairs named ``<block>/exact`` and ``<block>/<approx>``.
    """
    records = read(path)
    out_dir = Path(out_dir)
    written = []
    names = sorted({r.name for r in records})
    for name in names:
        own = [r for r in records if r.name == name]
        exact = [r for r in own if r.kind == "eigenvalues"]
        if exact:
            last = exact[-1]
            suffix = f" (step {last.step})" if last.step is not None else ""
            fig = spectrum_histogram(last, title=f"{name}: exact spectrum{suffix}")
            written.append(save(fig, out_dir / f"spectrum_{_file(name)}.png"))
        for quantity in ("top_eigen", "trace"):
            if len({r.step for r in own if r.kind == quantity}) > 1:
                lr = next(
                    (r.settings.get("learning_rate") for r in own if r.settings.get("learning_rate")), None
                )
                fig = evolution(own, quantity, learning_rate=lr)
                written.append(save(fig, out_dir / f"{quantity}_{_file(name)}.png"))
    density_records = [r for r in records if r.kind == "spectral_density"]
    if density_records:
        step = max((r.step for r in density_records if r.step is not None), default=None)
        chosen = {r.name: r for r in density_records if r.step == step}
        written.append(save(densities(chosen), out_dir / "densities.png"))
    comparisons = [r for r in records if r.kind == "comparison"]
    if comparisons:
        step = max((r.step for r in comparisons if r.step is not None), default=None)
        by_exact: dict[str, dict] = {}
        for r in comparisons:
            if r.step == step:
                by_exact.setdefault(str(r.data.get("exact", "exact")), {})[
                    str(r.data.get("approx", r.name))
                ] = r
        for exact_name, reports in by_exact.items():
            fig = approximation_errors(
                reports, title=f"error against {exact_name}" + (f" (step {step})" if step is not None else "")
            )
            written.append(save(fig, out_dir / f"approximation_errors_{_file(exact_name)}.png"))
    blocks = [r for r in records if r.kind == "dense_block" and "/" in r.name]
    last_step = max((r.step for r in blocks if r.step is not None), default=None)
    blocks = [r for r in blocks if r.step == last_step]
    exact_blocks = {r.name.split("/")[0]: r for r in blocks if r.name.endswith("/exact")}
    for r in blocks:
        block, label = r.name.split("/", 1)
        if label != "exact" and block in exact_blocks:
            fig = block_heatmaps(exact_blocks[block], r, ("exact", label), title=f"block {block}")
            written.append(save(fig, out_dir / f"block_{_file(block)}_{_file(label)}.png"))
    return written


def _file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)).strip("_").lower()


__all__ = [
    "approximation_errors",
    "block_heatmaps",
    "densities",
    "evolution",
    "plot_store",
    "save",
    "spectrum_histogram",
]
