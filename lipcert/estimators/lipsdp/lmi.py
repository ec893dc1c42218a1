"""The LipSDP matrix inequality: multiplier structure (slope-restricted and GroupSort
quadratic constraints), the assembled matrix M(T) the certificate checks, a strictly
feasible start, exact rescaling and input compression, and the cvxpy expression built from
the same assembly (Fazlyab et al., NeurIPS 2019, Thm 2; Pauli et al., ICLR 2024, Sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .eigen import spectral_norm_estimate


@dataclass(frozen=True)
class GroupQC:
    """GroupSort/MaxMin layer: ``groups`` (n_groups, g) are positions within the layer.

    Pauli, Havens, Araujo, Garg, Khorrami, Allgower, Hu (ICLR 2024), Sec. 4: each group is
    1-Lipschitz and preserves its sum, so for any lambda_j >= 0 and any real gamma_j
        dv^T T dv - dw^T T dw >= 0,   T = blkdiag_j(lambda_j I + gamma_j 1 1^T),
    for the increments dv of the group's input and dw of its output."""

    groups: np.ndarray


def _structure(weights: list[np.ndarray]):
    """Row blocks of A: (row offset, column offset, W) for each hidden layer."""
    n0 = weights[0].shape[1]
    blocks, row, col = [], 0, 0
    for w in weights[:-1]:
        blocks.append((row, col, w))
        row += w.shape[0]
        col += w.shape[1]
    return n0, row, blocks


def lmi_size(weights: list[np.ndarray]) -> int:
    """Side of the LMI: the input dimension plus every hidden neuron."""
    return weights[0].shape[1] + sum(w.shape[0] for w in weights[:-1])


def has_output_connections(weights: list[np.ndarray]) -> bool:
    """True when the last matrix reads every block of the LMI, [C_0, C_1, ..., C_K]
    (a residual block y = S x + A sigma(B x): C = [S, A]; lipcert.ir.residual) rather than
    only the last hidden layer. :func:`assemble` then adds C^T C over the whole matrix,
    which is the LMI with the skip in its output map."""
    if len(weights) < 2 or weights[-1].shape[1] == weights[-2].shape[0]:
        return False
    if weights[-1].shape[1] != lmi_size(weights):
        raise ValueError(f"the output map has {weights[-1].shape[1]} columns; expected the "
                         f"last layer's {weights[-2].shape[0]} or all {lmi_size(weights)}")
    return True


def n_multipliers(weights, qcs) -> list[int]:
    """Entries of the multiplier vector per hidden layer: one per neuron for a slope
    restriction, (lambda_j, gamma_j) per group for GroupSort."""
    return [2 * q.groups.shape[0] if isinstance(q, GroupQC) else w.shape[0]
            for w, q in zip(weights[:-1], qcs, strict=True)]


