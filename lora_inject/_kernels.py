r"""The autograd kernels of the factored fast path, and when each runs.

* :class:`LowRank`: ``bias + x @ W + s * (x @ first) @ second`` as one node, for one plain
  adapter (:func:`fused` decides when: plain eager mode, one dtype, an input of
  :data:`FUSED_MIN` elements or more where a gradient is wanted);
* :class:`Frozen`: ``F.linear`` on a frozen quantized ``W0`` that saves no dequantized weight
  for backward (:func:`frozen_linear`);
* :class:`NoGradAt`: the identity whose gradient is zero at a mask (an embedding's padding row).

Autocast, ``torch.func`` transforms, forward-mode AD and ``torch.compile`` run the composable ops
instead (see :func:`plain_eager`).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import _quant as quant

FUSED_MIN = 1 << 16  # elements of the input from which the fused kernel pays for its Python backward


def plain_eager() -> bool:
    """Whether the fused kernel may run: eager mode, no torch.func transform, no forward AD."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or forward_ad._current_level >= 0)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``x`` to, or None where it is off (or ``x`` is not floating)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) and x.is_floating_point() else None


def fused(x: Tensor, W: Tensor, bias: Tensor | None, first: Tensor, second: Tensor, s: float) -> Tensor | None:
    """``bias + x @ W + s * (x @ first) @ second`` with :class:`LowRank`, in one dtype (autocast's
    where it is on); None where the dtypes differ (the composable ops then run)."""
    dt = autocast_dtype(x)
    if dt is not None:
        x, W, first, second = x.to(dt), W.to(dt), first.to(dt), second.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return fused(x, W, bias, first, second, s)
    if not (x.dtype == W.dtype == first.dtype == second.dtype) or (bias is not None and bias.dtype != x.dtype):
        return None
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or first.requires_grad
                                    or second.requires_grad or (bias is not None and bias.requires_grad)):
        if x2.numel() < FUSED_MIN:
            return None  # the composable ops: on a small input the fused backward's Python costs more
        out = LowRank.apply(x2, W, bias, first, second, s)
    else:  # nothing to differentiate: the same sums, without an autograd node
        out = torch.addmm(bias, x2, W) if bias is not None else x2 @ W  # (N, in) @ (in, out)
        out.addmm_(x2 @ first, second, alpha=s)  # += s * (N, r) @ (r, out)
    return out.view(*x.shape[:-1], W.shape[-1])


class LowRank(torch.autograd.Function):
    """``bias + x @ Wt + s * (x @ first) @ second`` for a 2-D ``x``, with ``first`` (in, r) and
    ``second`` (r, out). Its backward adds the two parts of ``x``'s gradient in one buffer
    (``g @ Wt.T``, then ``addmm_`` of the low-rank part) and saves only the (N, r) intermediate."""

    @staticmethod
    def forward(ctx, x, Wt, bias, first, second, s):
        h = x @ first  # (N, in) @ (in, r) -> (N, r)
        out = torch.addmm(bias, x, Wt) if bias is not None else x @ Wt  # (N, in) @ (in, out)
        out.addmm_(h, second, alpha=s)  # += s * (N, r) @ (r, out)
        ctx.save_for_backward(x, Wt, first, second, h)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, g):
        x, Wt, first, second, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_first, need_second = ctx.needs_input_grad[:5]
        s, gx, gw, gbias, gfirst, gsecond = ctx.s, None, None, None, None, None
        gh = g @ second.t() if need_x or need_first else None  # (N, out) @ (out, r) -> (N, r)
        if need_x:
            gx = (g @ Wt.t()).addmm_(gh, first.t(), alpha=s)  # (N, in)
        if need_w:
            gw = x.t() @ g
        if need_bias:
            gbias = g.sum(0)
        if need_first:
            gfirst = (x.t() @ gh).mul_(s)  # (in, N) @ (N, r)
        if need_second:
            gsecond = (h.t() @ g).mul_(s)  # (r, N) @ (N, out)
        return gx, gw, gbias, gfirst, gsecond, None


def frozen_linear(x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, w0, bias)`` for a frozen quantized ``w0``, with the backend's own kernel.

    In plain eager mode with a gradient to compute, :class:`Frozen` keeps the backend from saving
    a dequantized ``w0`` for backward: ``x``'s gradient dequantizes it again and lets it go, as
    QLoRA does."""
    if not (torch.is_grad_enabled() and plain_eager() and (x.requires_grad or (
            bias is not None and bias.requires_grad))):
        return F.linear(x, w0, bias)
    return Frozen.apply(x, bias, (w0,))


class Frozen(torch.autograd.Function):
    """``F.linear(x, w0, bias)`` with ``w0`` (passed in a box: autograd never sees it) frozen."""

    @staticmethod
    def forward(ctx, x, bias, box):
        ctx.box = box
        with torch.no_grad():
            return F.linear(x, box[0], bias)

    @staticmethod
    def backward(ctx, g):
        gx = g @ quant.dense(ctx.box[0]).to(g.dtype) if ctx.needs_input_grad[0] else None
        gbias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gbias, None


class NoGradAt(torch.autograd.Function):
    """``x`` itself, whose gradient is zero where ``mask`` is set; forward-mode tangents pass."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mask):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g.masked_fill(mask, 0), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return tangent.clone()
