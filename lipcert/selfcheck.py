"""The soundness self-check: before a certified number is printed, compare it with a quick
sampled *lower* bound of the same quantity on the same region, and attack every certified
sample inside its radius.

A printed upper bound below a value the network actually attains, or a certified sample that
onnxruntime classifies differently inside its radius, can only come from a bug (in lipcert or
a solver it trusts): lipcert then prints no number and exits 3. The check is cheap (a handful
of Jacobians, a few onnxruntime calls per certified sample); it can be switched off with
``--no-self-check`` (``self_check=False``), which the notes then say.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .errors import InternalCheckFailed
from .estimators.common.region import nudged
from .ir import evaluate
from .ir.graph import Graph

POINTS = 8  # Jacobians per self-check


def _jacobians(graph: Graph, xs: torch.Tensor) -> torch.Tensor:
    """(B, m, n) Jacobians of the flattened output at the points ``xs`` (B, *input_shape).

    One batched forward (vmap) and one backward pass per output: ``torch.func.jacrev`` would
    import torch's compiler stack on first use (about 2 s), more than the check may cost."""
    n_out = int(np.prod(graph.output_shape))
    n_in = int(np.prod(graph.input_shape))
    if n_out > 64:  # wide outputs: forward mode per point
        return torch.stack([torch.autograd.functional.jacobian(
            lambda v: evaluate.run(graph, v).reshape(-1), x, strategy="forward-mode",
            vectorize=True) for x in xs]).reshape(xs.shape[0], n_out, n_in)
    xs = xs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = evaluate.run_batch(graph, xs).reshape(xs.shape[0], n_out)
        rows = [torch.autograd.grad(out[:, j].sum(), xs, retain_graph=j + 1 < n_out)[0]
                for j in range(n_out)]
    return torch.stack(rows, dim=1).reshape(xs.shape[0], n_out, n_in)


def sample_points(graph: Graph, box: tuple[np.ndarray, np.ndarray] | None, n: int,
                  seed: int = 0) -> torch.Tensor:
    """Points of the region: the box's centre, corners of random signs and interior points,
    each moved off kinks (:func:`nudged`); without a box, normal and uniform points of
    several scales (random, so off kinks almost surely)."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.input_shape
    if box is not None:
        low = torch.as_tensor(box[0], dtype=torch.float64).reshape(shape)
        high = torch.as_tensor(box[1], dtype=torch.float64).reshape(shape)
        u = torch.rand((n, *shape), generator=gen, dtype=torch.float64)
        u[1: n // 2 + 1] = (u[1: n // 2 + 1] > 0.5).to(torch.float64)  # corners
        u[0] = 0.5
        points = (low + u * (high - low)).numpy()
        rng = np.random.default_rng(seed)
        return torch.as_tensor(nudged(points, low.numpy(), high.numpy(), rng))
    scales = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    xs = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    xs = xs * scales[torch.arange(n) % 3].reshape(-1, *([1] * len(shape)))
    xs[n // 2:] = torch.rand((n - n // 2, *shape), generator=gen, dtype=torch.float64)
    return xs


def quick_lower(graph: Graph, norm: str, *, box: tuple[np.ndarray, np.ndarray] | None = None,
                queries: np.ndarray | None = None, points: int = POINTS,
                seed: int = 0) -> np.ndarray:
    """True lower bounds on the Lipschitz constant of f (one value), or of each c_q^T f (one
    per row of ``queries``), on the region: the largest Jacobian norm at a few of its points.
    Non-finite Jacobians (overflow) prove nothing and count as 0."""
    xs = sample_points(graph, box, points, seed)
    with torch.no_grad():
        jac = _jacobians(graph, xs)  # (P, m, n)
    if queries is not None:
        rows = torch.as_tensor(np.atleast_2d(queries), dtype=torch.float64)
        values = _functional_norms(rows @ jac, norm)  # (P, Q)
    elif norm == "2":
        values = _finite_or_zero(torch.linalg.matrix_norm(jac, ord=2)[:, None])
    else:
        values = _finite_or_zero(jac.abs().sum(dim=-1).max(dim=-1).values[:, None])
    return values.max(dim=0).values.numpy()


def _finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    """A non-finite Jacobian norm (overflow) proves nothing: it counts as 0."""
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def _functional_norms(grads: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norms of gradients c_q^T J (last axis): l1 for linf inputs, l2 for l2."""
    values = grads.abs().sum(-1) if norm == "inf" else torch.linalg.vector_norm(grads, dim=-1)
    return _finite_or_zero(values)


