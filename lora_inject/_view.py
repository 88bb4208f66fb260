"""How an adapted tensor is seen as a matrix, and in which dtype its updates are summed.

Every shape that LoRA derives from a tensor comes from :class:`View`: the ``(out, in)`` matrix,
the experts lead dimension, the factors' shapes, and the way back to the stored layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class View:
    """A tensor of ``shape`` seen as the matrix ``(out, in)``, or ``(E, out, in)`` for experts.

    * rows (``transpose=False``): ``(d0, d1, .., dk)`` is ``(d0, d1 * .. * dk)``;
    * ``transpose=True``: a 2-D ``(in, out)`` tensor is its transpose;
    * ``experts=True``: the first dimension is ``E``, and the rest is seen as above.
    """

    shape: tuple[int, ...]
    transpose: bool = False
    experts: bool = False

    @property
    def lead(self) -> tuple[int, ...]:
        """``(E,)`` for experts, else ``()``."""
        return self.shape[:1] if self.experts else ()

    @property
    def out_features(self) -> int:
        core = self.shape[len(self.lead):]
        return core[-1] if self.transpose else core[0]

    @property
    def in_features(self) -> int:
        core = self.shape[len(self.lead):]
        return core[0] if self.transpose else math.prod(core[1:])

    @property
    def out_dim(self) -> int:
        """The dimension of the stored tensor (past the lead) that holds the output units."""
        return 1 if self.transpose else 0

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``A`` ``(.., r, in)`` and ``B`` ``(.., out, r)``."""
        return (*self.lead, r, self.in_features), (*self.lead, self.out_features, r)

    def magnitude_shape(self, axis: str = "out") -> tuple[int, ...]:
        """The shape of DoRA's magnitude: one entry per output unit, ``(.., out)``; for ``axis="in"``
        one per input unit of the stored tensor (an input channel of a ``Conv``, its kernel within)."""
        if axis == "out":
            return (*self.lead, self.out_features)
        return (*self.lead, self.shape[len(self.lead) + 1 - self.out_dim])

    def stored_factors(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(L, R)`` such that the update ``s * B @ A`` is ``s * L @ R`` in the stored layout:
        ``(B, A)`` by rows, ``(A.T, B.T)`` transposed."""
        return (A.mT, B.mT) if self.transpose else (B, A)

    def rows(self, W: Tensor) -> Tensor:
        """``W`` as the matrix ``(.., out, in)``."""
        if self.transpose:
            return W.reshape(*self.lead, self.in_features, self.out_features).mT
        return W.reshape(*self.lead, self.out_features, self.in_features)

    def stored(self, M: Tensor) -> Tensor:
        """The inverse of :meth:`rows`: ``(.., out, in)`` back to the stored shape."""
        return (M.mT if self.transpose else M).reshape(self.shape)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype in which updates are summed: the widest of ``dtypes`` and float32."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out
