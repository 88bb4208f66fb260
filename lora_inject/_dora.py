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
Because every output of a factored op is linear in the weight, and ``c`` and ``k`` scale output
units, the fast path computes ``c * op(x, W0) + bias + sum_i op(op(x, A_i), k_i * B_i)`` where the
op's output carries the output units; other ops get the merged weight. Only ``||V||`` is
computed, without gradient, once per forward.

LyCORIS also writes DoRA with the norm per *input* unit (its ``wd_on_out=False``; the record's
``dora_axis="in"``): ``||V||`` over the output units (and a ``Conv``'s kernel) for each input
channel, ``m`` of shape ``(in,)``, and the gain scales the columns of the view. No op's output
carries those, so such a weight always takes the merged path, and its adapters apply one after
the other as above, each gain on the weight so far.

Dropout, as for any adapter, acts on the input of the low-rank branch only. peft and the DoRA
reference code also pass the dropped input through the ``(g - 1) * W0`` term; the two agree
without dropout and in eval mode, and in expectation in training.

Every function here works on the matrix view ``M`` ``(.., out, in)`` and on *terms*: objects with
``A`` ``(.., r, in)``, ``B`` ``(.., out, r)``, ``scaling`` and ``magnitude`` (``(.., out)`` for a
DoRA adapter, else None).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _units(M: Tensor, units: int) -> Tensor:
    """The view ``(.., out, in)`` as ``(.., out, units, in / units)``: its columns by input unit."""
    return M.unflatten(-1, (units, -1))


def scaled(M: Tensor, g: Tensor, axis: str) -> Tensor:
    """The view ``M`` with its output units (``axis="out"``) or input units (``"in"``) times ``g``."""
    if axis == "out":
        return M * g.unsqueeze(-1)
    return (_units(M, g.shape[-1]) * g.unsqueeze(-1)).flatten(-2)


def norms(M: Tensor, A: Tensor, B: Tensor, s: float, dtype: torch.dtype, axis: str = "out",
          units: int = 0) -> Tensor:
    """``||M + s B A||`` over ``in`` for each output unit, ``(.., out)``, in ``dtype``, no gradient;
    for ``axis="in"`` over ``out`` (and the kernel) for each input unit, ``(.., units)``.

    By rows it is ``sqrt(||M||^2 + 2 s <M A^T, B> + s^2 <B (A A^T), B>)`` per row: two reads of ``M`` and
    no weight-sized temporary, where building ``M + s B A`` would take several.
    """
    with torch.no_grad():
        M, A, B = M.detach().to(dtype), A.detach().to(dtype), B.detach().to(dtype)
        if axis != "out":
            return _units(M + s * (B @ A), units).square().sum((-3, -1)).sqrt()
        sq = torch.linalg.vector_norm(M, dim=-1).square()
        sq = sq + (2 * s) * ((M @ A.mT) * B).sum(-1)  # (.., out, in) @ (.., in, r) -> (.., out, r)
        sq = sq + (s * s) * ((B @ (A @ A.mT)) * B).sum(-1)
        return sq.clamp_min(0).sqrt()


def gain(M: Tensor, term, dtype: torch.dtype) -> Tensor:
    """``g = m / ||M + s B A||`` of a DoRA term, ``(.., out)``; gradient flows to ``m`` only.

    A row whose ``M + s B A`` is exactly zero has ``m = 0`` from init and gets ``g = 1`` rather than
    ``0 / 0``: its weight row is then ``M + s B A``, zero, as it was.
    """
    m = term.magnitude
    # Round the norm as m is stored, so that g is exactly 1 at init in any precision.
    n = norms(M, term.A, term.B, term.scaling, dtype, term.axis, m.shape[-1]).to(m.dtype).to(dtype)
    m = m.to(dtype)
    zero = n == 0
    return torch.where(zero, torch.ones_like(m), m / n.masked_fill(zero, 1))


def scales(M: Tensor, terms: Sequence, dtype: torch.dtype) -> tuple[Tensor | None, list[Tensor | None]]:
    """``(c, k)`` such that the weight is ``c * M + sum_i k_i * s_i B_i A_i`` over ``terms`` in
    order: ``c`` the product of the DoRA gains (None without DoRA), ``k_i`` that of the gains
    from ``i`` on (None where it is 1)."""
    c, k = None, [None] * len(terms)
    for i, term in enumerate(terms):
        if term.magnitude is not None:
            g = gain(M, term, dtype)
            c = g if c is None else c * g
            k[:i + 1] = [g if v is None else v * g for v in k[:i + 1]]
    return c, k


def merged(M: Tensor, terms: Sequence, dtype: torch.dtype) -> Tensor:
    """``c * M + sum_i k_i * s_i B_i A_i`` in the matrix view, in ``dtype``, with gradients (with a
    DoRA term of axis ``"in"``, the terms one after the other, each gain on the weight so far)."""
    if any(t.magnitude is not None and t.axis != "out" for t in terms):
        total = M.to(dtype)
        for term in terms:
            total = total + torch.matmul(term.B.to(dtype), term.A.to(dtype)) * term.scaling
            if term.magnitude is not None:
                total = scaled(total, gain(M, term, dtype), term.axis)
        return total
    c, k = scales(M, terms, dtype)
    total = M.to(dtype)
    total = total if c is None else total * c.unsqueeze(-1)
    for term, ki in zip(terms, k):
        update = torch.matmul(term.B.to(dtype), term.A.to(dtype)) * term.scaling  # (.., out, r) @ (.., r, in)
        total = total + (update if ki is None else update * ki.unsqueeze(-1))
    return total


def set_axis(lora, name: str, axis: str) -> None:
    """Take DoRA adapter ``name`` of ``lora`` (a :class:`~lora_inject.LoRA`) with its norm per
    output unit (``axis="out"``) or per input unit (``"in"``, LyCORIS' ``wd_on_out=False``), with
    a magnitude of ones of the shape that goes with it, for a loader to write next.

    Raises:
        ValueError: if the adapter is not DoRA, or ``axis`` is neither ``"out"`` nor ``"in"``
            (``"in"`` on expert weights).
    """
    a = lora.records[name]
    if not a.dora or axis not in ("out", "in") or axis == "in" and lora.view.experts:
        raise ValueError(f"DoRA axis: adapter {name!r} (dora={a.dora}) on a tensor of shape {lora.view.shape} "
                         f"takes `axis` 'out' or 'in' (not on experts), got {axis!r}.")
    old = lora.lora_magnitude[name]
    a.dora_axis = axis
    m = torch.ones(lora.view.magnitude_shape(axis), dtype=old.dtype, device=old.device)
    lora.lora_magnitude[name] = nn.Parameter(m, requires_grad=old.requires_grad)
