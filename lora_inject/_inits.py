r"""How an adapter's factors start: the random inits, and PiSSA and OLoRA, which read the weight.

* ``"default"``: ``A`` Kaiming-uniform, ``B`` zero; ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B`` zero.
  Both leave every output unchanged.
* ``"pissa"`` (Meng et al., 2024), as peft's ``init_lora_weights="pissa"``: with the SVD
  ``W0 = V diag(S) Uh``, ``A = diag(sqrt(S_r / s)) Uh_r`` and ``B = V_r diag(sqrt(S_r / s))``, so
  that ``s * B @ A`` is the best rank-``r`` approximation of ``W0``;
* ``"olora"`` (Büyükakyüz, 2024), as peft's ``init_lora_weights="olora"``: with the QR
  decomposition ``W0 = Q R``, ``A = R[:r]`` and ``B = Q[:, :r]``.

* ``"loftq"`` (Li et al., 2023), for a ``W0`` that is already quantized (bitsandbytes 4-bit,
  torchao NF4, any scheme of :mod:`lora_inject._quant`), given the dense weight it was quantized
  from (``inject(..., init="loftq", dense=state_dict)``): ``s * B @ A`` is the truncated SVD of
  ``dense - dequantize(W0)``, so that ``W0 + s * B @ A`` is the closest rank-``r`` correction of
  the quantized weight to the dense one (Eckart-Young). ``W0`` is fixed, so no alternation is
  needed: peft's LoftQ alternates because it quantizes too. Unlike peft's
  (``replace_lora_weights_loftq``, which ignores the scaling), the factors account for
  ``s``. The adapter is then a plain LoRA that starts there: its record says ``init="default"``,
  and it is saved and loaded as any other.

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
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _dora as dora
from . import _quant as quant
from ._view import View, compute_dtype
from .kind import find_kind

# Set while a load injects factors it overwrites next: they are left unfilled (torch.empty).
OVERWRITTEN = contextvars.ContextVar("lora_inject_factors_overwritten", default=False)

INITS = ("default", "gaussian", "pissa", "olora", "loftq")
WEIGHT_INITS = ("pissa", "olora")  # the inits that read W0
RANDOM_INITS = ("default", "gaussian")
START_INITS = ("loftq",)  # the inits that only set where the factors start (recorded as "default")


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


def loftq_factors(sites: Sequence[tuple[str, Tensor, View]], dense: object, r: int,
                  scaling: float) -> dict[str, tuple[Tensor, Tensor]]:
    """LoftQ's ``(A, B)`` for each site ``(state-dict key, quantized W0, view)``: ``s * B @ A`` is
    the best rank-``r`` approximation of ``dense[key] - dequantize(W0)``, in float32 (float64 for
    a float64 dense weight).

    Raises:
        TypeError: if ``dense`` is not a mapping, or holds a non-tensor at a site's key.
        ValueError: if a site's ``W0`` is not quantized, or ``dense`` lacks its key, or holds a
            tensor of another shape there, or one that is not finite.
    """
    if not isinstance(dense, Mapping):
        raise TypeError(f"inject(init='loftq'): `dense` must be a mapping from the model's state-dict keys to "
                        f"the dense weights (the original checkpoint's state dict), got {type(dense).__name__}.")
    plain = [key for key, w0, _ in sites if quant.scheme(w0) is None]
    if plain:
        raise ValueError(f"inject(init='loftq'): {plain[:3]} are not quantized, but LoftQ corrects a quantized "
                         "W0 towards the dense weight. Quantize those layers first (bitsandbytes' Linear4bit, "
                         "torchao's NF4), leave them out with `exclude=`, or use another init.")
    missing = [key for key, _, _ in sites if key not in dense]
    if missing:
        raise ValueError(f"inject(init='loftq'): `dense` lacks {missing[:3]} ({len(missing)} of the "
                         f"{len(sites)} adapted tensors); it must hold the dense weight of each under the model's "
                         "state-dict key, as the original checkpoint does.")
    out = {}
    for key, w0, view in sites:
        t = dense[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"inject(init='loftq'): `dense[{key!r}]` must be a tensor, got {type(t).__name__}.")
        if tuple(t.shape) != tuple(view.shape):
            raise ValueError(f"inject(init='loftq'): `dense[{key!r}]` has shape {tuple(t.shape)}, but the weight "
                             f"has shape {tuple(view.shape)}. Pass the state dict of this model's checkpoint.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"inject(init='loftq'): `dense[{key!r}]` holds NaN or inf.")
        ct = compute_dtype(t.dtype)
        with torch.no_grad():
            D = view.rows(t.detach().to(w0.device, ct)) - view.rows(quant.dense(w0).detach().to(ct))  # (.., out, in)
            out[key] = decompose("pissa", D, r, scaling)  # s * B @ A: the top r singular triplets of D
    return out


def init_from_weight(lora, name: str, W: Tensor) -> None:
    """Initialise what adapter ``name`` of ``lora`` (a :class:`~lora_inject.LoRA`) reads from the
    weight ``W`` that ``lora`` receives: PiSSA/OLoRA factors (and their frozen copies), then
    DoRA's magnitude; for another kind, what its :attr:`~lora_inject.Kind.fill` sets. ``inject``
    and ``init_lora`` call it once the adapter's tensors exist.

    Raises:
        ValueError: if a PiSSA/OLoRA init meets a weight that is not finite.
    """
    a = lora.records[name]
    if W.is_meta:
        return  # nothing to read; initialise after materialising the weight
    if a.kind != "lora":
        fill = find_kind(a.kind).fill
        if fill is not None:
            with torch.no_grad():
                fill(lora.tensors(name), quant.dense(W).detach(), lora.view, a.options)
        return
    with torch.no_grad():
        W = quant.dense(W)  # a quantized weight is read as the dense one it stands for
        M = lora.view.rows(W.detach())
        if a.init in WEIGHT_INITS:
            A, B = decompose(a.init, M.to(compute_dtype(W.dtype)), a.r, a.scaling)
            lora.lora_A[name].copy_(A)
            lora.lora_B[name].copy_(B)
            lora.lora_A0[name].copy_(lora.lora_A[name])
            lora.lora_B0[name].copy_(lora.lora_B[name])
        if a.dora:
            A, B = lora.factor_pair(name)
            m = lora.lora_magnitude[name]
            m.copy_(dora.norms(M, A, B, a.scaling, compute_dtype(W.dtype), a.dora_axis, m.shape[-1]))
