r"""LoKr (Yeh et al., 2024, LyCORIS), as peft 0.21's ``LoKrConfig``.

The update is a Kronecker product, in the ``(.., out, in)`` view::

    delta = (alpha / r) * kron(w1, w2)

``out = a * b`` and ``in_channels = c * d`` are split by peft's ``factorization`` (the factor
near ``decompose_factor``, or near the square root for ``-1``), or as the option ``factors``
``[a, b, c, d]`` says where it is set (LyCORIS's splits: its ``factorization`` puts the smaller
factor first where ``decompose_factor`` exceeds the square root, and ``unbalanced_factorization``
swaps ``a`` and ``b``; a LyCORIS file's shapes give the split); ``w1`` is ``(a, c)`` and ``w2``
``(b, d * K)`` for a kernel of ``K`` elements. Each factor is full or low-rank, by peft's rule:

* ``lokr_w1`` ``(a, c)`` unless ``decompose_both`` and ``r < max(a, c) / 2``, then
  ``lokr_w1_a`` ``(a, r)`` @ ``lokr_w1_b`` ``(r, c)``;
* ``lokr_w2`` ``(b, d, *kernel)`` when ``r >= max(b, d) / 2``; else with
  ``use_effective_conv2d`` on a kernel larger than one element a Tucker product of
  ``lokr_t2`` ``(r, r, *kernel)`` (``(r, r, k, 1)`` for a 1-D kernel), ``lokr_w2_a`` ``(r, b)``
  and ``lokr_w2_b`` ``(r, d)``; else ``lokr_w2_a`` ``(b, r)`` @ ``lokr_w2_b`` ``(r, d * K)``.

The scaling is ``alpha / r`` in every case, as in peft (LyCORIS ignores alpha when both factors
are full; peft does not). peft's init: ``lokr_w1`` (or ``lokr_w1_a``) zero, the rest
Kaiming-uniform (``a = sqrt(5)``), so the update is exactly zero.

On a linear op, ``x @ kron(w1, w2).T`` is ``w1 @ X @ w2.T`` for ``x`` seen as ``X`` ``(c, d)``:
the factored form never builds the ``(out, in)`` matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._view import View
from ..kind import (
    LYCORIS_OPTIONS,
    Kind,
    Option,
    boolean,
    channels,
    kaiming_,
    kernel,
    lycoris_dropout,
    positive_rank,
    register_kind,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``, as peft's ``factorization``: ``(factor,
    dimension // factor)`` where ``factor`` divides (even above the square root, where LyCORIS's
    ``factorization`` swaps the two), else the pair nearest the square root with ``m <= factor``
    and ``m <= n``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def shapes(view: View, r: int, options) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor LoKr holds for ``view`` (lead dimensions left out)."""
    k = kernel(view)
    if options.get("factors") is not None:
        a, b, c, d = options["factors"]
        if (a * b, c * d) != (view.out_features, channels(view)):
            raise ValueError(f"inject(kind='lokr'): `factors` must be [a, b, c, d] with a * b == out "
                             f"({view.out_features}) and c * d == in ({channels(view)}), got {options['factors']!r}.")
    else:
        (a, b), (c, d) = (factorization(view.out_features, options["decompose_factor"]),
                          factorization(channels(view), options["decompose_factor"]))
    out: dict[str, tuple[int, ...]] = {}
    if options["decompose_both"] and r < max(a, c) / 2:
        out["lokr_w1_a"], out["lokr_w1_b"] = (a, r), (r, c)
    else:
        out["lokr_w1"] = (a, c)
    if r >= max(b, d) / 2:
        out["lokr_w2"] = (b, d, *k)
    elif options["use_effective_conv2d"] and k and math.prod(k) > 1:
        out["lokr_t2"] = (r, r, *(k if len(k) >= 2 else (*k, 1)))
        out["lokr_w2_a"], out["lokr_w2_b"] = (r, b), (r, d)
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = (b, r), (r, d * math.prod(k))
    return out


