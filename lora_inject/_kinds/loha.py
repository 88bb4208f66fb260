r"""LoHa (Hyeon-Woo et al., 2022, FedPara), as peft 0.21's ``LoHaConfig``.

The update is the Hadamard product of two low-rank matrices, in the ``(.., out, in)`` view::

    delta = (alpha / r) * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)

with ``hada_w1_a``/``hada_w2_a`` ``(.., out, r)`` and ``hada_w1_b``/``hada_w2_b`` ``(.., r, in)``.
With ``use_effective_conv2d`` on a tensor with a kernel larger than one element (peft turns it
off for 1x1), each factor is a Tucker (CP) product over the kernel: ``hada_t1``/``hada_t2``
``(r, r, *kernel)`` (``(r, r, k, 1)`` for a 1-D kernel, as peft stores it), ``hada_w*_a``
``(r, out)`` and ``hada_w*_b`` ``(r, in_channels)``::

    W_i[p, c, kernel] = sum_ij t_i[i, j, kernel] * w_i_b[j, c] * w_i_a[i, p]

In plain eager mode the matrix form is :class:`Hadamard`, which saves only the factors for
backward and builds the products again there, as peft's ``HadaWeight``.

peft's init: the ``a`` factors and ``hada_w1_b`` Kaiming-uniform (``a = sqrt(5)``), the ``t``
cores too, and ``hada_w2_b`` zero, so the update is exactly zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._kernels import plain_eager
from .._view import View
from ..kind import (
    LYCORIS_OPTIONS,
    Kind,
    channels,
    kaiming_,
    kernel,
    lycoris_dropout,
    positive_rank,
    register_kind,
)


def _core_kernel(view: View) -> tuple[int, ...] | None:
    """The kernel of the Tucker cores, or None where the update is a plain matrix."""
    k = kernel(view)
    if not k or math.prod(k) == 1:
        return None
    return k if len(k) >= 2 else (*k, 1)


def create(view: View, r: int, alpha: float, options) -> dict[str, Tensor]:
    lead, n = view.lead, len(view.lead)
    core = _core_kernel(view) if options["use_effective_conv2d"] else None
    if core is not None:
        out, ch = view.out_features, channels(view)
        p = {"hada_w1_a": torch.empty(*lead, r, out), "hada_w1_b": torch.empty(*lead, r, ch),
             "hada_w2_a": torch.empty(*lead, r, out), "hada_w2_b": torch.empty(*lead, r, ch),
             "hada_t1": torch.empty(*lead, r, r, *core), "hada_t2": torch.empty(*lead, r, r, *core)}
    else:
        out, inn = view.out_features, view.in_features
        p = {"hada_w1_a": torch.empty(*lead, out, r), "hada_w1_b": torch.empty(*lead, r, inn),
             "hada_w2_a": torch.empty(*lead, out, r), "hada_w2_b": torch.empty(*lead, r, inn)}
    for name, t in p.items():
        if name == "hada_w2_b":
            t.zero_()
        else:
            kaiming_(t, n)
    return p


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``(.., out, in_channels * K)`` from the core ``t`` ``(.., r, r, *kernel)``, ``wa``
    ``(.., r, out)`` and ``wb`` ``(.., r, in_channels)``, as peft's ``make_weight_cp``."""
    flat = t.reshape(*t.shape[:wa.dim()], -1)  # (.., r, r, K)
    m = torch.einsum("...ijk,...jr,...ip->...prk", flat, wb, wa)  # (.., out, in_ch, K)
    return m.reshape(*m.shape[:-2], -1)


def delta(params, view: View, scaling: float, options) -> Tensor:
    if "hada_t1" in params:
        w1 = _cp(params["hada_t1"], params["hada_w1_a"], params["hada_w1_b"])
        w2 = _cp(params["hada_t2"], params["hada_w2_a"], params["hada_w2_b"])
        return w1 * w2 * scaling
    factors = params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"]
    if plain_eager() and factors[0].dim() == 2:
        return Hadamard.apply(*factors, scaling)
    w1 = factors[0] @ factors[1]  # (.., out, r) @ (.., r, in)
    w2 = factors[2] @ factors[3]
    return (w1 * w2) * scaling


class Hadamard(torch.autograd.Function):
    """``s * (w1a @ w1b) * (w2a @ w2b)``, saving only the four factors: its backward builds the
    two products again, as peft's ``HadaWeight`` does, so that no weight-sized tensor is kept for
    it (autograd on the plain ops would keep both products)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, s):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.s = s
        return (w1a @ w1b).mul_(w2a @ w2b).mul_(s)

    @staticmethod
    def backward(ctx, g):
        # Two weight-sized tensors at most, each a fresh product taking g in place; a number's
        # scaling goes on the factors' small gradients, not on g (a tensor's, rank dropout's rows, on t).
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        on_t = isinstance(s, Tensor)
        grads = [None] * 4
        for i, (a, b, other) in enumerate(((w1a, w1b, (w2a, w2b)), (w2a, w2b, (w1a, w1b)))):
            if need[2 * i] or need[2 * i + 1]:
                t = torch.mm(*other).mul_(g)  # g * the other product
                if on_t:
                    t.mul_(s)
                if need[2 * i]:
                    grads[2 * i] = t @ b.T if on_t else (t @ b.T).mul_(s)
                if need[2 * i + 1]:
                    grads[2 * i + 1] = a.T @ t if on_t else (a.T @ t).mul_(s)
                del t
        return *grads, None


LOHA = Kind(
    name="loha",
    create=create,
    delta=delta,
    validate=positive_rank('loha'),
    options=LYCORIS_OPTIONS,
    dropout=lycoris_dropout,
)
register_kind("loha", LOHA)