def _first_below(uppers: np.ndarray, lowers: np.ndarray, tol: float) -> tuple | None:
    """Index of the first upper bound below its lower bound (NaN counts as below)."""
    bad = np.argwhere(~(np.asarray(uppers) >= np.asarray(lowers) * (1.0 - tol)))
    return tuple(int(i) for i in bad[0]) if bad.size else None


def check_upper(graph: Graph, method: str, norm: str, uppers: list[float], *,
                certificate: bool, box: tuple[np.ndarray, np.ndarray] | None = None,
                queries: np.ndarray | None = None, points: int = POINTS) -> dict:
    """Raise InternalCheckFailed when an upper bound (one, or one per query row) lies below a
    sampled lower bound of the same quantity on the same region; returns what was checked."""
    start = time.perf_counter()
    lowers = quick_lower(graph, norm, box=box, queries=queries, points=points)
    tol = 1e-9 if certificate else 1e-6  # a MIP reference value carries solver tolerances
    bad = _first_below(np.asarray(uppers, dtype=np.float64), lowers, tol)
    if bad is not None:
        upper, lower = uppers[bad[0]], lowers[bad[0]]
        raise InternalCheckFailed(
            f"soundness check failed: method {method} computed the upper bound "
            f"{upper:.9g}, but the network attains a Jacobian norm of {lower:.9g} on the "
            "same region. No bound printed; this is a bug in lipcert, please report it "
            "with the model")
    return {"sampled_lower": float(lowers.max()), "points": points,
            "seconds": time.perf_counter() - start}


def check_boxes(graph: Graph, method: str, norm: str, boxes: list[tuple[np.ndarray, np.ndarray]],
                queries: np.ndarray, uppers: np.ndarray, seed: int = 0,
                floors: np.ndarray | None = None) -> dict:
    """:func:`check_upper` for many boxes at once (certification with a box-scoped method):
    each box's centre and one corner of random signs, ``queries`` (S, Q, m) and ``uppers``
    (S, Q) per box, all Jacobians from one batched forward. ``floors`` (S, Q): lower bounds
    of each query's value on its box (-inf: none), checked at the same points."""
    start = time.perf_counter()
    if not boxes:
        return {"boxes": 0, "seconds": 0.0}
    rng = np.random.default_rng(seed)
    pts = []
    for low, high in boxes:
        pts += [nudged(p, low, high, rng) for p in
                ((low + high) / 2, np.where(rng.uniform(size=low.size) > 0.5, high, low))]
    xs = torch.as_tensor(np.stack(pts)).reshape(len(pts), *graph.input_shape)
    with torch.no_grad():
        jac = _jacobians(graph, xs).reshape(len(boxes), 2, -1, xs[0].numel())
    g = torch.as_tensor(queries, dtype=torch.float64)[:, None] @ jac  # (S, 2, Q, n)
    lowers = _functional_norms(g, norm).max(dim=1).values.numpy()  # (S, Q)
    bad = _first_below(uppers, lowers, 1e-9)
    if bad is not None:
        s, q = bad
        raise InternalCheckFailed(
            f"soundness check failed: method {method} bounded query {int(q)} of box {int(s)} "
            f"by {uppers[s, q]:.9g}, but the network attains {lowers[s, q]:.9g} in that box. "
            "No result printed; this is a bug in lipcert, please report it with the model")
    if floors is not None:
        with torch.no_grad():
            out = evaluate.run_batch(graph, xs).reshape(len(boxes), 2, -1)
        values = (torch.as_tensor(queries, dtype=torch.float64)[:, None] @ out[..., None])
        lowest = values[..., 0].min(dim=1).values.numpy()  # (S, Q)
        # written so that NaN fails: a floor is consistent only when proven below the values
        bad = np.argwhere(~(np.asarray(floors) <= lowest + 1e-9 * (1 + np.abs(lowest))))
        if bad.size:
            s, q = bad[0]
            raise InternalCheckFailed(
                f"soundness check failed: method {method} bounded query {int(q)} of box "
                f"{int(s)} from below by {floors[s, q]:.9g}, but the network takes "
                f"{lowest[s, q]:.9g} in that box. No result printed; this is a bug in "
                "lipcert, please report it with the model")
    return {"boxes": len(boxes), "points": 2 * len(boxes),
            "seconds": time.perf_counter() - start}


