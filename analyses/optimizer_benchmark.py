"""The thesis' optimizer benchmark (§6.6): the deep autoencoder, every method tuned alike, loss vs time.

Deep autoencoder 64-1000-500-250-30-250-500-1000-64 (sigmoid, squared error) on
the embedded digits data (784-… on MNIST IDX files with ``--mnist-images``),
minibatch 200, curvature refreshed every 100 updates. Methods: SGD, momentum,
Nesterov, RMSProp, AdaGrad, Adam (torch.optim), SGD with momentum on a batch-norm
variant, CenteredSGD, ACP (fixed and heuristic α), KFAC, EKFAC, HessianFree, and
KFAC and ACP as Martens & Grosse run KFAC (statistics averaged every step, step
size and momentum from the exact quadratic model, Levenberg–Marquardt damping)
(curvlab.optim). Every method gets the same budget of the thesis' biased random
search (Algorithm 1) over its hyperparameters, each trial a short run judged by
its final training loss; the best setting then runs for a fixed wall-clock
time. Training and test loss are recorded against wall-clock time (evaluation
time excluded) and updates, stored in HDF5, drawn (every method its own colour and
line style), and summarised in a table of the time each method needs to reach a
target loss. The script then states the verdict of the thesis' claim: whether a
KFAC and an ACP variant reach the final training (and test) loss of the best
first-order method in at most half of that method's time; and, per method, the
time per update as a multiple of an SGD step and of its arithmetic floor (the
method's multiply-adds per update at this machine's measured GEMM rate).
``--task classifier`` runs the ReLU classification MLP of §4.3 instead.

Schedules (stated, the same for every run): the thesis' methods refresh statistics
and inverses every ``--curvature-every`` updates (100). The Martens & Grosse
variants ("rescaled") refresh statistics every update (running average 0.95) on
a quarter of the minibatch, inverses every 20 updates (their T₃), and take the
quadratic model's two curvature products on a quarter of the minibatch; KFAC's is
π-damped (their §6.3: two Cholesky inverses and two GEMMs per layer instead of
eigendecompositions and four). They adapt the Levenberg–Marquardt damping after
every update (T₂ = 1, not their 5) and take back an update that raised the
minibatch loss (``reject_uphill``): only a tested update can be taken back, and
with T₂ = 5 an ACP run's loss rose from 0.04 to 1137 between tests. λ may fall to
1e-14: on this loss (a mean over 64 outputs) the curvature of the first layers is
tiny, and KFAC left the plateau only once λ was near 1e-8.

    python analyses/optimizer_benchmark.py [--budget 6] [--tune-seconds 4] [--seconds 30]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
from curvlab import optim, plot, tune
from curvlab.data import load_digits, load_mnist_idx


def autoencoder(inputs: int, batch_norm: bool = False) -> nn.Sequential:
    """The thesis' deep autoencoder (sigmoid), optionally with batch norm before each activation."""
    sizes = [inputs, 1000, 500, 250, 30, 250, 500, 1000, inputs]
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def classifier(inputs: int, classes: int) -> nn.Sequential:
    """A ReLU MLP for classification (thesis §4.3)."""
    return nn.Sequential(
        nn.Linear(inputs, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes)
    )


LR = tune.LogUniform(1e-4, 3.0)
DAMPING = tune.LogUniform(1e-5, 1.0)


FIRST_ORDER = ("SGD", "momentum", "Nesterov", "RMSProp", "AdaGrad", "Adam", "SGD + batch norm")


