r"""A full copy: the tensor trains whole, as part of an adapter (peft's ``modules_to_save``).

The adapter holds ``full``, a trainable copy of the tensor in its stored shape, filled from the
weight at injection (:attr:`~lora_inject.Kind.fill`), and the adapted tensor reads that copy::

    W' = full          (W0 stays as it was, frozen)

So ``remove(merge=False)`` and :func:`~lora_inject.disabled` give ``W0`` back exactly,
``remove(merge=True)`` writes the copy into ``W0``, and :func:`~lora_inject.activate` switches
between them with the adapter. :func:`~lora_inject.inject`'s ``modules_to_save=`` puts this kind
on every parameter of the named modules, as peft trains and saves a copy of each such module.
There is no rank and no alpha.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._view import View
from ..kind import Kind, register_kind


def create(view: View, r, alpha, options) -> dict[str, Tensor]:
    return {"full": torch.zeros(view.shape)}  # its values come from the weight (fill)


def fill(params, W: Tensor, view: View, options) -> None:
    params["full"].copy_(W)


def apply(W: Tensor, params, view: View, scaling: float, options) -> Tensor:
    return view.rows(params["full"]).to(W.dtype)  # (.., out, in): the copy, whatever W was


FULL = Kind(
    name="full",
    create=create,
    apply=apply,
    fill=fill,
    scaling=lambda r, alpha, options: 1.0,
    default_r=None,
    default_alpha=None,
)
register_kind("full", FULL)
