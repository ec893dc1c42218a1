"""An alpha-CROWN-style baseline for local linf Lipschitz bounds, written for the bench only.

It re-implements, from the papers and independently of lipcert's bound code, the default
pipeline of auto_LiRPA's Jacobian bounds (Shi et al., NeurIPS 2022) on a chain of dense
layers z_k = W_k h_{k-1} + b_k, h_k = ReLU(z_k):

* intermediate bounds: IBP intersected with alpha-CROWN (Xu et al., ICLR 2021): CROWN with
  one free lower slope per (bounded neuron, unstable neuron) optimised by Adam (lr 0.5,
  decay 0.98, 20 steps, best iterate kept), for every neuron of every layer (dense, no
  sparsity);
* the gradient g = W_1^T D_1 ... W_{L-1}^T D_{L-1} W_L^T c with D_k = diag(ReLU'(z_k)) in
  {0}, {1} or [0, 1]: each product y = d t relaxed by the chords of max(0, t) and min(0, t)
  over [tl, tu] (auto_LiRPA's ReluGrad), bounds of every t by linear bound propagation to
  the constant W_L^T c, and ||g||_1 by the chords of |g_i| over [gl_i, gu_i].

Only plain chains (each layer reads the previous one) are handled; the lipcert AffineDag is
read for its matrices (the network itself, not an algorithm).
"""

from __future__ import annotations

import torch

ITERATIONS, LR, DECAY = 20, 0.5, 0.98


