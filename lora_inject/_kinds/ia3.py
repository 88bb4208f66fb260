r"""IA³ (Liu et al., 2022), as peft 0.21's ``IA3Config``: a learned vector scales the weight.

In the ``(.., out, in)`` view, ``ia3_l`` scales the rows (the outputs), or with ``feedforward``
(peft's ``feedforward_modules``) the columns of each input channel (the inputs)::

    W' = scale[:, None] * W        or        W' = W * scale[None, channel(in)]

peft's shapes: ``(out, 1)`` or ``(1, in)`` for a matrix (Linear, GPT-2's Conv1D), and
``(1, channels, 1, ..)`` with one 1 per kernel dimension for a conv, either way. Scaling the
output scales the bias too, as peft's forward and merge do: :attr:`Kind.apply_bias`. peft's init:
ones, the identity. There is no rank and no alpha.

The factored forms scale the op's output (``base(x) * l``) or its input (``base(x * l)``): the
features of a linear op, the channels of a conv, and for an embedding each looked-up vector (by
its row's gain, looked up, for ``feedforward``). None builds a weight-sized tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._view import View
from ..kind import Kind, Option, boolean, channels, kernel, register_kind


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
    return (Wc * scale[..., None, :, None]).reshape_as(W)


def apply_bias(b: Tensor, params, view: View, options) -> Tensor:
    if options["feedforward"]:
        return b
    return b * _vector(params, view).to(b.dtype)


def linear(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    scale = _vector(params, view)
    if options["feedforward"]:
        return base(x * scale.to(x.dtype))
    y = base(x)
    return y * scale.to(y.dtype)


def conv(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """The input channels scaled before the conv, or its output channels after it."""
    shape = (-1, *(1,) * len(kernel(view)))  # the channel dim, for a batched input or not
    scale = _vector(params, view).view(shape)
    if options["feedforward"]:
        return base(x * scale.to(x.dtype))
    y = base(x)
    return y * scale.to(y.dtype)


def embedding(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """Each looked-up vector scaled (its row's gain, looked up too, for ``feedforward``)."""
    scale = _vector(params, view)
    y = base(x)
    if options["feedforward"]:  # the inputs are the table's rows: one gain per index
        return y * F.embedding(x, scale.view(-1, 1)).to(y.dtype)
    return y * scale.to(y.dtype)


IA3 = Kind(
    name="ia3",
    create=create,
    apply=apply,
    apply_bias=apply_bias,
    changes_bias=lambda options: not options["feedforward"],
    options=(Option("feedforward", False, boolean, "a bool (whether the input is scaled)", selector=True),),
    scaling=lambda r, alpha, options: 1.0,
    default_r=None,
    default_alpha=None,
    factored={"linear": linear, "conv": conv, "embedding": embedding},
)
register_kind("ia3", IA3)
