"""A graph as a DAG of dense affine maps between elementwise activations.

Every value of the IR graph is an affine function of the *bases*: base 0 is the flattened
input x, base k >= 1 is the output of the k-th activation node. Linear ops (Dense, Conv,
ConvTranspose, Scale, Add, Concat, layout and pooling ops) are applied to the columns of
these affine maps with the evaluator's own torch forward, so the unrolled matrices are the
ops' exact linear parts (in float64). Then

    z_k = sum_{j<k} M[k][j] B_j + c_k,   B_k = sigma_k(z_k),   f = sum_j M_out[j] B_j + c_out,

which is the form bound propagation works on (residual connections are extra M[k][j]).
With ``max_ops`` a max-type op (MaxPool, Extremum, ReduceMax/Min) is written exactly as a
GroupSort of its windows followed by a selection of each window's largest value
(:func:`max_groups`). Used by the ``local`` estimator and by LipSDP for conv layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import MethodNotApplicable
from ..rounding import gamma
from . import evaluate
from . import linear_operators as L
from . import ops as O
from .graph import Graph

MAX_ENTRIES = 30_000_000

_ACTIVATIONS = O.ELEMENTWISE_ACTIVATIONS
LINEAR_OPS = (O.Dense, O.Conv, O.ConvTranspose, O.Scale, O.Add, O.Concat, O.Reshape, O.Transpose,
           O.Slice, O.Pad, O.AvgPool, O.GlobalAvgPool)
UNROLLABLE = LINEAR_OPS + _ACTIVATIONS  # the IR ops build_affine_dag accepts
#: ops build_affine_dag(max_ops=True) writes as a GroupSort of windows and a selection
MAX_OPS = (O.MaxPool, O.Extremum, O.Reduce)
CHAIN_LINEAR_OPS = tuple(op for op in LINEAR_OPS if op not in (O.Add, O.Concat))  # 1 input


#: a map gets a matrix-free operator when replaying its ops costs at most this fraction of
#: its dense matrix's entries: float64 convolutions run at about 6 GMAC/s on this CPU where
#: dense float64 products reach 90 (bench/local.py), so replaying must save more than 16x
IMPLICIT_FRACTION = 1 / 16


@dataclass
class Affine:
    """sum_j maps[j] @ B_j + bias, with maps[j] of shape (size, n_j).

    ``ops[j]``, where present, is maps[j] as a matrix-free operator (the ops that built it,
    replayed: :mod:`.linear_operators`) that is much cheaper than the dense matrix for
    products with many rows. It must equal maps[j]: code that builds a new Affine from
    changed maps leaves ``ops`` empty."""

    maps: dict[int, torch.Tensor]
    bias: torch.Tensor
    ops: dict[int, L.LinearOperator] = field(default_factory=dict)
    #: Rounding scales (docs/ARCHITECTURE.md, "Rounding"): for each base j the ops' absolute
    #: values composed, |A_L|...|A_1|, summed over columns (``row_mag[j]``, (size,)) and over
    #: rows (``col_mag[j]``, (n_j,)), and ``bias_mag`` (size,), the constant terms' absolute
    #: values carried the same way. The computed maps and bias differ from the exact ones by
    #: at most the DAG's ``slack`` times these (entrywise |M~_j - M_j| <= slack |A_L|...|A_1|),
    #: and they bound |maps[j]| itself. Kept for bases whose computed map is all zero too.
    row_mag: dict[int, torch.Tensor] = field(default_factory=dict)
    col_mag: dict[int, torch.Tensor] = field(default_factory=dict)
    bias_mag: torch.Tensor | None = None

    @property
    def entries(self) -> int:
        return sum(m.numel() for m in self.maps.values())

    @staticmethod
    def exact(maps: dict[int, torch.Tensor], bias: torch.Tensor) -> Affine:
        """An Affine whose maps and bias are exact (0/+-1 matrices, identities): its rounding
        scales are those of its own entries."""
        return Affine(maps, bias, {}, {j: m.abs().sum(1) for j, m in maps.items()},
                      {j: m.abs().sum(0) for j, m in maps.items()}, bias.abs())

    def then(self, d: torch.Tensor) -> Affine:
        """d @ self (d: (r, size)), with rounding scales that cover the product's rounding:
        rows |d| row_mag, columns at most col_mag times the largest column sum of |d|."""
        ad = d.abs()
        width = ad.sum(0).max() if ad.numel() else ad.new_zeros(())
        return Affine({j: d @ m for j, m in self.maps.items()}, d @ self.bias, {},
                      {j: ad @ v for j, v in self.row_mag.items()},
                      {j: v * width for j, v in self.col_mag.items()},
                      ad @ self.bias_mag)

    def moved(self, device: torch.device) -> Affine:
        def move(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {j: t.to(device) for j, t in d.items()}

        return Affine(move(self.maps), self.bias.to(device), dict(self.ops), move(self.row_mag),
                      move(self.col_mag), self.bias_mag.to(device))

    def magnitude(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """(D, size) bound on the magnitude of the terms summed into this affine value when
        each base j is at most ``scales[j]`` (D, n_j) in absolute value: bias_mag +
        sum_j row_mag[j] max(scales[j]) (the row sums of the composed |A| times the base's
        largest entry, per domain)."""
        total = self.bias_mag.expand(scales[0].shape[0], -1)
        for j, v in self.row_mag.items():
            total = total + v * scales[j].amax(-1, keepdim=True)
        return total


@dataclass
class AffineDag:
    """Bases 0..K (0 = input); ``pre[k - 1]`` is z_k, ``acts[k - 1]`` is sigma_k."""

    sizes: list[int]
    acts: list[O.Op]
    pre: list[Affine]
    out: Affine
    sources: list[str]
    #: the most linear ops composed into one map (products later code forms count too) and
    #: the largest value's size: together they bound the summations behind every number
    #: computed from the DAG (:attr:`slack`)
    depth: int = 1
    largest: int = 1
    #: copies of this DAG on other devices (:meth:`to`), made once each
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_acts(self) -> int:
        return len(self.acts)

    def entries(self) -> int:
        return sum(a.entries for a in self.pre) + self.out.entries

    @property
    def device(self) -> torch.device:
        return self.out.bias.device

    @property
    def slack(self) -> float:
        """Relative rounding slack of everything computed from this DAG: 4 gamma_N (Higham,
        Accuracy and Stability, Lemma 3.1 and Sec. 3.5) with N = (depth + 4) * largest,
        more than the summations behind any one product through a map, its representation
        error and the products bound propagation forms on top."""
        return 4.0 * gamma((self.depth + 4) * self.largest)

    def deeper(self, extra: int, largest: int = 0) -> tuple[int, int]:
        """(depth, largest) for a DAG built from this one with ``extra`` more products."""
        return self.depth + extra, max(self.largest, largest)

    def to(self, device: str | torch.device) -> AffineDag:
        """The same DAG with its matrices and biases on ``device`` (itself when they are
        there already; the matrix-free operators follow the device of what they multiply)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        if device in self.copies:
            return self.copies[device]

        copy = AffineDag(list(self.sizes), list(self.acts), [a.moved(device) for a in self.pre],
                         self.out.moved(device), list(self.sources), self.depth, self.largest)
        self.copies[device] = copy
        return copy

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pre-activations z_1..z_K and the output at a batch of points x (B, n_0)."""
        bases, zs = [x], []
        for affine, op in zip(self.pre, self.acts, strict=True):
            z = apply_affine(affine, bases)
            zs.append(z)
            bases.append(evaluate.apply(op, z))
        return zs, apply_affine(self.out, bases)


def apply_affine(affine: Affine, bases: list[torch.Tensor]) -> torch.Tensor:
    """affine applied to a batch: bases[j] has shape (B, n_j)."""
    y = affine.bias.expand(bases[0].shape[0], -1).clone()
    for j, m in affine.maps.items():
        y = y + bases[j] @ m.T
    return y


def _abs(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.abs(a)


#: |op| for each linear op: every coefficient (weights, biases, shifts, pad values, Add's
#: coefficients) replaced by its absolute value; layout and averaging ops are their own
_MAGNITUDE = {
    O.Dense: lambda op: replace(op, weight=np.abs(op.weight), bias=_abs(op.bias)),
    O.Conv: lambda op: replace(op, weight=np.abs(op.weight), bias=_abs(op.bias)),
    O.ConvTranspose: lambda op: replace(op, weight=np.abs(op.weight), bias=_abs(op.bias)),
    O.Scale: lambda op: replace(op, scale=np.abs(op.scale), shift=np.abs(op.shift)),
    O.Add: lambda op: replace(op, coeffs=tuple(abs(c) for c in op.coeffs)),
    O.Pad: lambda op: replace(op, value=abs(op.value)),
    **{kind: lambda op: op for kind in (O.Concat, O.Reshape, O.Transpose, O.Slice, O.AvgPool,
                                        O.GlobalAvgPool)},
}


def magnitude_op(op: O.Op) -> O.Op:
    """|op|: |op(x)| <= |op|(|x|) entrywise, and the matrix of |op|'s linear part is the
    entrywise absolute value of op's (each output reads each input through one coefficient).
    Refuses an op it has no rule for, by name."""
    try:
        return _MAGNITUDE[type(op)](op)
    except KeyError:
        raise MethodNotApplicable(f"no rounding scale for linear op {op.kind}") from None


def linear_part(op: O.Op) -> O.Op:
    """The op without its constant term (bias, shift, pad value): exact linear part."""
    if isinstance(op, (O.Dense, O.Conv, O.ConvTranspose)) and op.bias is not None:
        return replace(op, bias=None)
    if isinstance(op, O.Scale):
        return replace(op, shift=np.zeros_like(op.shift))
    if isinstance(op, O.Pad) and op.value != 0:
        return replace(op, value=0.0)
    return op


def _apply_linear(op: O.Op, node_shape, in_shapes, inputs: list[Affine]) -> Affine:
    dtype = torch.float64
    biases = [a.bias.reshape(shape) for a, shape in zip(inputs, in_shapes, strict=True)]
    with torch.no_grad():
        bias = evaluate.apply(op, *biases).reshape(-1)
        lin = linear_part(op)
        maps: dict[int, torch.Tensor] = {}
        operators: dict[int, L.LinearOperator] = {}
        bases = sorted({j for a in inputs for j in a.maps})
        for j in bases:
            n_j = next(a.maps[j].shape[1] for a in inputs if j in a.maps)
            cols = [a.maps[j].T.reshape(n_j, *shape) if j in a.maps else
                    torch.zeros((n_j, *shape), dtype=dtype)
                    for a, shape in zip(inputs, in_shapes, strict=True)]
            out = torch.func.vmap(lambda *xs, _lin=lin: evaluate.apply(_lin, *xs))(*cols)
            maps[j] = out.reshape(n_j, -1).T.contiguous()
            parts = [(a.ops.get(j) or L.dense(a.maps[j])) if j in a.maps else None
                     for a in inputs]
            operator = L.compose(lin, in_shapes, node_shape, parts, n_j)
            if operator.cost <= IMPLICIT_FRACTION * maps[j].numel():
                operators[j] = operator
    size = int(np.prod(node_shape))
    kept = {j: m for j, m in maps.items() if torch.any(m != 0)}
    row_mag, bias_mag = _magnitudes(op, in_shapes, inputs)
    return Affine(kept, bias.reshape(size), {j: op for j, op in operators.items() if j in kept},
                  row_mag, {}, bias_mag)


def _magnitudes(op: O.Op, in_shapes, inputs: list[Affine]
                ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Rounding scales of op(inputs) (see :class:`Affine`): |lin| applied to the inputs'
    row scales, base by base, and |op| to their bias scales. The row scales keep their
    autograd history back to each base's vector of ones (:func:`build_affine_dag` takes
    the column scales from it)."""
    abs_lin, abs_op = magnitude_op(linear_part(op)), magnitude_op(op)
    with torch.no_grad():
        bias_mag = evaluate.apply(abs_op, *(a.bias_mag.reshape(s) for a, s in
                                            zip(inputs, in_shapes, strict=True))).reshape(-1)
    row_mag = {}
    with torch.enable_grad():
        for j in sorted({j for a in inputs for j in a.row_mag}):
            vecs = [a.row_mag[j].reshape(s) if j in a.row_mag else
                    torch.zeros(s, dtype=torch.float64)
                    for a, s in zip(inputs, in_shapes, strict=True)]
            row_mag[j] = evaluate.apply(abs_lin, *vecs).reshape(-1)
    return row_mag, bias_mag


