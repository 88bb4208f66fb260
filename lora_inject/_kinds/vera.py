r"""VeRA (Kopiczko et al., 2024), as peft 0.21's ``VeraConfig``: two trained vectors around a pair
of frozen random projections shared by every adapted tensor.

In the ``(.., out, in)`` view, with ``vera_A`` ``(r, in_max)`` and ``vera_B`` ``(out_max, r)``
shared and sliced to each tensor's size::

    delta = (vera_lambda_b[:, None] * vera_B[:out]) @ (vera_lambda_d[:, None] * vera_A[:, :in])

``vera_lambda_b`` is ``(out,)`` and ``vera_lambda_d`` ``(r,)``. peft's init: ``vera_lambda_b``
zero and ``vera_lambda_d`` ``d_initial``, so the update is exactly zero; the projections are
Kaiming-uniform (gain ``sqrt(2)``, a bound of ``sqrt(6 / fan_in)``), drawn from a CPU generator
seeded with ``projection_prng_key``, ``vera_A`` first, at the largest ``(out, in)`` of the
adapted tensors (:attr:`Kind.shared`). With ``save_projection`` they go into the adapter's
files; without, they are rebuilt from the key. There is no alpha; peft's default ``r`` is 256.

On a linear op the factored form is peft's forward,
``base(x) + b * ((x @ A.T) * d) @ B.T``; on a conv, a conv to ``r`` channels with ``A`` then a
1x1 conv with ``B``; on an embedding, thin lookups in ``A``. None builds a weight-sized tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._view import View
from ..kind import Kind, Option, boolean, integer, kernel, pointwise, positive_rank, real, register_kind


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    # peft's vera._kaiming_init: fan_in of (rows, cols) is cols.
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared(views, r: int, options) -> dict[str, Tensor]:
    out = max(v.out_features for v in views)
    inn = max(v.in_features for v in views)
    generator = torch.Generator(device="cpu").manual_seed(options["projection_prng_key"])
    A = _kaiming((r, inn), generator)
    B = _kaiming((out, r), generator)
    return {"vera_A": A, "vera_B": B}


def share(shared, view: View, r: int, options) -> dict[str, Tensor]:
    """The slices of the shared projections one tensor reads: ``vera_A[:r, :in]`` and
    ``vera_B[:out, :r]``."""
    A, B = shared["vera_A"], shared["vera_B"]
    return {"vera_A": A[:r, :view.in_features].clone(), "vera_B": B[:view.out_features, :r].clone()}


def create(view: View, r: int, alpha, options) -> dict[str, Tensor]:
    return {"vera_lambda_b": torch.zeros(*view.lead, view.out_features),
            "vera_lambda_d": torch.full((*view.lead, r), float(options["d_initial"]))}


def _sliced(params, view: View) -> tuple[Tensor, Tensor]:
    A, B = params["vera_A"], params["vera_B"]
    r = params["vera_lambda_d"].shape[-1]
    if A.shape[0] < r or A.shape[1] < view.in_features or B.shape[0] < view.out_features:
        raise RuntimeError(
            f"VeRA: the shared projections vera_A {tuple(A.shape)} and vera_B {tuple(B.shape)} are "
            f"smaller than this tensor needs, r={r}, (out, in)=({view.out_features}, "
            f"{view.in_features}); build them from every adapted tensor's view."
        )
    return A[:r, :view.in_features], B[:view.out_features, :r]


def delta(params, view: View, scaling: float, options) -> Tensor:
    A, B = _sliced(params, view)
    b = params["vera_lambda_b"].unsqueeze(-1)
    d = params["vera_lambda_d"].unsqueeze(-1)
    return (b * scaling * B.to(b.dtype)) @ (d * A.to(d.dtype))  # (.., out, r) @ (.., r, in)


def linear(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    A, B = _sliced(params, view)
    b, d = params["vera_lambda_b"] * scaling, params["vera_lambda_d"]  # scaling: 1, times a strength
    y = base(x)
    h = d * F.linear(x, A.to(x.dtype))  # (.., r), in the wider of x's and the vectors' dtypes
    return y + (b * F.linear(h, B.to(h.dtype))).to(y.dtype)


def conv(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """A conv to ``r`` channels with ``vera_A``, scaled by ``d``, then a 1x1 conv with ``vera_B``,
    scaled by ``b``."""
    A, B = _sliced(params, view)
    dims = len(kernel(view))
    ones = (1,) * dims
    b, d = (params["vera_lambda_b"] * scaling).view(-1, *ones), params["vera_lambda_d"].view(-1, *ones)
    y = base(x)
    h = d * base.using(x, A.to(x.dtype))  # (.., r, *spatial)
    return y + (b * pointwise(h, B.to(h.dtype), dims)).to(y.dtype)


def embedding(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """Thin lookups: ``vera_A``'s columns at the indices, scaled by ``d``, through ``vera_B``."""
    A, B = _sliced(params, view)  # A (r, num), B (dim, r)
    b, d = params["vera_lambda_b"] * scaling, params["vera_lambda_d"]  # scaling: 1, times a strength
    y = base(x)
    h = d * F.embedding(x, A.mT)  # (.., r)
    return y + (b * F.linear(h, B.to(h.dtype))).to(y.dtype)


VERA = Kind(
    name="vera",
    create=create,
    delta=delta,
    options=(
        Option("d_initial", 0.1, real, "a real number"),
        Option("projection_prng_key", 0, integer, "an int (the seed of the shared projections)"),
        Option("save_projection", True, boolean, "a bool"),
    ),
    validate=positive_rank("vera"),
    scaling=lambda r, alpha, options: 1.0,
    default_r=256,
    default_alpha=None,
    shared=shared,
    share=share,
    frozen=("vera_A", "vera_B"),
    factored={"linear": linear, "conv": conv, "embedding": embedding},
)
register_kind("vera", VERA)
