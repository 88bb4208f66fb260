"""The fast path: a weight that stays factored, ``W0 + s * (B @ A)``, for ops that allow it.

``LoRA.forward`` returns a :class:`LoraWeight` for layers whose rule is factored. The layer's
own forward runs unchanged; when it calls one of the ops below with that weight, the op is
computed as ``op(x, W0) + s * op'(op''(x, A), B)``, so no weight-sized update is built, saved
for backward or differentiated. Any other op, and any other code that reads the weight, gets
the materialised tensor ``W0 + s * B @ A`` (summed in float32 for half-precision weights).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from .dora import gain, is_dora, scales

__all__ = ["LoraWeight"]


class LoraWeight(Tensor):
    """``W0 + sum_i s_i * view(B_i @ A_i)``, kept factored.

    It holds ``W0`` (the tensor before LoRA), the :class:`~lora_inject.LoRA` module and the
    names of the adapters active when the weight was read. Its data is ``W0``'s; its value,
    for every op, is the adapted weight.
    """

    _w0: Tensor
    _lora: object
    _names: tuple[str, ...]
    _scales: tuple | None  # DoRA's (c, k), computed on first use
    _rows: tuple | None  # inside lora_inject.per_sample(): each sample's adapter, or None

    @staticmethod
    def wrap(w0: Tensor, lora) -> LoraWeight:
        with torch._C.DisableTorchFunctionSubclass():
            out = w0.detach().as_subclass(LoraWeight)
        rows = lora.per_sample
        names = tuple(lora.active) if rows is None else tuple(
            n for n in dict.fromkeys(rows) if n is not None and n in lora.adapters)
        out._w0, out._lora, out._names, out._scales, out._rows = w0, lora, names, None, rows
        return out

    def materialize(self) -> Tensor:
        if self._rows is not None:
            raise RuntimeError(
                f"per_sample(): an adapted weight of shape {tuple(self.shape)} reached an op that has no "
                "factored form, so it would be one weight for the whole batch and its samples could not "
                "differ. Run one forward per adapter with li.activate() instead.")
        return self._lora.merged(self._w0, list(self._names))

    def scales(self) -> tuple[Tensor | None, dict[str, Tensor]]:
        """DoRA's ``(c, k)``: the weight is ``c * W0 + sum_i k_i * s_i * B_i @ A_i``, each scaling
        output units (see :mod:`lora_inject.dora`); ``(None, {})`` without DoRA."""
        if self._scales is None:
            lora = self._lora
            ct = torch.promote_types(torch.promote_types(self._w0.dtype, torch.float32), lora._factor_dtype())
            if self._rows is None:
                self._scales = scales(lora, self._w0, self._names, ct)
            else:  # each sample has one adapter: its own gain, and c per sample (see rescale)
                self._scales = (None, {n: gain(lora, self._w0, n, ct) for n in self._names if is_dora(lora, n)})
        return self._scales

    def keep(self, h: Tensor, name: str) -> Tensor:
        """Inside per_sample(): ``h`` with the rows (dim 0) of samples that use another adapter zeroed."""
        return h if self._rows is None else h * self._mask(name, h)

    def _mask(self, name: str, t: Tensor) -> Tensor:
        """1 for the rows of ``t`` (dim 0) whose sample uses ``name``, else 0; shaped to broadcast."""
        rows, n = self._rows, t.shape[0]
        flat = t.dim() == 2 and n % len(rows) == 0  # a 2-D input may hold each sample's rows in turn
        if n != len(rows) and not flat:
            raise RuntimeError(f"per_sample(): a batch has {n} samples along dim 0 of the layer's input, but "
                               f"{len(rows)} adapters were given, one per sample. Pass one per sample.")
        m = torch.tensor([a == name for a in rows], dtype=t.dtype, device=t.device)
        return m.repeat_interleave(n // len(rows)).view(n, *[1] * (t.dim() - 1))

    def rescale(self, out: Tensor, bias: Tensor | None = None, dim: int = -1, frozen: Tensor | None = None):
        """DoRA: scale the base output ``out = op(x, W0) + bias`` by ``c`` along its output units
        (``dim``), as ``out + (c - 1) * (out - bias)``, which is ``out`` exactly where ``c`` is 1
        (at init); ``out`` itself without DoRA. Where ``frozen`` (a bool mask) is set, ``c``
        carries no gradient."""
        c, k = self.scales()
        if c is None and (self._rows is None or not k):
            return out
        shape = [1] * out.dim()
        shape[dim] = -1
        if c is not None:
            c1 = (c - 1).view(shape)
        else:  # per sample: the gain of each sample's own DoRA adapter
            c1 = sum(self._mask(n, out).to(g.dtype) * (g - 1).view(shape) for n, g in k.items())
        if bias is not None and bias.dim() == 1:
            bias = bias.view(shape)
        base = (out if bias is None else out - bias).to(c1.dtype)
        extra = base * c1
        if frozen is not None:
            extra = torch.where(frozen, base * c1.detach(), extra)
        return out + extra.to(out.dtype)

    def factors(self):
        """Yield ``(L, R, s, p, name)`` per adapter: the stored update is ``s * L @ R``.

        For a rows layout that is ``B @ A``; for a transposed one ``A.T @ B.T``. With DoRA,
        ``B`` is scaled per output unit by ``k`` (see :meth:`scales`).
        """
        lora = self._lora
        k = self.scales()[1]
        for name in self._names:
            A, B = lora.factor_pair(name)
            if name in k:
                B = B * k[name].unsqueeze(-1).to(B.dtype)  # (out, r) scaled per output unit
            L, R = (A.t(), B.t()) if lora.transpose else (B, A)
            p = lora.config[name]["dropout"] if lora.training else 0.0
            yield L, R, lora.scaling[name], p, name

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA and isinstance(args[0], LoraWeight):
            return func(args[0]._w0, *args[1:], **kwargs)  # shape, dtype, ...: those of W0
        impl = _FACTORED.get(func)
        if impl is not None:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
            bound.apply_defaults()
            out = impl(**bound.arguments)
            if out is not NotImplemented:
                return out
        args, kwargs = tree_map(_materialize, (args, kwargs))
        return func(*args, **kwargs)


def _materialize(x):
    return x.materialize() if isinstance(x, LoraWeight) else x


def _usable(weight, x) -> bool:
    return (isinstance(weight, LoraWeight) and not isinstance(x, LoraWeight)
            and not weight._lora.experts and weight.dim() == 2)


def _add(out: Tensor, extra: Tensor) -> Tensor:
    return out + extra.to(out.dtype)


def _branch_right(x: Tensor, weight: LoraWeight, out: Tensor, transpose_w: bool) -> Tensor:
    """``out + x @ ΔW.T`` (``transpose_w``, as in F.linear) or ``out + x @ ΔW``, factored."""
    for L, R, s, p, name in weight.factors():
        first, second = (R.t(), L.t()) if transpose_w else (L, R)  # x @ (s L R).T = s (x R.T) L.T
        h = F.dropout(x.to(first.dtype), p) if p else x.to(first.dtype)
        h = weight.keep(h @ first, name)  # (.., in) @ (in, r) -> (.., r)
        if h.dtype == out.dtype:
            rows = h.shape[:-1].numel()  # no -1 in the reshapes: `out` may have 0 features
            out2 = out.reshape(rows, out.shape[-1])
            out = torch.addmm(out2, h.reshape(rows, h.shape[-1]), second, alpha=s).view(out.shape)
        else:
            out = _add(out, (h @ second) * s)
    return out


class _LowRank(torch.autograd.Function):
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


def _one_plain_adapter(weight: LoraWeight, x: Tensor):
    """``(L, R, s)`` when ``weight`` has one adapter, no DoRA, no dropout at work, no per-sample
    rows, and one dtype throughout: the case :class:`_LowRank` computes; else None."""
    if weight._rows is not None or len(weight._names) != 1 or weight.scales() != (None, {}):
        return None
    ((L, R, s, p, _),) = weight.factors()
    return (L, R, s) if not p and x.dtype == L.dtype == weight._w0.dtype and x.dim() >= 1 else None


def _low_rank(x: Tensor, Wt: Tensor, bias: Tensor | None, first: Tensor, second: Tensor, s: float) -> Tensor:
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    return _LowRank.apply(x2, Wt, bias, first, second, s).view(*x.shape[:-1], Wt.shape[-1])


def _linear(input, weight, bias=None):
    if not _usable(weight, input):
        return NotImplemented
    plain = _one_plain_adapter(weight, input)
    if plain is not None:  # x @ W0.T + s * (x @ R.T) @ L.T
        L, R, s = plain
        return _low_rank(input, weight._w0.t(), bias, R.t(), L.t(), s)
    out = weight.rescale(F.linear(input, weight._w0, bias), bias)
    return _branch_right(input, weight, out, transpose_w=True)


def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    if out is not None or beta != 1 or alpha != 1 or not _usable(mat2, mat1) or isinstance(input, LoraWeight):
        return NotImplemented
    plain = _one_plain_adapter(mat2, mat1)
    if plain is not None and mat1.dim() == 2 and input.dim() == 1:  # a bias, as in Conv1D
        L, R, s = plain  # x @ W0 + s * (x @ L) @ R
        return _low_rank(mat1, mat2._w0, input, L, R, s)
    out = mat2.rescale(torch.addmm(input, mat1, mat2._w0), input)
    return _branch_right(mat1, mat2, out, transpose_w=False)


def _matmul(input, other, *, out=None):
    if out is not None or not _usable(other, input) or input.dim() == 0:
        return NotImplemented
    return _branch_right(input, other, other.rescale(torch.matmul(input, other._w0)), transpose_w=False)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False):
    # scale_grad_by_freq scales the gradient of W's rows, so of B too: only the merged weight has it.
    if max_norm is not None or scale_grad_by_freq or not _usable(weight, input):
        return NotImplemented
    out = F.embedding(input, weight._w0, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    pad = None if padding_idx is None else (input == padding_idx % weight.shape[0]).unsqueeze(-1)
    out = weight.rescale(out, frozen=pad)  # as for the merged weight, the padding row gets no gradient
    for L, R, s, p, name in weight.factors():
        h = weight.keep(F.embedding(input, L, padding_idx, None, norm_type, scale_grad_by_freq), name)  # (.., r)
        extra = (F.dropout(h, p) if p else h) @ R * s  # (.., r) @ (r, dim) -> (.., dim)
        if padding_idx is not None:  # the padding row gets no gradient, as in the merged weight
            extra = torch.where(pad, extra.detach(), extra)
        out = _add(out, extra)
    return out


def _embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,
                   mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                   padding_idx=None):
    if max_norm is not None or mode == "max" or scale_grad_by_freq or not _usable(weight, input):
        return NotImplemented
    rest = dict(offsets=offsets, scale_grad_by_freq=scale_grad_by_freq, mode=mode,
                per_sample_weights=per_sample_weights, include_last_offset=include_last_offset,
                padding_idx=padding_idx)
    out = weight.rescale(F.embedding_bag(input, weight._w0, sparse=sparse, **rest))
    for L, R, s, p, name in weight.factors():
        h = weight.keep(F.embedding_bag(input, L, **rest), name)  # (bags, r)
        out = _add(out, (F.dropout(h, p) if p else h) @ R * s)
    return out


def _conv(op):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if (groups != 1 or not isinstance(weight, LoraWeight) or isinstance(input, LoraWeight)
                or weight._lora.transpose or weight._lora.experts):
            return NotImplemented
        kernel, ones = weight.shape[2:], (1,) * (weight.dim() - 2)
        out = op(input, weight._w0, bias, stride, padding, dilation, groups)
        out = weight.rescale(out, bias, dim=-len(kernel) - 1)  # the channel dim
        for L, R, s, p, name in weight.factors():
            x = input.to(R.dtype)
            h = op(F.dropout(x, p) if p else x, R.view(-1, weight.shape[1], *kernel), None,
                   stride, padding, dilation)  # r output channels
            h = weight.keep(h, name)
            out = _add(out, op(h, L.reshape(*L.shape, *ones)) * s)  # 1x1 conv: r -> out
        return out

    return conv


_FACTORED = {
    F.linear: _linear,
    torch.addmm: _addmm,
    torch.matmul: _matmul,
    Tensor.__matmul__: _matmul,
    F.embedding: _embedding,
    F.embedding_bag: _embedding_bag,
    F.conv1d: _conv(F.conv1d),
    F.conv2d: _conv(F.conv2d),
    F.conv3d: _conv(F.conv3d),
}
_SIGNATURES = {f: inspect.signature(impl) for f, impl in _FACTORED.items()}
_METADATA = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.is_floating_point, Tensor.layout.__get__,
    Tensor.is_cuda.__get__, Tensor.is_meta.__get__,
}
