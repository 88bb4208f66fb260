r"""OFT (Qiu et al., 2023; Liu et al., 2024, BOFT's block form), as peft 0.21's ``OFTConfig``.

OFT turns the weight by an orthogonal block-diagonal matrix ``R`` on its input side. In the
``(.., out, in)`` view, as peft's merge does for Linear and Conv (``W' = (R @ W.T).T``)::

    W' = W @ R.T,        R = block_diag(R_1, .., R_n),  each R_i (b, b)

so that ``op(x, W') = op(x @ R, W)`` for a linear op: the input is rotated. Each block is the
Cayley transform of a skew-symmetric ``Q_i`` built from ``oft_R`` ``(n, b (b - 1) / 2)``, the
upper triangle of each block (``(1, ..)`` with ``block_share``, one block for all):

* ``use_cayley_neumann=True`` (peft's default): ``I + 2 Q + 2 Q^2 + .. + 2 Q^(t-2) + Q^(t-1)``
  for ``t = num_cayley_neumann_terms``, a truncated series that is not exactly orthogonal;
* ``use_cayley_neumann=False``: the exact ``(I - Q) (I + Q)^-1``.

The two are not two approximations of one rotation: the series expands ``(I + Q) (I - Q)^-1``,
the transpose (inverse) of the exact one, so they differ to first order in ``Q``, as in peft.

``coft`` projects ``oft_R`` in place, within ``eps / sqrt(n)`` of zero for each block, before
each use, as peft does. ``rotate="out"`` turns the output side instead, ``W' = R.T @ W``: that
is peft's OFT on an ``Embedding``, which rotates each embedding vector (the view's output).

``r`` is the number of blocks and ``oft_block_size`` their size; exactly one is set (peft's
defaults: ``r=0``, ``oft_block_size=32``). A size that does not divide the rotated dimension is
moved to the nearest divisor with a warning, as peft does. peft's init: ``oft_R`` zero, the
identity.

peft's own forward on a Conv with a kernel larger than 1x1 is not its merge: it unfolds the
input, rotates each patch and folds it back with ``F.fold``, which sums overlapping patches,
so that at init its output is not the base layer's. This kind follows peft's merge.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import torch
from torch import Tensor

from .._view import View
from ..kind import Kind, Option, boolean, integer, probability, real, register_kind


def adjust(dim: int, value: int) -> int:
    """The divisor of ``dim`` nearest ``value`` (the lower on a tie), as peft's
    ``adjust_oft_parameters``."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def rotated(view: View, options) -> int:
    """The size of the dimension OFT rotates."""
    return view.in_features if options["rotate"] == "in" else view.out_features


def blocks(view: View, r: int, options) -> tuple[int, int]:
    """``(n_blocks, block_size)`` for ``view``, adjusted as peft does (with its warning)."""
    dim, size = rotated(view, options), options["oft_block_size"]
    if r == 0:
        if dim % size != 0 or size > dim:
            new = adjust(dim, size)
            warnings.warn(f"Invalid `oft_block_size` ({size})! Adjusted `oft_block_size` to ({new}).",
                          UserWarning, stacklevel=3)
            size = new
        return dim // size, size
    if dim % r != 0 or r > dim:
        new = adjust(dim, r)
        warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({new}).", UserWarning, stacklevel=3)
        r = new
    return r, dim // r


