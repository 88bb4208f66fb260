r"""IA³ (Liu et al., 2022), as peft 0.21's ``IA3Config``: a learned vector scales the weight.

In the ``(.., out, in)`` view, ``ia3_l`` scales the rows (the outputs), or with ``feedforward``
(peft's ``feedforward_modules``) the columns of each input channel (the inputs)::

    W' = scale[:, None] * W        or        W' = W * scale[None, channel(in)]

peft's shapes: ``(out, 1)`` or ``(1, in)`` for a matrix (Linear, GPT-2's Conv1D), and
``(1, channels, 1, ..)`` with one 1 per kernel dimension for a conv, either way. Scaling the
output scales the bias too, as peft's forward and merge do: :attr:`Kind.apply_bias`. peft's init:
ones, the identity. There is no rank and no alpha.

On a linear op the factored form scales the op's output (``base(x) * l``, bias included) or its
input (``base(x * scale)``): no weight-sized tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._view import View
from ..kind import Kind, Option, boolean, channels, kernel, register_kind

__all__: list[str] = []


def create(view: View, r, alpha, options) -> dict[str, Tensor]:
    k = kernel(view)
    if k:
        n = channels(view) if options["feedforward"] else view.out_features
        shape = (1, n, *(1,) * len(k))
    elif options["feedforward"]:
        shape = (1, view.in_features)
    else:
        shape = (view.out_features, 1)
    return {"ia3_l": torch.ones(*view.lead, *shape)}


def _vector(params, view: View) -> Tensor:
    scale = params["ia3_l"]
    return scale.reshape(*view.lead, -1)


def apply(W: Tensor, params, view: View, scaling: float, options) -> Tensor:
    scale = _vector(params, view).to(W.dtype)
    if not options["feedforward"]:
        return W * scale[..., :, None]
    c = scale.shape[-1]  # the input channels
    Wc = W.reshape(*W.shape[:-1], c, W.shape[-1] // c)  # (.., out, channels, K)
    return (Wc * scale[..., None, :, None]).reshape(W.shape)


def apply_bias(b: Tensor, params, view: View, options) -> Tensor:
    if options["feedforward"]:
        return b
    return b * _vector(params, view).to(b.dtype)


def linear(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    scale = _vector(params, view).to(x.dtype)
    return base(x * scale) if options["feedforward"] else base(x) * scale


IA3 = Kind(
    name="ia3",
    create=create,
    apply=apply,
    apply_bias=apply_bias,
    options=(Option("feedforward", False, boolean, "a bool (whether the input is scaled)", selector=True),),
    scaling=lambda r, alpha, options: 1.0,
    default_r=None,
    default_alpha=None,
    factored={"linear": linear},
)
register_kind("ia3", IA3)