def _identity(size: int, base: int, ones: torch.Tensor | None = None) -> Affine:
    """B_base itself, as the value of a node (``ones``: the leaf its row scale grows from)."""
    ones = torch.ones(size, dtype=torch.float64) if ones is None else ones
    return Affine({base: torch.eye(size, dtype=torch.float64)},
                  torch.zeros(size, dtype=torch.float64), {base: L.identity(size)},
                  {base: ones}, {base: torch.ones(size, dtype=torch.float64)},
                  torch.zeros(size, dtype=torch.float64))


def _with_column_scales(a: Affine, leaves: dict[int, torch.Tensor]) -> Affine:
    """``a`` with col_mag[j] = |A_L|...|A_1|^T 1, the gradient of sum(row_mag[j]) with
    respect to base j's vector of ones (the row scale is linear in it), and every scale
    detached from autograd."""
    col_mag = {}
    for j, v in a.row_mag.items():
        leaf = leaves[j]
        if v is leaf:
            col_mag[j] = torch.ones_like(leaf).detach()
            continue
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(v.sum(), leaf, retain_graph=True, allow_unused=True)
        col_mag[j] = torch.zeros_like(leaf).detach() if grad is None else grad.detach()
    return Affine(a.maps, a.bias, a.ops, {j: v.detach() for j, v in a.row_mag.items()},
                  col_mag, a.bias_mag)