def peft_factor(view: View, r: int, options) -> int | None:
    """The ``decompose_factor`` with which peft's ``factorization`` gives the tensors ``options``
    gives for ``view`` (its ``factors`` included), or ``None`` where none does."""
    want = shapes(view, r, options)
    w1 = want.get("lokr_w1", (want.get("lokr_w1_a", (0,))[0], want.get("lokr_w1_b", (0, 0))[-1]))
    a, c = w1[0], w1[-1]
    out, in_ = view.out_features, channels(view)
    likely = (-1, a, c, out // max(a, 1), in_ // max(c, 1))
    # a factor's split changes only at a divisor of either dimension: each divisor and the one above
    # it stand for every factor
    divisors = sorted({n for dim in (out, in_) for n in range(1, dim + 1) if dim % n == 0})
    for factor in dict.fromkeys((*likely, *(f for n in divisors for f in (n, n + 1)))):
        if factor == -1 or factor > 0:
            opts = {**options, "factors": None, "decompose_factor": factor}
            if shapes(view, r, opts) == want:
                return factor
    return None


def create(view: View, r: int, alpha: float, options) -> dict[str, Tensor]:
    n = len(view.lead)
    params = {}
    for name, shape in shapes(view, r, options).items():
        t = torch.empty(*view.lead, *shape)
        params[name] = t.zero_() if name in ("lokr_w1", "lokr_w1_a") else kaiming_(t, n)
    return params


def factors(params) -> tuple[Tensor, Tensor]:
    """``(w1, w2)``: ``(.., a, c)`` and ``(.., b, d * K)``."""
    w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
    if "lokr_w2" in params:
        w2 = params["lokr_w2"]  # (.., b, d, *kernel)
        w2 = w2.reshape(*w2.shape[:w1.dim() - 1], -1)
    elif "lokr_t2" in params:
        t, wa, wb = params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"]
        flat = t.reshape(*t.shape[:wa.dim()], -1)  # (.., r, r, K)
        m = torch.einsum("...ijk,...ip,...jr->...prk", flat, wa, wb)  # (.., b, d, K)
        w2 = m.reshape(*m.shape[:-2], -1)
    else:
        w2 = params["lokr_w2_a"] @ params["lokr_w2_b"]
    return w1, w2


def kron(w1: Tensor, w2: Tensor) -> Tensor:
    """``torch.kron`` of the last two dimensions, batched over the ones before."""
    m = w1[..., :, None, :, None] * w2[..., None, :, None, :]  # (.., a, b, c, d)
    return m.reshape(*m.shape[:-4], m.shape[-4] * m.shape[-3], m.shape[-2] * m.shape[-1])


def delta(params, view: View, scaling: float, options) -> Tensor:
    w1, w2 = factors(params)
    return kron(w1, w2) * scaling


def _worth_it(x: Tensor, w1: Tensor, w2: Tensor, rows: int) -> bool:
    """Whether reshaping costs less than the merged weight: always where a gradient is wanted (the
    merged weight's gradient is a weight-sized product); without one, where the ``rows`` inputs'
    two thin products cost less than building the Kronecker product. A symbolic ``rows``
    (``torch.compile(dynamic=True)``) reshapes: a choice by size would guard the graph on it."""
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return True
    if not isinstance(rows, int):
        return True
    (a, c), (b, d) = w1.shape[-2:], w2.shape[-2:]
    return rows * (a * c * d + a * d * b) < 2 * a * b * c * d


def linear(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """``base(x) + s * x @ kron(w1, w2).T``, as ``w1 @ X @ w2.T`` with ``X`` ``(.., c, d)``."""
    w1, w2 = factors(params)  # (a, c), (b, d)
    if not _worth_it(x, w1, w2, math.prod(x.shape[:-1])):  # not Size.numel(): it fixes a symbolic size
        return NotImplemented
    y = base(x)
    X = x.reshape(*x.shape[:-1], w1.shape[-1], w2.shape[-1]).to(w1.dtype)
    Y = w1 @ X @ w2.mT  # (a, c) @ (.., c, d) @ (d, b) -> (.., a, b)
    return y + (Y.reshape_as(y) * scaling).to(y.dtype)  # not -1: an empty batch has no size to infer


def conv(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """The conv with ``w2`` on each of the ``c`` groups of ``d`` input channels, as one batch, then
    ``w1`` across the groups: ``y[(i, j)] = sum_k w1[i, k] conv(x[k], w2[j])``."""
    w1, w2 = factors(params)  # (a, c), (b, d * K)
    (a, c), b = w1.shape, w2.shape[0]
    unbatched = x.dim() == len(kernel(view)) + 1
    xb = x.unsqueeze(0) if unbatched else x
    n, spatial = xb.shape[0], xb.shape[2:]
    if not _worth_it(xb, w1, w2, n * math.prod(spatial)):
        return NotImplemented
    y = base(x)
    # No -1 in the reshapes: an empty batch has no size to infer.
    h = base.using(xb.reshape(n * c, xb.shape[1] // c, *spatial).to(w2.dtype), w2)  # (n c, b, *out_spatial)
    Y = (w1 @ h.reshape(n, c, b * math.prod(h.shape[2:]))).reshape(n, a * b, *h.shape[2:])  # (n, a b, ..)
    Y = Y.squeeze(0) if unbatched else Y
    return y + (Y * scaling).to(y.dtype)


def embedding(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """Thin lookups: index ``k * d + l`` reads ``w1[:, k]`` and ``w2[:, l]``, and their outer
    product is its ``(a * b)`` vector."""
    w1, w2 = factors(params)  # (a, c), (b, d): dim = a b, num = c d
    d = w2.shape[-1]
    y = base(x)
    u, v = F.embedding(torch.div(x, d, rounding_mode="floor"), w1.mT), F.embedding(x % d, w2.mT)
    Y = (u[..., :, None] * v[..., None, :]).flatten(-2)  # (.., a, b) -> (.., a b)
    return y + (Y * scaling).to(y.dtype)


def _factor(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v > 0)


def _factors(v) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and len(v) == 4
                         and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v))


LOKR = Kind(
    name="lokr",
    create=create,
    delta=delta,
    validate=positive_rank('lokr'),
    options=(
        *LYCORIS_OPTIONS,
        Option("decompose_both", False, boolean, "a bool"),
        Option("decompose_factor", -1, _factor, "a positive int, or -1 for near the square root"),
        Option("rank_dropout_scale", False, boolean, "a bool"),
        Option("factors", None, _factors, "None (peft's factorization), or a list [a, b, c, d] of positive "
               "ints with out = a * b and in = c * d: w1 is (a, c), w2 (b, d)"),
    ),
    factored={"linear": linear, "conv": conv, "embedding": embedding},
    dropout=lycoris_dropout,
)
register_kind("lokr", LOKR)
