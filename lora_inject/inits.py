r"""Inits that read the weight: PiSSA and OLoRA.

Both start the adapter from a low-rank part of ``W0`` (in the rule's ``(out, in)`` matrix view):

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

import torch
from torch import Tensor, nn

from .dora import as_rows, init_magnitude, is_dora

__all__: list[str] = []

WEIGHT_INITS = ("pissa", "olora")


class BufferDict(nn.Module):
    """A dict of buffers, saved in the state dict as ``<prefix>.<key>``, as ``ParameterDict`` does."""

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()


def decompose(init: str, M: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """``A`` (.., r, in) and ``B`` (.., out, r) for ``init`` from ``M`` (.., out, in), in ``M``'s dtype."""
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


def init_from_weight(lora, name: str, W: Tensor) -> None:
    """Initialise what adapter ``name`` reads from the weight ``W`` that ``lora`` receives:
    PiSSA/OLoRA factors (and their frozen copies), then DoRA's magnitude."""
    config = lora.config[name]
    if W.is_meta:
        return  # nothing to read; initialise after materialising the weight
    with torch.no_grad():
        if config["init"] in WEIGHT_INITS:
            M = as_rows(lora, W.detach()).to(torch.promote_types(W.dtype, torch.float32))
            A, B = decompose(config["init"], M, config["r"], lora.scaling[name])
            lora.lora_A[name].copy_(A)
            lora.lora_B[name].copy_(B)
            lora.lora_A0[name].copy_(lora.lora_A[name])
            lora.lora_B0[name].copy_(lora.lora_B[name])
        if is_dora(lora, name):
            init_magnitude(lora, name, W)