def flat_group_sort(op: O.GroupSort, shape: tuple[int, ...]) -> O.GroupSort:
    """The same GroupSort on the flattened tensor: its groups as flat positions (one group per
    group and position of the other axes, e.g. channel pairs at every pixel)."""
    index = np.moveaxis(np.arange(int(np.prod(shape))).reshape(shape), op.axis, -1)
    groups = index[..., np.asarray(op.groups, dtype=np.int64)]  # (..., n_groups, g)
    return O.GroupSort(1, groups.reshape(-1, groups.shape[-1]))


def max_groups(op: O.Op, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]
               ) -> tuple[list[np.ndarray], float]:
    """(windows, sign): output i of the max-type ``op`` is sign * max_e sign * x[windows[i][e]],
    x the op's inputs flattened and laid end to end (sign -1 for min: min(a) = -max(-a)).
    MaxPool's windows leave out its -inf padding (so they may differ in size)."""
    sign = -1.0 if getattr(op, "mode", "max") == "min" else 1.0
    if isinstance(op, O.Extremum):
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in in_shapes])
        cols = [np.broadcast_to(np.arange(int(np.prod(s))).reshape(s) + off, out_shape)
                for s, off in zip(in_shapes, offsets, strict=False)]
        return list(np.stack(cols, -1).reshape(-1, len(cols))), sign
    (shape,) = in_shapes
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    if isinstance(op, O.Reduce):
        axes = [a % len(shape) for a in op.axes]
        moved = np.moveaxis(flat, axes, list(range(len(shape) - len(axes), len(shape))))
        width = int(np.prod([shape[a] for a in axes]))
        return list(moved.reshape(-1, width)), sign
    if not isinstance(op, O.MaxPool) or len(shape) != 4 or len(out_shape) != 4:
        raise MethodNotApplicable(f"no window rule for {op.kind} on shape {shape}")
    (kh, kw), (sh, sw), (dh, dw) = op.kernel, op.stride, op.dilation
    top, left = op.pads[0], op.pads[1]
    windows = []
    for oh in range(out_shape[2]):
        hs = [h for h in (oh * sh - top + i * dh for i in range(kh)) if 0 <= h < shape[2]]
        for ow in range(out_shape[3]):
            ws = [w for w in (ow * sw - left + j * dw for j in range(kw)) if 0 <= w < shape[3]]
            if not hs or not ws:
                raise MethodNotApplicable(f"{op.kind} has a window with no input position")
            windows.append((np.array(hs)[:, None], np.array(ws)[None, :]))
    lead = flat.reshape(-1, shape[2], shape[3])  # (N*C, H, W), windows in output order
    return [lead[c][hw].reshape(-1) for c in range(lead.shape[0]) for hw in windows], sign


