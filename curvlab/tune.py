r"""Hyperparameter search: the thesis' biased random search (Algorithm 1), grid and random search.

A search space maps names to dimensions: ``LogUniform(low, high)`` (sampled and
compared on a log scale — learning rates, damping), ``Uniform(low, high)`` or
``Choice(values)``. ``objective(params) -> cost`` is minimised (a non-finite cost,
e.g. a diverged run, counts as the worst).

**Biased random search** (thesis Algorithm 1): a cost model predicts the cost of
a random candidate by its nearest evaluated neighbour (1-NN in the normalised
space); the candidate is evaluated with probability
(c_max − c_est) / (c_max − c_min), so the budget goes to promising regions while
every region keeps a chance. All searches are seeded and return the history.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from curvlab.options import check_count


@dataclass(frozen=True)
class LogUniform:
    """A positive dimension searched on a log scale."""

    low: float
    high: float

    def __post_init__(self):
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> float:  # noqa: D102
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))

    def unit(self, value: float) -> float:  # noqa: D102
        return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))

    def grid(self, points: int) -> list[float]:  # noqa: D102
        if points == 1:
            return [math.sqrt(self.low * self.high)]
        ratio = (self.high / self.low) ** (1 / (points - 1))
        return [self.low * ratio**i for i in range(points)]


@dataclass(frozen=True)
class Uniform:
    """A real dimension searched on a linear scale."""

    low: float
    high: float

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> float:  # noqa: D102
        return rng.uniform(self.low, self.high)

    def unit(self, value: float) -> float:  # noqa: D102
        return (value - self.low) / (self.high - self.low)

    def grid(self, points: int) -> list[float]:  # noqa: D102
        if points == 1:
            return [(self.low + self.high) / 2]
        return [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]


@dataclass(frozen=True)
class Choice:
    """A categorical dimension (distance 0 if equal, 1 otherwise)."""

    values: tuple

    def __init__(self, values: Sequence):
        object.__setattr__(self, "values", tuple(values))
        if not self.values:
            raise ValueError("Choice needs at least one value")

    def sample(self, rng: random.Random):  # noqa: D102
        return rng.choice(self.values)

    def unit(self, value) -> float:  # noqa: D102
        return self.values.index(value) / max(len(self.values) - 1, 1)

    def grid(self, points: int) -> list:  # noqa: D102
        return list(self.values)


@dataclass
class SearchResult:
    """Evaluated candidates in order, and the best.

    Attributes:
        history: ``(params, cost)`` pairs in evaluation order.
        proposals: Candidates drawn (evaluated or rejected; biased search only).
    """

    history: list[tuple[dict, float]] = field(default_factory=list)
    proposals: int = 0

    @property
    def best(self) -> tuple[dict, float]:
        """The ``(params, cost)`` of least cost."""
        return min(self.history, key=lambda item: item[1])


def _cost(objective, params) -> float:
    value = float(objective(params))
    return value if math.isfinite(value) else math.inf


def _distance(space: dict, a: dict, b: dict) -> float:
    total = 0.0
    for name, dimension in space.items():
        if isinstance(dimension, Choice):
            total += 0.0 if a[name] == b[name] else 1.0
        else:
            total += (dimension.unit(a[name]) - dimension.unit(b[name])) ** 2
    return math.sqrt(total)


def random_search(
    objective: Callable[[dict], float], space: dict, budget: int, seed: int = 0
) -> SearchResult:
    """``budget`` independent random candidates."""
    budget = check_count("budget", budget)
    rng = random.Random(seed)
    result = SearchResult()
    for _ in range(budget):
        params = {name: dimension.sample(rng) for name, dimension in space.items()}
        result.history.append((params, _cost(objective, params)))
    result.proposals = budget
    return result


def grid_search(objective: Callable[[dict], float], space: dict, points: int = 5) -> SearchResult:
    """Every combination of ``points`` values per dimension (log-spaced for ``LogUniform``)."""
    points = check_count("points", points)
    result = SearchResult()
    combos: list[dict] = [{}]
    for name, dimension in space.items():
        combos = [{**c, name: value} for c in combos for value in dimension.grid(points)]
    for params in combos:
        result.history.append((params, _cost(objective, params)))
    result.proposals = len(combos)
    return result


def biased_random_search(
    objective: Callable[[dict], float],
    space: dict,
    budget: int,
    seed: int = 0,
    initial: int = 3,
    max_proposals: int | None = None,
) -> SearchResult:
    """Thesis Algorithm 1: random candidates, accepted by a 1-nearest-neighbour cost model.

    Args:
        objective: ``params → cost`` to minimise.
        space: Name → ``LogUniform`` / ``Uniform`` / ``Choice``.
        budget: Objective evaluations.
        seed: Seed of the candidates and acceptances.
        initial: Candidates evaluated unconditionally first (the model needs data).
        max_proposals: Cap on candidates drawn (default 100 · budget).
    """
    budget = check_count("budget", budget)
    rng = random.Random(seed)
    result = SearchResult()
    max_proposals = 100 * budget if max_proposals is None else check_count("max_proposals", max_proposals)
    while len(result.history) < budget and result.proposals < max_proposals:
        params = {name: dimension.sample(rng) for name, dimension in space.items()}
        result.proposals += 1
        if len(result.history) >= initial:
            costs = [c for _, c in result.history if math.isfinite(c)]
            if len(costs) >= 2 and max(costs) > min(costs):
                c_max, c_min = max(costs), min(costs)
                nearest = min(result.history, key=lambda item: _distance(space, params, item[0]))
                estimate = min(nearest[1], c_max)  # a diverged neighbour counts as the worst
                if rng.random() >= (c_max - estimate) / (c_max - c_min):
                    continue
        result.history.append((params, _cost(objective, params)))
    return result