def nonneg_mask(weights, qcs) -> np.ndarray:
    """True where a multiplier must be >= 0 (all but the GroupSort gamma_j)."""
    parts = []
    for w, q in zip(weights[:-1], qcs, strict=True):
        if isinstance(q, GroupQC):
            n = q.groups.shape[0]
            parts.append(np.r_[np.ones(n, bool), np.zeros(n, bool)])
        else:
            parts.append(np.ones(w.shape[0], bool))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def parameter_groups(weights, qcs, form: str) -> list[np.ndarray]:
    """Index sets of the multiplier vector that share one SDP variable in each form."""
    groups, offset = [], 0
    for n, q in zip(n_multipliers(weights, qcs), qcs, strict=True):
        idx = np.arange(offset, offset + n)
        offset += n
        if form == "neuron":
            groups += [idx[i:i + 1] for i in range(n)]
        elif isinstance(q, GroupQC):
            groups += [idx[: n // 2], idx[n // 2:]]
        else:
            groups.append(idx)
    return groups


def _membership(groups: np.ndarray, size: int) -> np.ndarray:
    g = np.zeros((size, groups.shape[0]))
    for j, row in enumerate(groups):
        g[row, j] = 1.0
    return g


@dataclass
class BlockTridiagonal:
    """A symmetric matrix by its blocks: ``diag[k]`` (n_k x n_k) and ``sub[k]``, the block
    in row k + 1 and column k (n_{k+1} x n_k); every other block is zero. The LipSDP matrix
    of a chain has this form in the order [input, hidden 1, ..., hidden K]: layer k couples
    only its own neurons with its input's."""

    diag: list
    sub: list

    def sizes(self) -> list[int]:
        return [int(d.shape[0]) for d in self.diag]

    def dense(self, xp=np):
        """The full matrix (numpy array or torch tensor, as the blocks are)."""
        sizes = self.sizes()
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        m = xp.zeros((offsets[-1], offsets[-1]), dtype=xp.float64)
        for k, d in enumerate(self.diag):
            m[offsets[k]:offsets[k + 1], offsets[k]:offsets[k + 1]] += d
        for k, b in enumerate(self.sub):
            rows = slice(offsets[k + 1], offsets[k + 2])
            cols = slice(offsets[k], offsets[k + 1])
            m[rows, cols] += b
            m[cols, rows] += b.T
        return m


def assemble_blocks(weights, slopes, lam, absolute: bool = False, xp=np,
                    output: bool = True) -> BlockTridiagonal:
    """The blocks of P = sum_i lam_i F_i + blkdiag(0, .., W_l^T W_l) (rho excluded).

    Fazlyab et al. (NeurIPS 2019), Thm 2 for slope-restricted layers: layer k with slopes
    [a, b] and multipliers T_k adds -2ab W_k^T T_k W_k to its input's block, (a + b) T_k W_k
    below the diagonal and -2 T_k to its own block; a GroupSort layer (Pauli et al., ICLR
    2024, Sec. 4) adds W_k^T T_k W_k and -T_k. ``output`` False leaves out the last term
    (an output map that reads every block is added densely by :func:`assemble`). ``xp``
    and ``absolute`` as in :func:`assemble`."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights[:-1]]
    diag = [xp.zeros((n, n), dtype=xp.float64) for n in sizes]
    sub = []
    offset = 0
    for k, w in enumerate(weights[:-1]):
        qc = slopes[k]
        if isinstance(qc, GroupQC):
            n_groups = qc.groups.shape[0]
            lk, gk = lam[offset:offset + n_groups], lam[offset + n_groups:offset + 2 * n_groups]
            offset += 2 * n_groups
            memb = _membership(qc.groups, w.shape[0])
            if xp is not np:
                memb = xp.as_tensor(memb, dtype=xp.float64)
            if absolute:
                t = np.diag(memb @ np.abs(lk)) + memb @ (np.abs(gk)[:, None] * memb.T)
                diag[k] = diag[k] + np.abs(w).T @ t @ np.abs(w)
                diag[k + 1] = diag[k + 1] + t
            else:
                t = xp.diag(memb @ lk) + memb @ (gk[:, None] * memb.T)
                diag[k] = diag[k] + w.T @ t @ w
                diag[k + 1] = diag[k + 1] - t
            sub.append(xp.zeros((w.shape[0], w.shape[1]), dtype=xp.float64))
            continue
        alpha, beta = qc
        lk = lam[offset:offset + w.shape[0]]
        offset += w.shape[0]
        wl = lk[:, None] * w  # T W
        if absolute:
            diag[k] = diag[k] + abs(2.0 * alpha * beta) * (np.abs(w).T @ np.abs(wl))
            sub.append(np.abs((alpha + beta) * wl))
            diag[k + 1] = diag[k + 1] + np.diag(np.abs(2.0 * lk))
        else:
            if alpha * beta != 0.0:
                diag[k] = diag[k] - 2.0 * alpha * beta * (w.T @ wl)
            sub.append((alpha + beta) * wl)  # (a + b) T W, block (hidden, input)
            diag[k + 1] = diag[k + 1] + xp.diag(-2.0 * lk)
    if output:
        w_last = weights[-1]
        gram = (np.abs(w_last).T @ np.abs(w_last)) if absolute else w_last.T @ w_last
        diag[-1] = diag[-1] + gram
    return BlockTridiagonal(diag, sub)


def assemble(weights, slopes, lam, absolute: bool = False, xp=np):
    """P = sum_i lam_i F_i + blkdiag(0, .., W_l^T W_l), dense (rho excluded).

    ``slopes`` gives each hidden layer's quadratic constraint: (alpha, beta) for a slope
    restriction, or a :class:`GroupQC`. ``xp`` is numpy (float64 arrays) or torch (float64
    tensors, differentiable in ``lam``). With ``absolute`` (numpy only) every term's
    absolute value is summed instead: an entrywise bound used for the rounding error of
    forming P. An output map that reads every block (:func:`has_output_connections`) adds
    C^T C over the whole matrix.
    """
    skip = has_output_connections(weights)
    p = assemble_blocks(weights, slopes, lam, absolute, xp, output=not skip).dense(xp)
    if skip:
        c = weights[-1]
        p = p + ((np.abs(c).T @ np.abs(c)) if absolute else c.T @ c)
    return p


def lmi_blocks(weights, slopes, lam, absolute: bool = False, xp=np) -> BlockTridiagonal:
    """The LMI matrix P (rho excluded) by blocks: block tridiagonal for a chain; an output
    map that reads every block couples them all, and then P is split only as
    [[P11, P12], [P21, P22]] (input, hidden)."""
    if not has_output_connections(weights):
        return assemble_blocks(weights, slopes, lam, absolute, xp)
    n0 = weights[0].shape[1]
    p = assemble(weights, slopes, lam, absolute, xp)
    return BlockTridiagonal([p[:n0, :n0], p[n0:, n0:]], [p[n0:, :n0]])


def _equivalent_slopes(qc) -> tuple[float, float]:
    """With gamma = 0 the GroupSort constraint is the slope constraint [-1, 1] (times 2)."""
    return (-1.0, 1.0) if isinstance(qc, GroupQC) else qc


def feasible_start(weights, slopes) -> np.ndarray:
    """Per-layer multipliers that make the hidden block negative definite by block diagonal
    dominance: t_{l-1} = 2 ||W_l||^2, t_k = 2 max(a^2, b^2)... ||W_{k+1}||^2 t_{k+1} (+ the
    a b W^T T W term), so every hidden 2x2 block [[-t_k, c t_{k+1} W], ...] is < 0."""
    sizes = [w.shape[0] for w in weights[:-1]]
    t = [0.0] * len(sizes)
    t[-1] = 2.0 * np.linalg.norm(weights[-1], 2) ** 2 + 1e-12
    for k in range(len(sizes) - 2, -1, -1):
        alpha, beta = _equivalent_slopes(slopes[k + 1])
        nw = np.linalg.norm(weights[k + 1], 2) ** 2
        t[k] = 4.0 * ((alpha + beta) ** 2 / 4.0 + abs(alpha * beta) + 1.0) * nw * t[k + 1] \
            + 1e-12
    def stacked(scale: float) -> np.ndarray:
        parts = []
        for tk, w, qc in zip(t, weights[:-1], slopes, strict=True):
            if isinstance(qc, GroupQC):
                n = qc.groups.shape[0]
                parts.append(np.r_[np.full(n, 2.0 * scale * tk), np.zeros(n)])
            else:
                parts.append(np.full(w.shape[0], scale * tk))
        return np.concatenate(parts)

    if not has_output_connections(weights):
        return stacked(1.0)
    # output connections add C_h^T C_h across the hidden blocks, outside the dominance
    # argument: the multipliers' part of the hidden block is negative definite and grows
    # linearly with them, so doubling them makes the whole block negative definite
    n0 = weights[0].shape[1]
    scale = 1.0
    for _ in range(60):
        lam = stacked(scale)
        hidden = assemble(weights, slopes, lam)[n0:, n0:]
        if np.linalg.eigvalsh((hidden + hidden.T) / 2)[-1] < 0:
            return lam
        scale *= 2.0
    return stacked(scale)


def rescale(weights: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Scale each W_k by a power of two near 1 / ||W_k|| (exact in floating point).

    f(x) = W_l phi(... phi(W_1 x)) with W_k = s_k V_k equals (prod s_k) g(x), where g uses
    V_k and the activations psi_k(t) = phi(c t) / c for the product c of the scales before
    them; psi_k has the same slope range, so LipSDP's bound for the V_k times prod s_k is a
    bound for f. Keeps the SDP well conditioned (ACAS Xu's weights reach 1e7).
    """
    scaled, factor = [], 1.0
    for w in weights:
        norm = spectral_norm_estimate(w)  # any power of two is exact; near 1/||W|| is best
        e = 0 if norm == 0.0 else int(np.round(np.log2(norm)))
        scaled.append(np.ldexp(w, -e))
        factor = np.ldexp(factor, e)
    return scaled, float(factor)


def _compress(weights: list[np.ndarray]) -> list[np.ndarray]:
    w1 = weights[0]
    if w1.shape[1] <= w1.shape[0]:
        return weights
    _, r = np.linalg.qr(w1.T)  # W_1^T = Q R, Q orthonormal columns
    return [r.T, *weights[1:]]


def lmi_components(weights, slopes) -> list[tuple[int, int]]:
    """Index ranges of M that are the diagonal blocks of its block-diagonal structure.

    Hidden layer k couples to its input block only through the cross term (alpha + beta) T W
    of a slope restriction; GroupSort constraints have no cross term, so M splits there and
    the LMI becomes a chain of small ones (Pauli et al., ICLR 2024, Sec. 5)."""
    n0, _, blocks = _structure(weights)
    if has_output_connections(weights):  # C^T C couples every block with every other
        return [(0, lmi_size(weights))]
    bounds = [(0, n0)] + [(n0 + row, n0 + row + w.shape[0]) for row, _, w in blocks]
    comps: list[list[int]] = [[0]]
    for k, qc in enumerate(slopes):
        coupled = not isinstance(qc, GroupQC) and (qc[0] + qc[1]) != 0
        if coupled:
            comps[-1].append(k + 1)
        else:
            comps.append([k + 1])
    return [(bounds[c[0]][0], bounds[c[-1]][1]) for c in comps]


def lmi_expression(weights, slopes, v, groups: list[np.ndarray], rho, cp):
    """The LMI matrix M(rho, T) as a cvxpy expression, built from :func:`assemble` (the same
    code the certificate checks): M = sum_j v_j (P(e_j) - P(0)) + P(0) - rho E, P linear in
    the multipliers; variable j sets the multiplier entries ``groups[j]``. ``rho`` is a
    scalar (l2: rho I on the input block) or a vector tau (linf: diag(tau))."""
    import scipy.sparse as sp

    n_lam = sum(len(g) for g in groups)
    n0 = weights[0].shape[1]
    base = assemble(weights, slopes, np.zeros(n_lam))
    d = base.shape[0]
    cols, rows, vals = [], [], []
    for j, idx in enumerate(groups):
        lam = np.zeros(n_lam)
        lam[idx] = 1.0
        column = (assemble(weights, slopes, lam) - base).reshape(-1)
        nz = np.flatnonzero(column)
        rows.append(nz)
        vals.append(column[nz])
        cols.append(np.full(nz.size, j))
    jac = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(d * d, len(groups)))
    lmi = cp.reshape(jac @ v, (d, d), order="C") + base
    if rho.size == 1:
        e_in = np.zeros((d, d))
        e_in[:n0, :n0] = np.eye(n0)
        return lmi - rho * e_in
    diag = sp.csr_matrix((np.ones(n0), (np.arange(n0) * (d + 1), np.arange(n0))),
                         shape=(d * d, n0))
    return lmi - cp.reshape(diag @ rho, (d, d), order="C")