def chain_of(dag) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The (W_k, b_k) of a chain DAG of ReLUs, or None when it is not a plain ReLU chain."""
    from lipcert.ir import ops as O

    ws, bs = [], []
    for k, aff in enumerate([*dag.pre, dag.out]):
        if set(aff.maps) != {k} or (k < dag.n_acts and not isinstance(dag.acts[k], O.Relu)):
            return None
        ws.append(aff.maps[k])
        bs.append(aff.bias)
    return ws, bs


def _crown_alpha(ws, bs, lows, ups, k, xl, xu):
    """alpha-CROWN bounds of z_k (0-based layer k >= 1) from the bounds of z_0..z_{k-1}."""
    a0 = torch.cat([ws[k], -ws[k]])
    c0 = torch.cat([bs[k], -bs[k]])
    alphas = {j: (ups[j] > -lows[j]).to(a0.dtype).expand(a0.shape[0], -1).clone()
              .requires_grad_() for j in range(k)}
    opt = torch.optim.Adam(list(alphas.values()), lr=LR)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, DECAY)
    best = None
    for step in range(ITERATIONS + 1):
        a, c = a0, c0
        for j in range(k - 1, -1, -1):  # a: coefficients on h_j
            lo, up = lows[j], ups[j]
            unstable, active = (lo < 0) & (up > 0), lo >= 0
            width = torch.where(unstable, up - lo, torch.ones_like(up))
            su = torch.where(unstable, up / width, active.to(a.dtype))
            iu = torch.where(unstable, -up * lo / width, torch.zeros_like(up))
            sl = torch.where(unstable, alphas[j], active.to(a.dtype))
            ap, an = a.clamp(min=0), a.clamp(max=0)
            coef = ap * su + an * sl
            c = c + ap @ iu + coef @ bs[j]
            a = coef @ ws[j]
        value = c + a.clamp(min=0) @ xu + a.clamp(max=0) @ xl
        best = value.detach() if best is None else torch.minimum(best, value.detach())
        if step == ITERATIONS:
            break
        opt.zero_grad()
        value.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for t in alphas.values():
                t.clamp_(0.0, 1.0)
    n = ws[k].shape[0]
    return -best[n:], best[:n]


def intermediate_bounds(ws, bs, xl, xu):
    """Bounds of every pre-activation: IBP intersected with alpha-CROWN."""
    lows, ups = [], []
    hl, hu = xl, xu
    for k in range(len(ws) - 1):
        wp, wn = ws[k].clamp(min=0), ws[k].clamp(max=0)
        lo, up = wp @ hl + wn @ hu + bs[k], wp @ hu + wn @ hl + bs[k]
        if k > 0:
            cl, cu = _crown_alpha(ws, bs, lows, ups, k, xl, xu)
            lo, up = torch.maximum(lo, cl), torch.minimum(up, cu)
        lows.append(lo)
        ups.append(up)
        hl, hu = lo.clamp(min=0), up.clamp(min=0)
    return lows, ups


def _product_lines(dl, du, tl, tu):
    """Chords of max(dl t, du t) (upper) and min(dl t, du t) (lower) over [tl, tu]."""
    width = tu - tl
    safe = torch.where(width > 0, width, torch.ones_like(width))
    hi_l, hi_u = torch.maximum(dl * tl, du * tl), torch.maximum(dl * tu, du * tu)
    lo_l, lo_u = torch.minimum(dl * tl, du * tl), torch.minimum(dl * tu, du * tu)
    au = torch.where(width > 0, (hi_u - hi_l) / safe, du)
    al = torch.where(width > 0, (lo_u - lo_l) / safe, dl)
    return al, lo_l - al * tl, au, hi_l - au * tl


def jacobian_l1_upper(ws, lows, ups, c) -> float:
    """Upper bound of max ||grad c^T f||_1 over the box, from the derivative sets."""
    n_hidden = len(ws) - 1
    dl = [(lo > 0).to(c.dtype) for lo in lows]
    du = [(up > 0).to(c.dtype) for up in ups]
    top = ws[-1].T @ c  # t_{L-1}: constant
    lines: dict[int, tuple] = {}

    def upper(j: int, a: torch.Tensor) -> torch.Tensor:
        """Upper bound of a @ t_j (a: (r, n_j)) by substitution up to the constant."""
        const = torch.zeros(a.shape[0], dtype=c.dtype)
        while j < n_hidden - 1:
            e = a @ ws[j + 1].T  # coefficients on y_{j+1}
            al, bl, au, bu = lines[j + 1]
            ep, en = e.clamp(min=0), e.clamp(max=0)
            const = const + ep @ bu + en @ bl
            a = ep * au + en * al
            j += 1
        return const + a @ top

    bounds = {n_hidden - 1: (top, top)}
    for j in range(n_hidden - 1, -1, -1):
        tl, tu = bounds[j]
        lines[j] = _product_lines(dl[j], du[j], tl, tu)
        if j > 0:
            eye = torch.eye(ws[j].shape[1], dtype=c.dtype)
            # t_{j-1} = W_j^T y_j: intervals from the lines' y bounds, and linear bounds
            al, bl, au, bu = lines[j]
            ylo = torch.minimum(al * tl + bl, al * tu + bl)
            yhi = torch.maximum(au * tl + bu, au * tu + bu)
            wt = ws[j].T
            il = wt.clamp(min=0) @ ylo + wt.clamp(max=0) @ yhi
            iu = wt.clamp(min=0) @ yhi + wt.clamp(max=0) @ ylo
            lu = upper(j - 1, eye)
            ll = -upper(j - 1, -eye)
            bounds[j - 1] = (torch.maximum(il, ll), torch.minimum(iu, lu))
    # g = W_0^T y_0
    al, bl, au, bu = lines[0]
    tl, tu = bounds[0]
    ylo = torch.minimum(al * tl + bl, al * tu + bl)
    yhi = torch.maximum(au * tl + bu, au * tu + bu)
    w0t = ws[0].T
    gl = w0t.clamp(min=0) @ ylo + w0t.clamp(max=0) @ yhi
    gu = w0t.clamp(min=0) @ yhi + w0t.clamp(max=0) @ ylo

    def g_upper(a):  # a @ g = (a @ W_0^T) @ y_0
        e = a @ w0t
        ep, en = e.clamp(min=0), e.clamp(max=0)
        return ep @ bu + en @ bl + upper(0, ep * au + en * al)

    eye0 = torch.eye(w0t.shape[0], dtype=c.dtype)
    gl, gu = torch.maximum(gl, -g_upper(-eye0)), torch.minimum(gu, g_upper(eye0))
    width = gu - gl
    slope = torch.where(width > 0, (gu.abs() - gl.abs()) / torch.where(width > 0, width, 1.0),
                        torch.sign(gl))
    icpt = gl.abs() - slope * gl
    linear = float(g_upper(slope[None])[0] + icpt.sum())
    return min(linear, float(torch.maximum(gl.abs(), gu.abs()).sum()))


def local_linf_bound(dag, low, high) -> float | None:
    """max_j of the baseline's bound on max ||grad f_j||_1 over the box; None when the DAG is
    not a plain ReLU chain."""
    chain = chain_of(dag)
    if chain is None:
        return None
    ws, bs = chain
    xl = torch.as_tensor(low, dtype=torch.float64)
    xu = torch.as_tensor(high, dtype=torch.float64)
    lows, ups = intermediate_bounds(ws, bs, xl, xu)
    eye = torch.eye(ws[-1].shape[0], dtype=torch.float64)
    return max(jacobian_l1_upper(ws, lows, ups, eye[j]) for j in range(eye.shape[0]))
