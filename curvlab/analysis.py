r"""The main job behind ``curvlab analyze``: train, and analyse the curvature at checkpoints.

At every checkpoint of a minibatch-SGD run the job builds the exact Hessian,
GGN, Fisher and empirical Fisher and the approximations KFAC, EKFAC, ACP and the
exact diagonal of the GGN; it computes their spectra (exact eigenvalues when the
matrix has at most ``exact_limit`` rows, else Lanczos top-k, a Hutch++ trace and
an SLQ density), conditioning, the Hessian's negative share, the curvature along
the gradient, and compares every approximation with the exact GGN and the GGN
with the Hessian. Everything of a checkpoint is appended to one HDF5 store in a
single atomic transaction, so an interrupted run keeps every finished checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import curvlab as cl
from curvlab import distributed
from curvlab.operators.exact import EXACT
from curvlab.progress import progress_bar
from curvlab.storage import Store


@dataclass
class Settings:
    """Options of the analysis (the ``curvlab analyze`` flags)."""

    steps: int = 300
    checkpoints: int = 4
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 256
    k: int = 10
    exact_limit: int = 3000
    num_matvecs: int = 99
    slq_probes: int = 10
    slq_steps: int = 60
    seed: int = 0
    progress: bool | None = None
    dataset: str = "digits"
    extra: dict = field(default_factory=dict)


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """``checkpoints`` evenly spaced steps from 0 to ``steps`` inclusive (at least the last)."""
    if checkpoints <= 1:
        return [steps]
    return sorted({round(i * steps / (checkpoints - 1)) for i in range(checkpoints)})


def _batches(X, y, batch_size):
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]


def _exact_operators(problem: cl.Problem) -> dict:
    return {name: operator(problem) for name, operator in EXACT.items()}


def _approximations(problem: cl.Problem, ggn) -> dict:
    return {
        "KFAC": cl.KFAC(problem),
        "KFAC (MC)": cl.KFAC(problem, fisher_type="mc", seed=0),
        "EKFAC": cl.EKFAC(problem),
        "ACP": cl.ACP(problem),
        "diagonal": cl.Diagonal(ggn),
        "empirical Fisher": cl.EmpiricalFisher(problem),
    }


def analyse_checkpoint(problem: cl.Problem, store: Store, step: int, settings: Settings) -> dict:
    """Spectra, diagnostics and comparisons of one checkpoint, stored in one transaction.

    Returns a summary dict of the headline numbers (for the printed table).
    """
    summary = {"step": step, "loss": problem.loss().item()}
    origin = {"dataset": settings.dataset, "problem": problem}
    n = problem.num_params
    exact = n <= settings.exact_limit
    operators = _exact_operators(problem)
    dense = {}
    bar = progress_bar(total=len(operators) + 7, desc=f"step {step}", enabled=settings.progress)
    with store.transaction():
        for name, C in operators.items():
            top_settings = {"learning_rate": settings.lr} if name == "hessian" else {}
            if exact:
                dense[name] = cl.DenseOperator(C.to_dense(), C.param_shapes, C.param_names)
                eigenvalues = cl.eigvalsh(dense[name])
                store.save(name, eigenvalues, step, curvature=C, **origin)
                top = cl.top_eigen(dense[name], settings.k, progress=False)
                trace = cl.trace(dense[name], "exact")
                spectral = dense[name]
            else:
                top = cl.top_eigen(C, settings.k, progress=False)
                trace = cl.trace(C, "hutch++", settings.num_matvecs, seed=settings.seed, progress=False)
                spectral = C
            store.save(name, top, step, settings={**top_settings, "k": settings.k}, curvature=C, **origin)
            store.save(name, trace, step, curvature=C, **origin)
            density = cl.spectral_density(
                spectral, settings.slq_probes, settings.slq_steps, seed=settings.seed, progress=False
            )
            store.save(name, density, step, curvature=C, **origin)
            summary[f"{name}_lambda_max"] = top.values[0].item()
            summary[f"{name}_trace"] = trace.value
            bar.update(1)
        ggn = dense.get("ggn", operators["ggn"])
        hessian = dense.get("hessian", operators["hessian"])
        method = "exact" if exact else "lanczos"
        condition = cl.condition_number(ggn, method=method, progress=False, max_matvecs=200)
        rtol = condition.cutoff / condition.lambda_max if condition.lambda_max > 0 else math.nan
        store.save("ggn", condition, step, settings={"rtol": rtol}, **origin)
        lambda_max = summary["hessian_lambda_max"]
        negative = cl.negative_eigenvalue_share(hessian, method=method if exact else "slq", progress=False)
        along = cl.curvature_along_gradient(operators["hessian"])
        store.save(
            "hessian",
            {
                "negative_share": negative,
                # No curvature-set learning rate where λ_max ≤ 0 (a saturated model: H = 0).
                "learning_rate_1_over_lambda_max": 1 / lambda_max if lambda_max > 0 else math.inf,
            },
            step,
            **origin,
        )
        store.save("gradient_curvature", along, step, curvature=operators["hessian"], **origin)
        summary.update(
            ggn_condition=condition.value, hessian_negative_share=negative, best_step=along.best_step
        )
        bar.update(1)
        approximations = _approximations(problem, operators["ggn"])
        for label, approx in approximations.items():
            report = cl.compare(approx, ggn, k=settings.k, approx_name=label, exact_name="GGN")
            store.save(f"{label} vs GGN", report, step, curvature=approx, **origin)
            summary[f"{label} rel_frobenius"] = report.overall.get("rel_frobenius", float("nan"))
            summary[f"{label} scaled"] = report.overall.get("rel_frobenius_scaled", float("nan"))
            bar.update(1)
        report = cl.compare(ggn, hessian, k=settings.k, approx_name="GGN", exact_name="Hessian")
        store.save("GGN vs Hessian", report, step, curvature=operators["ggn"], **origin)
        summary["GGN vs Hessian rel_frobenius"] = report.overall.get("rel_frobenius", float("nan"))
        summary["GGN vs Hessian scaled"] = report.overall.get("rel_frobenius_scaled", float("nan"))
        if exact:
            # The last layer's GGN block next to its KFAC approximation (heat maps).
            kfac = approximations["KFAC"]
            index = len(kfac.block_sources) - 1
            layer = kfac.block_sources[index][0].name
            block = ggn.blocks(by="layer")[-1].to_dense()
            approx_block = kfac.blocks()[index].to_dense()
            if block.shape == approx_block.shape:
                store.save(f"{layer}/exact", block, step, **origin)
                store.save(f"{layer}/KFAC", approx_block, step, **origin)
    bar.close()
    return summary


def train_and_analyse(
    model: nn.Module, train_data, store: Store, settings: Settings, log=print
) -> list[dict]:
    """Minibatch SGD with momentum on cross-entropy, analysing at the checkpoints."""
    X, y = train_data
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = checkpoint_steps(settings.steps, settings.checkpoints)
    # Under torch.distributed each rank holds a contiguous share of the batches: one global problem.
    problem = cl.Problem(model, loss_fn, distributed.shard(_batches(X, y, settings.batch_size)))
    summaries = []
    bar = progress_bar(total=settings.steps, desc="training", enabled=settings.progress)
    for step in range(settings.steps + 1):
        if step in checkpoints:
            start = time.perf_counter()
            summaries.append(analyse_checkpoint(problem, store, step, settings))
            log(_summary_line(summaries[-1], time.perf_counter() - start))
        if step == settings.steps:
            break
        index = torch.randint(0, X.shape[0], (settings.batch_size,), generator=generator).to(X.device)
        optimizer.zero_grad()
        loss = loss_fn(model(X[index]), y[index])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {loss.item()}; lower --lr")
        loss.backward()
        optimizer.step()
        bar.update(1)
    bar.close()
    return summaries


SUMMARY_HEADER = (
    f"{'step':>6}{'loss':>9}{'λmax(H)':>11}{'λmax(GGN)':>11}{'tr(H)':>10}{'κ(GGN)':>10}"
    f"{'neg(H)':>8}{'ε*':>9}{'KFAC err':>10}{'time':>7}"
)


def _summary_line(s: dict, seconds: float) -> str:
    return (
        f"{s['step']:>6}{s['loss']:>9.4f}{s['hessian_lambda_max']:>11.4g}{s['ggn_lambda_max']:>11.4g}"
        f"{s['hessian_trace']:>10.4g}{s['ggn_condition']:>10.3g}{s['hessian_negative_share']:>8.1%}"
        f"{s['best_step']:>9.3g}{s['KFAC rel_frobenius']:>10.3f}{seconds:>6.1f}s"
    )