def attack_points(x: np.ndarray, grads: np.ndarray, radii: np.ndarray, norm: str,
                  domain: tuple[float, float] | None, seed: int = 0) -> np.ndarray:
    """Per sample, points inside its certified radius (0.999 r: clear of ties at the
    boundary): the signed-gradient point, half of it, and two random directions.
    Shape (n_samples, 4, n_in)."""
    rng = np.random.default_rng(seed)
    n, n_in = x.shape
    r = (0.999 * radii)[:, None]
    if norm == "inf":
        g = np.sign(grads)
        rand = rng.choice([-1.0, 1.0], size=(n, 2, n_in))
    else:
        g = grads / np.maximum(np.linalg.norm(grads, axis=1, keepdims=True), 1e-300)
        rand = rng.standard_normal((n, 2, n_in))
        rand /= np.linalg.norm(rand, axis=2, keepdims=True)
    steps = np.stack([g, 0.5 * g, rand[:, 0], rand[:, 1]], axis=1) * r[:, None]
    pts = x[:, None, :] + steps
    if domain is not None:
        pts = np.clip(pts, domain[0], domain[1])
    return pts


def margin_gradients(graph: Graph, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Gradient of (runner-up logit - label logit) at each sample (float64 IR; plain autograd
    through the batched forward: ``torch.func.grad`` would import torch's compiler, ~1 s)."""
    xs = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), *graph.input_shape)
    xs.requires_grad_(True)
    logits = evaluate.run_batch(graph, xs).reshape(len(x), -1)
    ys = torch.as_tensor(labels, dtype=torch.long)
    is_label = torch.nn.functional.one_hot(ys, logits.shape[1]).bool()
    others = torch.where(is_label, torch.full_like(logits, -torch.inf), logits)
    loss = others.max(dim=1).values - (logits * is_label).sum(dim=1)
    (grads,) = torch.autograd.grad(loss.sum(), xs)  # samples are independent: one backward
    return grads.reshape(len(x), -1).detach().numpy()


def check_certified(graph: Graph, x: np.ndarray, labels: np.ndarray, radii: np.ndarray,
                    norm: str, predict: Callable[[np.ndarray], np.ndarray],
                    domain: tuple[float, float] | None = None) -> dict:
    """Attack every certified sample (x, label, radius) at a few points inside its radius
    and classify them with ``predict`` (onnxruntime); a flip raises InternalCheckFailed."""
    start = time.perf_counter()
    keep = np.flatnonzero(np.isfinite(radii) & (radii > 0))
    if keep.size == 0:
        return {"attacked": 0, "points": 0, "seconds": time.perf_counter() - start}
    xk = x[keep].reshape(len(keep), -1)
    grads = margin_gradients(graph, xk, labels[keep])
    pts = attack_points(xk, grads, radii[keep], norm, domain)
    preds = predict(pts.reshape(-1, xk.shape[1])).reshape(len(keep), -1)
    flipped = np.argwhere(preds != labels[keep][:, None])
    if flipped.size:
        i, k = flipped[0]
        sample = int(keep[i])
        dist = np.abs(pts[i, k] - xk[i]).max() if norm == "inf" else \
            np.linalg.norm(pts[i, k] - xk[i])
        raise InternalCheckFailed(
            f"soundness check failed: sample {sample} was certified at radius "
            f"{radii[sample]:.6g} (l{norm}), but onnxruntime classifies a point at distance "
            f"{dist:.6g} as {int(preds[i, k])} instead of {int(labels[sample])}. No result "
            "printed; this is a bug in lipcert, please report it with the model and data")
    return {"attacked": int(keep.size), "points": int(pts.shape[0] * pts.shape[1]),
            "seconds": time.perf_counter() - start}
