r"""DoRA (Liu et al., 2024): the adapted weight as a magnitude times a direction.

For a DoRA adapter the tensor reads, in the rule's ``(out, in)`` matrix view,

    ``W = m * V / ||V||``,  with ``V = W0 + s * B @ A``,

the norm taken over ``in`` for each output unit (a row of the view: an output feature of a
``Linear``, an output channel of a ``Conv`` over ``in/groups * kernel``, an embedding dimension
of an ``Embedding`` over the vocabulary, as in peft; each expert on its own for expert weights).
``m`` has shape ``(out,)`` (``(E, out)`` for experts) and is initialised to ``||W0||``, so the
model is unchanged at init. As in the paper (section 4.3) and peft, ``||V||`` is a constant for
autograd: it carries no gradient.

With several active adapters on one tensor they apply in order, as in peft: a plain adapter adds
``s_i * B_i @ A_i`` to the weight so far, and a DoRA adapter turns the weight so far, ``W``, into
``g_i * (W + s_i * B_i @ A_i)`` with the gain ``g_i = m_i / ||W0 + s_i * B_i @ A_i||`` (its norm is
taken with ``W0``, as peft does). So the weight is ``c * W0 + sum_i k_i * s_i * B_i @ A_i``, where
``c`` is the product of all gains and ``k_i`` that of the gains of the DoRA adapters from ``i`` on.
Because every output of a factored layer is linear in the weight and ``c`` and ``k`` scale output
units, the fast path computes ``c * op(x, W0) + bias + sum_i op(op(x, A_i), k_i * B_i)``: no
weight-sized tensor is saved for backward or differentiated; only ``||V||`` is computed, without
gradient, once per forward.

Dropout, as for any adapter, acts on the input of the low-rank branch only. peft and the DoRA
reference code also pass the dropped input through the ``(g - 1) * W0`` term; the two agree
without dropout and in eval mode, and in expectation in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []


def as_rows(lora, W: Tensor) -> Tensor:
    """``W`` in the rule's matrix view: ``(out, in)``, or ``(E, out, in)`` for experts."""
    lead = (lora.shape[0],) if lora.experts else ()
    if lora.transpose:
        return W.reshape(*lead, lora.in_features, lora.out_features).mT
    return W.reshape(*lead, lora.out_features, lora.in_features)


def from_rows(lora, M: Tensor) -> Tensor:
    """The inverse of :func:`as_rows`: back to the tensor's own shape."""
    return (M.mT if lora.transpose else M).reshape(lora.shape)


def is_dora(lora, name: str) -> bool:
    return bool(lora.config[name].get("dora"))


def norms(lora, W: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """``||W + ΔW_name||`` over ``in`` for each output unit, ``(out,)`` or ``(E, out)``, no gradient.

    With ``ΔW = s B A`` it is ``sqrt(||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>)`` per row: two
    reads of ``W`` and no weight-sized temporary, where building ``W + ΔW`` would take several.
    """
    with torch.no_grad():
        M = as_rows(lora, W.detach()).to(dtype)  # (.., out, in)
        A, B = (t.detach().to(dtype) for t in lora.factor_pair(name))  # (.., r, in), (.., out, r)
        s = lora.scaling[name]
        sq = torch.linalg.vector_norm(M, dim=-1).square()
        sq = sq + (2 * s) * ((M @ A.mT) * B).sum(-1)  # (.., out, in) @ (.., in, r) -> (.., out, r)
        sq = sq + (s * s) * ((B @ (A @ A.mT)) * B).sum(-1)
        return sq.clamp_min(0).sqrt()


def gain(lora, W: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """``g = m / ||W + ΔW||`` of DoRA adapter ``name``, ``(out,)``; gradient flows to ``m`` only.

    A row whose ``W + ΔW`` is exactly zero has ``m = 0`` from init and gets ``g = 1`` rather than
    ``0 / 0``: its weight row is then ``W + ΔW``, zero, as it was.
    """
    m = lora.lora_magnitude[name]
    # Round the norm as m is stored, so that g is exactly 1 at init in any precision.
    n = norms(lora, W, name, dtype).to(m.dtype).to(dtype)
    m = m.to(dtype)
    return torch.where(n == 0, torch.ones_like(m), m / torch.where(n == 0, 1, n))


def scales(lora, W: Tensor, names, dtype: torch.dtype) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``(c, k)`` such that the weight is ``c * W + sum_i k_i * ΔW_i`` over ``names`` in order:
    ``c`` the product of the DoRA gains (None without DoRA), ``k_i`` that of the gains from ``i``
    on (absent where it is 1)."""
    c, k = None, {}
    for name in names:
        k[name] = None
        if is_dora(lora, name):
            g = gain(lora, W, name, dtype)
            c = g if c is None else c * g
            k = {j: g if v is None else v * g for j, v in k.items()}
    return c, {j: v for j, v in k.items() if v is not None}


def merged(lora, W: Tensor, names) -> Tensor:
    """``c * W + sum_i k_i * ΔW_i`` in ``W``'s shape and dtype, summed in float32 or wider."""
    ct = torch.promote_types(torch.promote_types(W.dtype, torch.float32), lora._factor_dtype())
    c, k = scales(lora, W, names, ct)
    total = as_rows(lora, W).to(ct)
    total = total if c is None else total * c.unsqueeze(-1)
    for name in names:
        update = lora.update(name, ct)  # (.., out, in)
        total = total + (update * k[name].unsqueeze(-1) if name in k else update)
    return from_rows(lora, total).to(W.dtype)


def init_magnitude(lora, name: str, W: Tensor) -> None:
    """Set ``m`` of adapter ``name`` to ``||W + ΔW||``, so that its weight equals ``W + ΔW``."""
    m = lora.lora_magnitude[name]
    with torch.no_grad():
        m.copy_(norms(lora, W, name, torch.promote_types(W.dtype, torch.float32)))


def magnitude_shape(lora) -> tuple[int, ...]:
    return ((lora.shape[0],) if lora.experts else ()) + (lora.out_features,)