def _gathered(inputs: list[Affine], index: np.ndarray, sign: float,
              widths: dict[int, int]) -> Affine:
    """Rows ``index`` of the inputs laid end to end, times ``sign``: a copy of computed
    values, exact (rounding scales copied row for row, their autograd history kept)."""
    idx = torch.as_tensor(np.ascontiguousarray(index).reshape(-1), dtype=torch.long)
    dtype = torch.float64

    def rows(tensors: list[torch.Tensor | None], width: int | None) -> torch.Tensor:
        full = [t if t is not None else
                torch.zeros((a.bias.numel(),) if width is None else (a.bias.numel(), width),
                            dtype=dtype) for t, a in zip(tensors, inputs, strict=True)]
        return torch.cat(full)[idx]

    bases = sorted({j for a in inputs for j in (*a.maps, *a.row_mag)})
    maps = {j: sign * rows([a.maps.get(j) for a in inputs], widths[j]) for j in bases}
    row_mag = {j: rows([a.row_mag.get(j) for a in inputs], None) for j in bases
               if any(j in a.row_mag for a in inputs)}
    return Affine({j: m for j, m in maps.items() if torch.any(m != 0)},
                  sign * rows([a.bias for a in inputs], None), {}, row_mag, {},
                  rows([a.bias_mag for a in inputs], None))