def create(view: View, r: int, alpha: float, options) -> dict[str, Tensor]:
    n, b = blocks(view, r, options)
    return {"oft_R": torch.zeros(*view.lead, 1 if options["block_share"] else n, b * (b - 1) // 2)}


def block_size(n_elements: int) -> int:
    """``b`` such that ``b (b - 1) / 2 == n_elements``."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements:
        raise ValueError(f"OFT: `oft_R` has {n_elements} entries per block, which is not b(b-1)/2 "
                         "for any block size b; it was not made by OFT.")
    return b


def skew(vec: Tensor, b: int) -> Tensor:
    """The skew-symmetric ``(.., n, b, b)`` matrices whose upper triangles are ``vec`` ``(.., n, m)``."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    Q = vec.new_zeros(*vec.shape[:-1], b, b)
    Q[..., rows, cols] = vec
    return Q - Q.transpose(-2, -1)


def project(vec: Tensor, b: int, eps: float) -> Tensor:
    """COFT's projection of each block's ``Q`` into the ball of radius ``eps / sqrt(n)``."""
    Q = skew(vec, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(Q.shape[-3]))
    norm = torch.norm(Q, dim=(-2, -1), keepdim=True)
    out = torch.where(norm <= eps, Q, eps * (Q / norm))
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    return out[..., rows, cols]


def cayley(vec: Tensor, b: int, neumann: bool, terms: int) -> Tensor:
    """The rotation blocks ``(.., n, b, b)`` from ``oft_R`` ``(.., n, m)``, as peft's ``_cayley_batch``."""
    Q = skew(vec, b)
    if neumann:  # peft's sums, out of place: under vmap, Q is batched where the identity is not
        R = torch.eye(b, device=vec.device, dtype=vec.dtype).expand_as(Q)
        if terms > 1:
            R = torch.add(R, Q, alpha=2.0)
            if terms > 2:
                Q2 = Q @ Q
                R = torch.add(R, Q2, alpha=2.0)
                power = Q2
                for _ in range(3, terms - 1):
                    power = power @ Q
                    R = torch.add(R, power, alpha=2.0)
                power = power @ Q
                R = R + power
        return R.clone() if terms == 1 else R
    eye = torch.eye(b, device=vec.device, dtype=vec.dtype).expand_as(Q)
    return torch.linalg.solve(eye + Q, eye - Q, left=False)


def rotation(params, options) -> Tensor:
    """The blocks ``(.., n, b, b)`` of ``R`` (one block for ``block_share``), after COFT's
    in-place projection."""
    vec = params["oft_R"]
    b = block_size(vec.shape[-1])
    if options["coft"]:
        with torch.no_grad():
            vec.copy_(project(vec, b, options["eps"]))
    return cayley(vec, b, options["use_cayley_neumann"], options["num_cayley_neumann_terms"])


def _expand(R: Tensor, dim: int) -> Tensor:
    b = R.shape[-1]
    return R.expand(*R.shape[:-3], dim // b, b, b) if R.shape[-3] == 1 else R


def apply(W: Tensor, params, view: View, scaling: float, options) -> Tensor:
    R = rotation(params, options)
    b = R.shape[-1]
    if options["rotate"] == "in":  # W' = W @ R.T, block by block
        R = _expand(R, view.in_features)
        Wb = W.reshape(*W.shape[:-1], R.shape[-3], b)  # (.., out, n, b)
        return torch.einsum("...onk,...nck->...onc", Wb, R.to(W.dtype)).reshape_as(W)
    R = _expand(R, view.out_features)  # W' = R.T @ W
    Wb = W.reshape(*W.shape[:-2], R.shape[-3], b, W.shape[-1])  # (.., n, b, in)
    return torch.einsum("...nkc,...nki->...nci", R.to(W.dtype), Wb).reshape_as(W)


def _rotate(y: Tensor, R: Tensor, dim: int) -> Tensor:
    """``y``'s last dimension turned block by block: ``y @ block_diag(R)``, in ``y``'s dtype (under
    autocast too: an embedding's output stays in its table's dtype, as the merged table's does)."""
    R = _expand(R, dim)
    yb = y.reshape(*y.shape[:-1], R.shape[-3], R.shape[-1])
    device = y.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if on else nullcontext():
        return torch.einsum("...rk,rkc->...rc", yb, R.to(y.dtype)).reshape_as(y)


def linear(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """``base(x @ R)`` for ``rotate="in"``, the input rotated block by block as peft's forward
    does; ``base(x) @ R`` for ``rotate="out"``."""
    if options["rotate"] == "in":
        return base(_rotate(x, rotation(params, options), view.in_features))
    if base.bias is not None:  # the bias is not turned: the merged weight
        return NotImplemented
    return _rotate(base(x), rotation(params, options), view.out_features)


def embedding(x: Tensor, base, params, view: View, scaling: float, options) -> Tensor:
    """``rotate="out"`` (peft's OFT on an Embedding): each looked-up vector rotated."""
    if options["rotate"] != "out" or base.bias is not None:
        return NotImplemented  # the table's rows mixed: the merged weight
    return _rotate(base(x), rotation(params, options), view.out_features)


def validate(r: int, alpha, options) -> None:
    size = options["oft_block_size"]
    if (r == 0) == (size == 0):
        raise ValueError(
            f"inject(kind='oft'): set exactly one of `r` (the number of blocks) and `oft_block_size`, "
            f"got r={r!r} and oft_block_size={size!r}; their product is the rotated dimension. Pass "
            "oft_block_size=0 with r, or leave r out (oft_block_size defaults to 32, as in peft's OFTConfig)."
        )


def _size(v) -> bool:
    return integer(v) and v >= 0


OFT = Kind(
    name="oft",
    create=create,
    apply=apply,
    options=(
        Option("oft_block_size", 32, _size, "an int >= 0 (0 when `r` is set)"),
        Option("use_cayley_neumann", True, boolean, "a bool"),
        Option("num_cayley_neumann_terms", 5, lambda v: integer(v) and v >= 1, "an int >= 1"),
        Option("coft", False, boolean, "a bool"),
        Option("eps", 6e-5, lambda v: real(v) and v > 0, "a float > 0"),
        Option("block_share", False, boolean, "a bool"),
        Option("module_dropout", 0.0, probability, "a float in [0, 1)"),
        Option("rotate", "in", lambda v: v in ("in", "out"), "'in' or 'out'"),
    ),
    validate=validate,
    scaling=lambda r, alpha, options: 1.0,
    default_r=0,
    default_alpha=None,
    factored={"linear": linear, "embedding": embedding},
    peft_key=lambda tensor_name: f"{tensor_name}.weight",
)
register_kind("oft", OFT)
