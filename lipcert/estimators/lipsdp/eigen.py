"""Eigenvalue and norm estimates for LipSDP's searches and proposers, never bounds: ARPACK's
implicitly restarted Lanczos on large dense matrices, LAPACK on small ones and whenever
ARPACK fails or returns a non-finite value. The certificate (:mod:`.certificate`) proves
its own margin above whatever they return."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

#: from this size on Lanczos replaces a dense tridiagonalisation (a 3072 x 3072 Schur
#: complement: 2.3 s dense, about 0.6 s Lanczos; a 4096 x 3072 unrolled conv's norm: 5 s
#: dense)
LANCZOS_FROM = 1024


def top_eigenpairs(a: np.ndarray, k: int, vectors: bool = True, tol: float = 1e-13):
    """The k largest eigenvalues of a symmetric matrix, ascending, and with ``vectors``
    their eigenvectors as columns: LAPACK's subset below :data:`LANCZOS_FROM`, ARPACK
    (to ``tol``) beyond."""
    n = a.shape[0]
    k = min(k, n)
    if n >= LANCZOS_FROM and k < n - 1:
        from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh

        try:
            found = eigsh(a, k=k, which="LA", tol=tol, return_eigenvectors=vectors)
        except (ArpackError, ArpackNoConvergence):
            found = None
        vals = found if found is None or not vectors else found[0]
        if vals is not None and np.all(np.isfinite(vals)):
            order = np.argsort(vals)
            return (vals[order], found[1][:, order]) if vectors else vals[order]
    return sla.eigh(a, subset_by_index=[n - k, n - 1], eigvals_only=not vectors,
                    check_finite=False)


def spectral_norm_estimate(w: np.ndarray) -> float:
    """||W||_2 estimated: a dense SVD below :data:`LANCZOS_FROM` on the smaller side,
    Lanczos on W beyond. For choices such as :func:`.lmi.rescale`'s powers of two."""
    if min(w.shape) < LANCZOS_FROM:
        return float(np.linalg.norm(w, 2))
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, svds

    try:
        top = svds(w, k=1, tol=1e-6, return_singular_vectors=False)
        if np.all(np.isfinite(top)):
            return float(top[-1])
    except (ArpackError, ArpackNoConvergence):
        pass
    return float(np.linalg.norm(w, 2))