def _selected(parts: list[tuple[np.ndarray, Affine]], size: int) -> Affine:
    """The value whose rows ``rows`` are those of each part's Affine (disjoint rows, exact
    0/1 selections): maps, bias and scales placed row by row."""
    dtype = torch.float64
    maps: dict[int, torch.Tensor] = {}
    row_mag: dict[int, torch.Tensor] = {}
    col_mag: dict[int, torch.Tensor] = {}
    bias = torch.zeros(size, dtype=dtype)
    bias_mag = torch.zeros(size, dtype=dtype)
    for rows, a in parts:
        r = torch.as_tensor(rows, dtype=torch.long)
        bias[r] = a.bias
        bias_mag[r] = a.bias_mag
        for j, m in a.maps.items():
            maps.setdefault(j, torch.zeros((size, m.shape[1]), dtype=dtype))[r] = m
        for j, v in a.row_mag.items():
            row_mag[j] = (row_mag[j] if j in row_mag else torch.zeros(size, dtype=dtype)
                          ).index_put((r,), v)  # out of place: keeps v's autograd history
        for j, v in a.col_mag.items():
            col_mag[j] = col_mag[j] + v if j in col_mag else v
    return Affine(maps, bias, {}, row_mag, col_mag, bias_mag)


def _group_leaders(n_groups: int, g: int, base: int, ones: torch.Tensor, sign: float
                   ) -> Affine:
    """sign times the first position of each group of g in base ``base`` (where GroupSort
    writes the group's largest value)."""
    first = torch.arange(n_groups) * g
    select = torch.zeros((n_groups, n_groups * g), dtype=torch.float64)
    select[torch.arange(n_groups), first] = sign
    return Affine({base: select}, torch.zeros(n_groups, dtype=torch.float64), {},
                  {base: ones[first]}, {base: select.abs().sum(0)},
                  torch.zeros(n_groups, dtype=torch.float64))


