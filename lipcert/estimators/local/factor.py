"""The right-hand factors of backward substitution: a map of the DAG or its transpose."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ir.linear_operators import LinearOperator
from ...ir.lowering import Affine


@dataclass(frozen=True)
class Factor:
    """A matrix T of products p @ T: a map M of the DAG (``transposed`` False) or its
    transpose, dense or, where the DAG has one, through its matrix-free operator."""

    matrix: torch.Tensor  # T itself (a view of M^T when transposed)
    operator: LinearOperator | None = None
    transposed: bool = False

    @staticmethod
    def of(affine: Affine, j: int, transposed: bool = False) -> Factor:
        m = affine.maps[j]
        return Factor(m.T if transposed else m, affine.ops.get(j), transposed)

    def right(self, p: torch.Tensor) -> torch.Tensor:
        """p @ T for p of shape (..., rows of T)."""
        if self.operator is None:
            return p @ self.matrix
        return self.operator.times_transpose(p) if self.transposed else self.operator.times(p)