def martens_grosse(batch_size: int) -> dict:
    """The schedules of the rescaled variants (Martens & Grosse 2015): T₁ = 1, T₂ = 5, T₃ = 20."""
    quarter = max(1, batch_size // 4)
    return {
        "rescale": "ggn",
        "damping_policy": "levenberg-marquardt",
        "curvature_every": 1,
        "ema_decay": 0.95,
        "inverse_every": 20,
        "damping_every": 1,
        "min_damping": 1e-14,
        "reject_uphill": True,
        "curvature_examples": quarter,
        "rescale_examples": quarter,
    }


def methods(every: int, batch_size: int = 200) -> dict:
    """Name → (factory(model, loss_fn, params) → optimizer, search space, batch-norm model?)."""
    torch_opt = torch.optim
    mg = martens_grosse(batch_size)
    return {
        "SGD": (lambda m, lf, p: torch_opt.SGD(m.parameters(), lr=p["lr"]), {"lr": LR}, False),
        "momentum": (
            lambda m, lf, p: torch_opt.SGD(m.parameters(), lr=p["lr"], momentum=p["momentum"]),
            {"lr": LR, "momentum": tune.Uniform(0.5, 0.99)},
            False,
        ),
        "Nesterov": (
            lambda m, lf, p: torch_opt.SGD(m.parameters(), lr=p["lr"], momentum=p["momentum"], nesterov=True),
            {"lr": LR, "momentum": tune.Uniform(0.5, 0.99)},
            False,
        ),
        "RMSProp": (
            lambda m, lf, p: torch_opt.RMSprop(m.parameters(), lr=p["lr"]),
            {"lr": tune.LogUniform(1e-5, 1e-1)},
            False,
        ),
        "AdaGrad": (
            lambda m, lf, p: torch_opt.Adagrad(m.parameters(), lr=p["lr"]),
            {"lr": tune.LogUniform(1e-4, 1.0)},
            False,
        ),
        "Adam": (
            lambda m, lf, p: torch_opt.Adam(m.parameters(), lr=p["lr"]),
            {"lr": tune.LogUniform(1e-5, 1e-1)},
            False,
        ),
        "SGD + batch norm": (
            lambda m, lf, p: torch_opt.SGD(m.parameters(), lr=p["lr"], momentum=0.9),
            {"lr": LR},
            True,
        ),
        "CenteredSGD": (
            lambda m, lf, p: optim.CenteredSGD(m, lf, lr=p["lr"], momentum=p["momentum"]),
            {"lr": LR, "momentum": tune.Uniform(0.0, 0.99)},
            False,
        ),
        "ACP (fixed α)": (
            lambda m, lf, p: optim.ACP(
                m, lf, alpha=p["alpha"], lr=p["lr"], damping=p["damping"], curvature_every=every
            ),
            {"lr": LR, "alpha": tune.LogUniform(1e-4, 10.0), "damping": DAMPING},
            False,
        ),
        "ACP (heuristic α)": (
            lambda m, lf, p: optim.ACP(m, lf, lr=p["lr"], damping=p["damping"], curvature_every=every),
            {"lr": LR, "damping": DAMPING},
            False,
        ),
        "ACP (rescaled)": (
            lambda m, lf, p: optim.ACP(m, lf, damping=p["damping"], **mg),
            {"damping": DAMPING},
            False,
        ),
        "KFAC": (
            lambda m, lf, p: optim.KFAC(
                m, lf, lr=p["lr"], damping=p["damping"], momentum=0.9, curvature_every=every
            ),
            {"lr": tune.LogUniform(1e-3, 1.0), "damping": DAMPING},
            False,
        ),
        "KFAC (rescaled)": (
            lambda m, lf, p: optim.KFAC(m, lf, damping=p["damping"], pi_damping=True, **mg),
            {"damping": DAMPING},
            False,
        ),
        "EKFAC": (
            lambda m, lf, p: optim.EKFAC(
                m, lf, lr=p["lr"], damping=p["damping"], momentum=0.9, curvature_every=every
            ),
            {"lr": tune.LogUniform(1e-3, 1.0), "damping": DAMPING},
            False,
        ),
        "HessianFree": (
            lambda m, lf, p: optim.HessianFree(m, lf, lr=p["lr"], damping=p["damping"], cg_iterations=10),
            {"lr": tune.LogUniform(0.1, 1.0), "damping": DAMPING},
            False,
        ),
    }


def gemm_rate(size: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 GEMM rate in FLOP/s (best of ``repeats``), the floor's clock."""
    A, B = torch.randn(size, size), torch.randn(size, size)
    A @ B
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        A @ B
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def floor_flops(name: str, model: nn.Module, batch_size: int, every: int, cg_iterations: int = 10) -> float:
    """Floating-point operations of one update of ``name``, amortised refreshes included.

    Per Linear layer (d_out × d_A, d_A = d_in + 1) and batch n: a gradient is 6nP (forward
    2nP, backward 4nP); a GGN product about 8nP (a forward-mode pass and a backward);
    factor statistics 2n(d_A² + d_out²) on top of their pass; an eigendecomposition
    9d³ and KFAC's exact damped preconditioning 4·d_out·d_A·(d_out + d_A) (four GEMMs in
    the eigenbases); π-damped KFAC a Cholesky inverse d³ per factor and two GEMMs,
    2·d_out·d_A·(d_out + d_A); ACP a Cholesky inverse d_A³ and one GEMM, 2·d_out·d_A².
    Elementwise work (Adam, momentum) is left out: it is O(P), below 1 % of the gradient here.
    """
    shapes = [(m.out_features, m.in_features + 1) for m in model.modules() if isinstance(m, nn.Linear)]
    P, n = sum(o * a for o, a in shapes), batch_size
    gradient = 6 * n * P
    if name in FIRST_ORDER or name == "CenteredSGD":
        return gradient
    if name == "HessianFree":  # CG products, their primal pass, one more closure for the damping
        return gradient + 2 * n * P + cg_iterations * 8 * n * P + gradient
    is_acp, pi_damped = name.startswith("ACP"), name == "KFAC (rescaled)"
    if is_acp:  # one GEMM with (A + λ/α I)⁻¹, by Cholesky
        precondition, inverse = (sum(2 * o * a * a for o, a in shapes), sum(a**3 for o, a in shapes))
    elif pi_damped:  # two GEMMs with Cholesky inverses of the π-damped factors
        precondition = sum(2 * o * a * (o + a) for o, a in shapes)
        inverse = sum(a**3 + o**3 for o, a in shapes)
    else:
        precondition = sum(4 * o * a * (o + a) for o, a in shapes)
        inverse = sum(9 * (a**3 + o**3) for o, a in shapes)
    if "rescaled" in name:
        settings = martens_grosse(n)
        q = settings["curvature_examples"]
        statistics = 6 * q * P + sum(2 * q * (a * a + (0 if is_acp else o * o)) for o, a in shapes)
        rescale = 2 * q * P + 2 * 8 * q * P  # primal pass and two GGN columns
        return (
            gradient
            + precondition
            + statistics
            + inverse / settings["inverse_every"]
            + rescale
            + gradient / settings["damping_every"]
        )
    statistics = 6 * n * P + sum(2 * n * (a * a + (0 if is_acp else o * o)) for o, a in shapes)
    return gradient + precondition + (statistics + inverse) / every


def train(make_model, make_opt, params, data, loss_fn, seconds, batch_size, seed, evaluations=30):
    """Train for ``seconds`` of wall-clock (evaluations excluded); return the curves."""
    (X, Y), (X_test, Y_test) = data
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(model, loss_fn, params)
    curvlab_step = isinstance(opt, (optim.CurvatureOptimizer, optim.CenteredSGD))
    generator = torch.Generator().manual_seed(seed)
    curve = {"seconds": [], "updates": [], "train": [], "test": []}
    elapsed, updates, next_eval = 0.0, 0, 0.0

    def evaluate():
        model.eval()
        with torch.no_grad():
            curve["seconds"].append(elapsed)
            curve["updates"].append(updates)
            curve["train"].append(loss_fn(model(X), Y).item())
            curve["test"].append(loss_fn(model(X_test), Y_test).item())
        model.train()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        while elapsed < seconds:
            if elapsed >= next_eval:
                evaluate()
                next_eval += seconds / evaluations
                if not math.isfinite(curve["train"][-1]):
                    break
            start = time.perf_counter()
            index = torch.randint(0, X.shape[0], (batch_size,), generator=generator)
            batch = (X[index], Y[index])

            def closure(batch=batch):
                opt.zero_grad()
                loss = loss_fn(model(batch[0]), batch[1])
                loss.backward()
                return loss

            try:
                opt.step(closure, batch=batch) if curvlab_step else opt.step(closure)
            except cl.CurvlabError:
                break
            updates += 1
            elapsed += time.perf_counter() - start
    evaluate()
    return curve


LINE_STYLES = ("-", "--", "-.", ":")


def curve_style(index: int) -> dict:
    """Method ``index``'s colour (20 distinct, tab20) and line style: no two curves alike."""
    from matplotlib import colormaps

    return {"color": colormaps["tab20"](index % 20), "linestyle": LINE_STYLES[index % len(LINE_STYLES)]}


def seconds_to(curve: dict, split: str, target: float) -> float:
    """Wall-clock seconds until ``curve``'s ``split`` loss first reaches ``target`` (inf: never)."""
    hits = [s for s, loss in zip(curve["seconds"], curve[split]) if loss <= target]
    return hits[0] if hits else math.inf


def thesis_verdict(results: dict, split: str) -> str:
    """Whether a KFAC and an ACP variant reach the best first-order final loss in half its time."""
    first = [n for n in results if n in FIRST_ORDER and math.isfinite(results[n][split][-1])]
    if not first:
        return f"{split}: no first-order method ran"
    best = min(first, key=lambda n: results[n][split][-1])
    target = results[best][split][-1]
    budget = seconds_to(results[best], split, target)
    lines = [
        f"{split} loss: best first-order {best}, {target:.5f} at {budget:.1f} s; half: {budget / 2:.1f} s"
    ]
    holds = []
    for family in ("KFAC", "ACP"):
        variants = [n for n in results if family in n]  # EKFAC is a KFAC variant
        if not variants:
            continue
        times = {n: seconds_to(results[n], split, target) for n in variants}
        fastest = min(times, key=times.get)
        holds.append(times[fastest] <= budget / 2)
        shown = ", ".join(f"{n} {'never' if math.isinf(t) else f'{t:.1f} s'}" for n, t in times.items())
        lines.append(f"  {family}: {shown}")
    verdict = "holds" if holds and all(holds) else "does not hold"
    lines.append(
        f"  the thesis' ranking (KFAC and ACP in at most half the time) {verdict} on the {split} loss"
    )
    return "\n".join(lines)


def report_costs(results: dict, model: nn.Module, args) -> dict:
    """Print and return per method: seconds per update, × an SGD update, × its arithmetic floor."""
    rate = gemm_rate()
    costs = {}
    for name, curve in results.items():
        updates = curve["updates"][-1]
        costs[name] = curve["seconds"][-1] / updates if updates else math.nan
    sgd = costs.get("SGD", math.nan)
    print(f"\ncost per update (float32 GEMM rate here {rate / 1e9:.0f} GFLOP/s):")
    print(f"  {'method':<20}{'ms/update':>10}{'x SGD':>8}{'floor ms':>10}{'x floor':>9}{'updates':>9}")
    table = {}
    for name, seconds in costs.items():
        floor = floor_flops(name, model, args.batch_size, args.curvature_every) / rate
        table[name] = [seconds, seconds / sgd, floor, seconds / floor, results[name]["updates"][-1]]
        print(
            f"  {name:<20}{1e3 * seconds:>10.1f}{seconds / sgd:>8.1f}{1e3 * floor:>10.1f}"
            f"{seconds / floor:>9.1f}{results[name]['updates'][-1]:>9}"
        )
    return table


def main():
    """Tune every method alike, run the best settings, write HDF5, figures and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/optimizer_benchmark")
    parser.add_argument("--task", choices=["autoencoder", "classifier"], default="autoencoder")
    parser.add_argument("--methods", nargs="+", help="a subset of the methods (default: all)")
    parser.add_argument("--budget", type=int, default=6, help="biased-random-search trials per method")
    parser.add_argument("--tune-seconds", type=float, default=4.0, help="wall-clock seconds per trial")
    parser.add_argument("--seconds", type=float, default=30.0, help="wall-clock seconds of the final runs")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--curvature-every", type=int, default=100)
    parser.add_argument("--mnist-images", help="MNIST IDX images (with --mnist-labels) instead of digits")
    parser.add_argument("--mnist-labels")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mnist_images:
        X_all, y_all = load_mnist_idx(args.mnist_images, args.mnist_labels)
        split = int(0.85 * X_all.shape[0])
        (X, y), (X_test, y_test) = (X_all[:split], y_all[:split]), (X_all[split:], y_all[split:])
        dataset = "MNIST (user files)"
    else:
        (X, y), (X_test, y_test) = load_digits(seed=args.seed)
        dataset = "digits (scikit-learn)"
    inputs = X.shape[1]
    if args.task == "autoencoder":
        data, loss_fn = ((X, X), (X_test, X_test)), nn.MSELoss()
        make = {False: lambda: autoencoder(inputs), True: lambda: autoencoder(inputs, batch_norm=True)}
    else:
        data, loss_fn = ((X, y), (X_test, y_test)), nn.CrossEntropyLoss()
        make = {False: lambda: classifier(inputs, int(y.max()) + 1)}
    table = methods(args.curvature_every, args.batch_size)
    chosen = args.methods or [m for m in table if args.task == "autoencoder" or not table[m][2]]
    path = out / f"optimizer_benchmark_{args.task}.h5"
    cl.storage.remove(path)
    store = cl.Store(path)
    results = {}
    print(
        f"{args.task} on {dataset}: {X.shape[0]} training examples, batch {args.batch_size}, "
        f"{args.budget} trials × {args.tune_seconds:g} s per method, final runs {args.seconds:g} s"
    )
    for name in chosen:
        factory, space, batch_norm = table[name]

        def objective(params, factory=factory, batch_norm=batch_norm):
            curve = train(
                make[batch_norm],
                factory,
                params,
                data,
                loss_fn,
                args.tune_seconds,
                args.batch_size,
                args.seed,
                4,
            )
            return curve["train"][-1]

        search = tune.biased_random_search(objective, space, args.budget, seed=args.seed)
        best, cost = search.best
        curve = train(
            make[batch_norm], factory, best, data, loss_fn, args.seconds, args.batch_size, args.seed
        )
        results[name] = curve
        store.save(
            name,
            {k: np.asarray(v, dtype=float) for k, v in curve.items()},
            settings={**best, "tuning_trials": len(search.history), "tuning_cost": cost},
            dataset=dataset,
            task=args.task,
        )
        print(
            f"{name:<20} best {best}  final train {curve['train'][-1]:.5f}  test {curve['test'][-1]:.5f}  "
            f"({curve['updates'][-1]} updates)",
            flush=True,
        )
    finite = [c["train"][-1] for c in results.values() if math.isfinite(c["train"][-1])]
    start = max(c["train"][0] for c in results.values())
    best = min(finite) if finite else start
    # Targets log-spaced from just below the starting loss to just above the best final loss.
    targets = list(np.geomspace(0.9 * start, 1.1 * best, 4)) if best < start else [start]
    reached = {}
    for name, curve in results.items():
        reached[name] = []
        for target in targets:
            hits = [s for s, loss in zip(curve["seconds"], curve["train"]) if loss <= target]
            reached[name].append(hits[0] if hits else math.inf)
    print("\nwall-clock seconds to reach each training loss (evaluation excluded; '-' not reached):")
    print(f"  {'method':<20}" + "".join(f"{t:>11.4g}" for t in targets))
    for name in sorted(reached, key=lambda n: (sum(math.isinf(v) for v in reached[n]), reached[n][::-1])):
        print(
            f"  {name:<20}" + "".join(f"{'-':>11}" if math.isinf(v) else f"{v:>11.1f}" for v in reached[name])
        )
    winner = min(results, key=lambda n: results[n]["train"][-1])
    print(f"\nlowest training loss after {args.seconds:g} s: {winner} ({results[winner]['train'][-1]:.5f})")
    per_update = report_costs(results, make[False](), args)
    verdicts = {split: thesis_verdict(results, split) for split in ("train", "test")}
    print("\n" + "\n".join(verdicts.values()))
    store.save(
        "time to targets",
        {"targets": np.asarray(targets), **{k: np.asarray(v) for k, v in reached.items()}},
        settings={"winner": winner, **{f"verdict_{split}": text for split, text in verdicts.items()}},
    )
    store.save("cost per update", {k: np.asarray(v, dtype=float) for k, v in per_update.items()})
    target = targets[-1]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for index, (name, curve) in enumerate(results.items()):
        style = curve_style(index)
        axes[0].plot(curve["seconds"], curve["train"], label=name, **style)
        axes[1].plot(curve["updates"], curve["train"], label=name, **style)
        axes[2].plot(curve["seconds"], curve["test"], label=name, **style)
    for ax, (xlabel, ylabel) in zip(
        axes, [("wall-clock s", "training loss"), ("updates", "training loss"), ("wall-clock s", "test loss")]
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.axhline(target, color="black", ls=":", lw=0.8)
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"{args.task} on {dataset}: each method tuned by biased random search ({args.budget} trials)"
    )
    figure = plot.save(fig, out / f"optimizer_benchmark_{args.task}.png")
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