def build_affine_dag(graph: Graph, method: str, max_entries: int = MAX_ENTRIES,
                     max_ops: bool = False) -> AffineDag:
    """Unroll ``graph`` into an :class:`AffineDag`; ops other than linear ones and elementwise
    activations (and with ``max_ops`` the :data:`MAX_OPS`, as GroupSorts) are refused by
    node name."""
    n0 = int(np.prod(graph.input_shape))
    leaves = {0: torch.ones(n0, dtype=torch.float64, requires_grad=True)}
    values: dict[str, Affine] = {graph.input: _identity(n0, 0, leaves[0])}
    depths: dict[str, int] = {graph.input: 0}
    sizes, acts, pre, sources = [n0], [], [], []
    total = n0 * n0
    depth, largest = 1, n0
    for node in graph.nodes:
        op = node.op
        size = int(np.prod(node.shape))
        largest = max(largest, size)
        if isinstance(op, (*_ACTIVATIONS, O.GroupSort)):
            k = len(sizes)
            pre.append(_with_column_scales(values[node.inputs[0]], leaves))
            acts.append(flat_group_sort(op, node.shape) if isinstance(op, O.GroupSort) else op)
            sizes.append(size)
            sources.append(node.source)
            leaves[k] = torch.ones(size, dtype=torch.float64, requires_grad=True)
            values[node.output] = _identity(size, k, leaves[k])
            depths[node.output] = 0
            continue
        if max_ops and isinstance(op, MAX_OPS):
            windows, sign = max_groups(op, [graph.shape_of(i) for i in node.inputs],
                                       node.shape)
            inputs = [values[i] for i in node.inputs]
            bases = {j for a in inputs for j in a.maps}
            expected = sum(len(w) for w in windows) * sum(sizes[j] for j in bases)
            if total + expected > max_entries:
                raise MethodNotApplicable(
                    f"method {method} writes {op.kind} at node {node.source!r} as a GroupSort "
                    f"of its windows, which takes the unrolled matrices past {max_entries:,} "
                    "entries; raise -o max_entries=N if memory allows")
            parts = []  # one GroupSort per window size (a window of one is its value)
            for g in sorted({len(w) for w in windows}):
                rows = np.array([i for i, w in enumerate(windows) if len(w) == g])
                index = np.stack([windows[i] for i in rows])
                gathered = _gathered(inputs, index, sign if g > 1 else 1.0,
                                     dict(enumerate(sizes)))
                total += gathered.entries
                if g == 1:
                    parts.append((rows, gathered))
                    continue
                k = len(sizes)
                pre.append(_with_column_scales(gathered, leaves))
                acts.append(O.GroupSort(1, np.arange(index.size).reshape(index.shape)))
                sizes.append(index.size)
                largest = max(largest, index.size)
                sources.append(f"{node.source} ({op.kind} as a GroupSort of its "
                               f"{g}-element windows)")
                leaves[k] = torch.ones(index.size, dtype=torch.float64, requires_grad=True)
                parts.append((rows, _group_leaders(len(rows), g, k, leaves[k], sign)))
            values[node.output] = _selected(parts, size)
            depths[node.output] = max(depths[i] for i in node.inputs) if any(
                len(w) == 1 for w in windows) else 0
            continue
        if not isinstance(op, LINEAR_OPS):
            raise MethodNotApplicable(
                f"method {method} does not support op {op.kind} at node {node.source!r}")
        inputs = [values[i] for i in node.inputs]
        expected = size * sum(sizes[j] for j in {j for a in inputs for j in a.maps})
        if total + expected > max_entries:
            raise MethodNotApplicable(
                f"method {method} unrolls linear layers into matrices, and node "
                f"{node.source!r} takes the total past {max_entries:,} entries; raise "
                "-o max_entries=N if memory allows")
        values[node.output] = _apply_linear(op, node.shape,
                                            [graph.shape_of(i) for i in node.inputs], inputs)
        depths[node.output] = 1 + max(depths[i] for i in node.inputs)
        depth = max(depth, depths[node.output])
        total += values[node.output].entries
    out = _with_column_scales(values[graph.output], leaves)
    return AffineDag(sizes, acts, pre, out, sources, depth=depth, largest=largest)


_DAG_CACHE: list[tuple[weakref.ref, str, tuple[int, bool], AffineDag]] = []


def cached_affine_dag(graph: Graph, method: str, max_entries: int = MAX_ENTRIES,
                      max_ops: bool = False) -> AffineDag:
    """:func:`build_affine_dag`, remembered for the last few graphs (certification bounds the
    same graph on every sample's box). Graphs are immutable, so the unrolled DAG stays valid."""
    for ref, m, limit, dag in _DAG_CACHE:
        if ref() is graph and m == method and limit == (max_entries, max_ops):
            return dag
    dag = build_affine_dag(graph, method, max_entries, max_ops)
    _DAG_CACHE.insert(0, (weakref.ref(graph), method, (max_entries, max_ops), dag))
    del _DAG_CACHE[4:]
    return dag
