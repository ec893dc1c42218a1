"""GroupSort written exactly as ReLUs: a sorting network of compare-exchange steps (a
knockout tournament where only each group's largest value is read: a max-type op).

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


def tournament_stages(g: int) -> list[list[tuple[int, int]]]:
    """The g - 1 compare-exchanges in ceil(log2 g) stages after which position 0 holds the
    largest of g values (a knockout tournament: stage s pairs i and i + 2^s for i a multiple
    of 2^(s + 1)). The other positions hold the remaining values in some order: enough
    where nothing reads them (:func:`_reads_leaders_only`)."""
    stages, step = [], 1
    while step < g:
        stages.append([(i, i + step) for i in range(0, g - step, 2 * step)])
        step *= 2
    return stages


def _reads_leaders_only(dag: AffineDag, k: int, groups: np.ndarray) -> bool:
    """True when no map after activation k reads base k outside the groups' first positions:
    every such column is zero in the map and in its column scale (a sum of absolute values,
    so exactly zero only when the exact map's column is; Affine.col_mag). Then any network
    that leaves each group's largest value in its first position computes the same f."""
    leaders = np.zeros(dag.sizes[k], dtype=bool)
    leaders[np.asarray(groups)[:, 0]] = True
    for affine in (*dag.pre[k:], dag.out):
        m, scale = affine.maps.get(k), affine.col_mag.get(k)
        if m is not None and torch.any(m[:, ~torch.as_tensor(leaders, device=m.device)] != 0):
            return False
        if scale is None:
            if k in affine.row_mag:
                return False  # scales without column sums: nothing is known
            continue
        if torch.any(scale[~torch.as_tensor(leaders, device=scale.device)] != 0):
            return False
    return True


def _network(dag: AffineDag, k: int, op: O.GroupSort) -> list[list[tuple[int, int]]]:
    """The compare-exchange stages for activation k: a tournament where only the groups'
    largest values are read (a max written as GroupSort, :func:`.lowering.max_groups`),
    else the full sorting network."""
    g = op.groups.shape[1]
    return tournament_stages(g) if _reads_leaders_only(dag, k, op.groups) \
        else comparator_stages(g)


def _compose(affine: Affine, values: dict[int, Affine], exact: dict[int, set[int]],
             size: int) -> Affine:
    """``affine`` (over the old bases) rewritten over the new ones: sum_j M_j value_j, with
    rounding scales (:class:`~.lowering.Affine`) that compose affine's with value_j's:
    where value_j's map on base i is exact (``exact[j]``: identities and the 0/+-1 matrices
    of the network), columns |E|^T col_mag_j; else at most the largest col_mag_j times
    value_j's own; rows at most row_mag_j times the largest row scale of value_j."""
    bias = affine.bias.clone()
    bias_mag = affine.bias_mag.clone()
    maps: dict[int, torch.Tensor] = {}
    row_mag: dict[int, torch.Tensor] = {}
    col_mag: dict[int, torch.Tensor] = {}

    def add(d: dict[int, torch.Tensor], i: int, t: torch.Tensor) -> None:
        d[i] = d[i] + t if i in d else t

    for j, m in affine.maps.items():
        value = values[j]
        bias = bias + m @ value.bias
        for i, e in value.maps.items():
            add(maps, i, m if _is_identity(e) else m @ e)
    for j, rows in affine.row_mag.items():
        value = values[j]
        bias_mag = bias_mag + rows * value.bias_mag.max()
        for i, v in value.row_mag.items():
            add(row_mag, i, rows * v.max())
            add(col_mag, i, affine.col_mag[j] @ value.maps[i].abs() if i in exact[j] else
                affine.col_mag[j].max() * value.col_mag[i])
    assert bias.numel() == size
    return Affine(maps, bias, {}, row_mag, col_mag, bias_mag)


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
    networks = {k: _network(dag, k, op) for k, op in enumerate(dag.acts, start=1)
                if isinstance(op, O.GroupSort)}
    values: dict[int, Affine] = {0: Affine.exact(
        {0: torch.eye(n0, dtype=torch.float64, device=device)},
        torch.zeros(n0, dtype=torch.float64, device=device))}
    exact: dict[int, set[int]] = {0: {0}}
    sizes, acts, pre, sources = [n0], [], [], []
    for k, op in enumerate(dag.acts, start=1):
        z = _compose(dag.pre[k - 1], values, exact, dag.sizes[k])
        if not isinstance(op, O.GroupSort):
            values[k] = Affine.exact(
                {len(sizes): torch.eye(dag.sizes[k], dtype=torch.float64, device=device)},
                torch.zeros(dag.sizes[k], dtype=torch.float64, device=device))
            exact[k] = {len(sizes)}
            sizes.append(dag.sizes[k])
            acts.append(op)
            pre.append(z)
            sources.append(dag.sources[k - 1])
            continue
        v, exact[k] = z, set()
        stages = networks[k]
        for s, stage in enumerate(stages, start=1):
            d, e = _pair_matrices(op.groups, stage, dag.sizes[k], device)
            pre.append(v.then(d))
            acts.append(O.Relu())
            sources.append(f"{dag.sources[k - 1]} (compare-exchange stage {s}/{len(stages)})")
            v = Affine({**v.maps, len(sizes): e}, v.bias, {},
                       {**v.row_mag, len(sizes): e.abs().sum(1)},
                       {**v.col_mag, len(sizes): e.abs().sum(0)}, v.bias_mag)
            exact[k].add(len(sizes))
            sizes.append(d.shape[0])
        values[k] = v
    out = _compose(dag.out, values, exact, dag.out.bias.numel())
    # every stage composes one more product into the maps after it, and _compose one more
    stages = max(len(network) for network in networks.values())
    depth, largest = dag.deeper(stages + 2, max(sizes))
    return AffineDag(sizes, acts, pre, out, sources, depth=depth, largest=largest)


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
