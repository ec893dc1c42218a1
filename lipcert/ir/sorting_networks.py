"""GroupSort written exactly as ReLUs: a sorting network of compare-exchange steps.

A compare-exchange of a pair (a, b) that writes the larger value to a's position is

    max(a, b) = a + relu(b - a),      min(a, b) = b - relu(b - a),

an identity of functions, not an approximation. A sorting network (Batcher's odd-even
merge sort: Knuth, TAOCP vol. 3, Sec. 5.3.4, Algorithm M) sorts every group with stages of
disjoint compare-exchanges, so a GroupSort layer becomes a few ReLU layers joined by 0/+-1
matrices, with the skip term (a or b) carried along. Bound propagation through the
rewritten network bounds the Clarke Jacobian of the chain rule, a superset of GroupSort's
own (Clarke, Optimization and Nonsmooth Analysis, Thm. 2.6.6), so the bounds stay sound;
a ReLU's slope d in [0, 1] is the pair's unknown order, and branching on that ReLU's sign
fixes it. Group size 2 (MaxMin, GroupSort2) is one stage.

Used by ``local`` (Shi et al.'s bound propagation handles ReLU DAGs); docs/ARCHITECTURE.md,
"Data flow", places it among the lowerings.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..errors import MethodNotApplicable
from . import ops as O
from .lowering import Affine, AffineDag


def comparator_stages(g: int) -> list[list[tuple[int, int]]]:
    """Batcher's odd-even merge sort on g positions, as stages of disjoint pairs (i, j),
    i < j; after a pair's compare-exchange position i holds the larger value. Sorting is
    descending (GroupSort's order). Works for any g (pairs beyond g are dropped, which is
    the network for g padded with -inf)."""
    stages: list[list[tuple[int, int]]] = []
    p = 1
    while p < g:
        k = p
        while k >= 1:
            stage = []
            for j in range(k % p, g - k, 2 * k):
                for i in range(min(k, g - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        stage.append((i + j, i + j + k))
            if stage:
                stages.append(stage)
            k //= 2
        p *= 2
    return stages


def _compose(affine: Affine, values: dict[int, Affine], size: int) -> Affine:
    """``affine`` (over the old bases) rewritten over the new ones: sum_j M_j value_j."""
    bias = affine.bias.clone()
    maps: dict[int, torch.Tensor] = {}
    for j, m in affine.maps.items():
        value = values[j]
        bias = bias + m @ value.bias
        for i, e in value.maps.items():
            term = m if _is_identity(e) else m @ e
            maps[i] = maps[i] + term if i in maps else term
    assert bias.numel() == size
    return Affine(maps, bias)


def _is_identity(e: torch.Tensor) -> bool:
    return e.shape[0] == e.shape[1] and bool(torch.equal(e, torch.eye(
        e.shape[0], dtype=e.dtype, device=e.device)))


def _pair_matrices(groups: np.ndarray, stage: list[tuple[int, int]], n: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For one stage over every group: D (pairs x n) with D v = b - a, and E (n x pairs)
    with v + E relu(D v) the values after the compare-exchanges (a: +r, b: -r)."""
    pairs = [(int(row[i]), int(row[j])) for row in groups for i, j in stage]
    d = torch.zeros((len(pairs), n), dtype=torch.float64, device=device)
    e = torch.zeros((n, len(pairs)), dtype=torch.float64, device=device)
    for p, (a, b) in enumerate(pairs):
        d[p, b], d[p, a] = 1.0, -1.0
        e[a, p], e[b, p] = 1.0, -1.0
    return d, e


def expand_group_sorts(dag: AffineDag) -> AffineDag:
    """The same network with every GroupSort activation replaced by its sorting network of
    ReLU compare-exchanges (flat groups, as :func:`lowering.flat_group_sort` writes them).
    The DAG is returned unchanged when it has no GroupSort."""
    if not any(isinstance(op, O.GroupSort) for op in dag.acts):
        return dag
    n0, device = dag.sizes[0], dag.device
    values: dict[int, Affine] = {0: Affine({0: torch.eye(n0, dtype=torch.float64, device=device)},
                                           torch.zeros(n0, dtype=torch.float64, device=device))}
    sizes, acts, pre, sources = [n0], [], [], []
    for k, op in enumerate(dag.acts, start=1):
        z = _compose(dag.pre[k - 1], values, dag.sizes[k])
        if not isinstance(op, O.GroupSort):
            values[k] = Affine({len(sizes): torch.eye(dag.sizes[k], dtype=torch.float64,
                                                      device=device)},
                               torch.zeros(dag.sizes[k], dtype=torch.float64, device=device))
            sizes.append(dag.sizes[k])
            acts.append(op)
            pre.append(z)
            sources.append(dag.sources[k - 1])
            continue
        v = z
        stages = comparator_stages(op.groups.shape[1])
        for s, stage in enumerate(stages, start=1):
            d, e = _pair_matrices(op.groups, stage, dag.sizes[k], device)
            pre.append(Affine({i: d @ m for i, m in v.maps.items()}, d @ v.bias))
            acts.append(O.Relu())
            sources.append(f"{dag.sources[k - 1]} (compare-exchange stage {s}/{len(stages)})")
            v = Affine({**v.maps, len(sizes): e}, v.bias)
            sizes.append(d.shape[0])
        values[k] = v
    out = _compose(dag.out, values, dag.out.bias.numel())
    return AffineDag(sizes, acts, pre, out, sources)


_CACHE: list[tuple[weakref.ref, AffineDag]] = []


def cached_expansion(dag: AffineDag, method: str, max_entries: int) -> AffineDag:
    """:func:`expand_group_sorts`, remembered for the last few DAGs (certification bounds
    the same network on every sample's box), refused past ``max_entries`` matrix entries."""
    for ref, expanded in _CACHE:
        if ref() is dag:
            return expanded
    expanded = expand_group_sorts(dag)
    if expanded is not dag and expanded.entries() > max_entries:
        raise MethodNotApplicable(
            f"method {method} writes GroupSort as ReLU compare-exchanges, which takes the "
            f"unrolled matrices to {expanded.entries():,} entries, past {max_entries:,}; "
            "raise -o max_entries=N if memory allows")
    _CACHE.insert(0, (weakref.ref(dag), expanded))
    del _CACHE[4:]
    return expanded
