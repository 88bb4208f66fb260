r"""How an adapter's factors start: the random inits, and PiSSA and OLoRA, which read the weight.

* ``"default"``: ``A`` Kaiming-uniform, ``B`` zero; ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B`` zero.
  Both leave every output unchanged.
* ``"pissa"`` (Meng et al., 2024), as peft's ``init_lora_weights="pissa"``: with the SVD
  ``W0 = V diag(S) Uh``, ``A = diag(sqrt(S_r / s)) Uh_r`` and ``B = V_r diag(sqrt(S_r / s))``, so
  that ``s * B @ A`` is the best rank-``r`` approximation of ``W0``;
* ``"olora"`` (Büyükakyüz, 2024), as peft's ``init_lora_weights="olora"``: with the QR
  decomposition ``W0 = Q R``, ``A = R[:r]`` and ``B = Q[:, :r]``.

peft then overwrites ``W0`` with the residual ``W0 - s * B @ A``. Here ``W0`` is never written:
the initial factors are kept as frozen buffers ``lora_A0`` and ``lora_B0``, and the adapter's
update is ``s * (B @ A - B0 @ A0)``. The weight at init is ``W0`` (up to rounding), training
moves ``A`` and ``B`` away from ``A0`` and ``B0`` exactly as PiSSA/OLoRA do from the residual,
``remove(merge=False)`` gives back the original ``W0`` bit for bit, and ``remove(merge=True)``
folds in ``s * (B @ A - B0 @ A0)``. The memory cost is one more copy of the adapter's factors,
``r * (out + in)`` numbers per adapted tensor, and no weight-sized copy.

The decomposition runs in float32 (float64 for a float64 weight), batched over experts. With
``r`` larger than ``min(out, in)`` the extra rows of ``A`` and columns of ``B`` are zero.
"""

from __future__ import annotations

import contextvars
import math

import torch
from torch import Tensor, nn

__all__: list[str] = []

# Set while a load injects factors it overwrites next: they are left unfilled (torch.empty).
OVERWRITTEN = contextvars.ContextVar("lora_inject_factors_overwritten", default=False)

INITS = ("default", "gaussian", "pissa", "olora")
WEIGHT_INITS = ("pissa", "olora")  # the inits that read W0
RANDOM_INITS = ("default", "gaussian")


def init_factors(A: Tensor, B: Tensor, init: str) -> None:
    """Initialise ``A`` and ``B`` in place so that ``B @ A == 0`` (the weight inits: both zero,
    until :func:`decompose` fills them)."""
    with torch.no_grad():
        if A.is_meta or OVERWRITTEN.get():
            return  # nothing to fill; initialise after materialising (or the caller fills them)
        if A.numel() == 0 or B.numel() == 0 or init in WEIGHT_INITS:
            A.zero_(), B.zero_()
            return
        rows = A.reshape(-1, A.shape[-1])  # each expert's A rows share the fan-in `in`
        if init == "default":
            nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(rows, std=1 / A.shape[-2])
        else:  # validated by inject
            raise ValueError(f"inject(): unknown `init` {init!r}; use one of {INITS}.")
        B.zero_()


def decompose(init: str, M: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """``A`` (.., r, in) and ``B`` (.., out, r) for ``init`` from ``M`` (.., out, in), in ``M``'s dtype.

    Raises:
        ValueError: if ``M`` is not finite (the decompositions would fail or give garbage).
    """
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"inject(): init={init!r} decomposes the weight, which holds NaN or inf. Fix the "
                         "weight, or use init='default'.")
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(M, full_matrices=False)  # (.., out, k), (.., k), (.., k, in)
        root = (S[..., :r] / scaling).sqrt()
        A = root.unsqueeze(-1) * Uh[..., :r, :]  # diag(sqrt(S_r / s)) @ Uh_r
        B = V[..., :r] * root.unsqueeze(-2)  # V_r @ diag(sqrt(S_r / s))
    elif init == "olora":
        Q, R = torch.linalg.qr(M)  # (.., out, k), (.., k, in)
        A, B = R[..., :r, :], Q[..., :r]
    else:
        raise ValueError(f"inject(): unknown weight init {init!r}; use one of {WEIGHT_INITS}.")
    short = r - A.shape[-2]
    if short > 0:  # r > min(out, in): zero rows of A and columns of B
        A = torch.cat([A, A.new_zeros(*A.shape[:-2], short, A.shape[-1])], dim=-2)
        B = torch.cat([B, B.new_zeros(*B.shape[:-1], short)], dim=-1)
    return A, B
