"""The passes over the data that curvature objects share.

* ``layers``: which modules of a problem have layerwise statistics, and the rule of each layer type.
* ``capture``: the hooks that record what modules see in a forward and backward pass.
* ``vectors``: the statistics protocol (``BatchStatistics``, ``OutputGradients``).
* ``autograd``: the general statistics pass, for any model.
* ``fast``: structure-exploiting passes for model families (the plain MLP), chosen once per object.

``statistics`` picks the pass for a set of layers.
"""

from __future__ import annotations

from collections.abc import Iterator

from curvlab.passes import fast
from curvlab.passes.autograd import autograd_statistics
from curvlab.passes.fast.base import FastPath
from curvlab.passes.layers import Layer
from curvlab.passes.vectors import BatchStatistics
from curvlab.problem import Problem


def statistics(
    problem: Problem,
    layers: list[Layer],
    fisher_type: str,
    mc_samples: int = 1,
    seed: int = 0,
    max_vectors: int | None = None,
    fast_path: FastPath | None = None,
) -> Iterator[BatchStatistics]:
    """The layerwise statistics of a flavour: from ``fast_path`` where it covers the layers, else autograd.

    The fast path is taken where it pays: many backpropagated vectors (type-2, or MC
    with several samples); one vector per example (empirical, MC with one sample) is
    a single batched backward pass either way.
    """
    many = fisher_type == "type-2" or (fisher_type == "mc" and mc_samples > 1)
    if many and fast_path is not None and fast_path.applies() and fast_path.covers(layers):
        return fast_path.statistics(layers, fisher_type, mc_samples, seed)
    return autograd_statistics(problem, layers, fisher_type, mc_samples, seed, max_vectors)


__all__ = ["BatchStatistics", "FastPath", "Layer", "fast", "statistics"]
