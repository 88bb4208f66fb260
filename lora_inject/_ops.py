r"""The op table's factored forms: one small function per op, registered with :func:`~lora_inject._factored.implements`.

Each computes ``op(x, W0) + s * op'(op''(x, A), B)`` for a :class:`~lora_inject._factored.FactoredWeight`,
so that no weight-sized update is built, saved for backward or differentiated, or returns
NotImplemented where its arguments do not fit (see :func:`fits`): the op then gets the merged weight.

The forms: ``F.linear`` (:func:`linear`), ``torch.addmm`` (:func:`addmm`), ``torch.matmul`` and
``torch.mm`` (:func:`matmul`, and ``x @ w``), ``F.embedding`` (:func:`embedding`),
``F.embedding_bag`` (:func:`embedding_bag`), ``F.conv1d/2d/3d`` (:func:`conv_form`). Each knows
which dimension of the stored weight its output carries (``F.linear`` and conv: dim 0; the others:
dim 1); DoRA's gains scale output units, so a DoRA weight is factored only where that dimension is
the rule's output dimension. Inside :func:`lora_inject.per_sample` each term runs on its own
samples' rows (see :mod:`lora_inject._rows`); one plain adapter runs the fused kernel where it pays
(see :mod:`lora_inject._kernels`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._factored import RAW_BIAS, FactoredWeight, Term, implements, refuse_lora_dropout
from ._kernels import FUSED_MIN, NoGradAt, frozen_linear, fused, plain_eager
from ._rows import Slots, gather, gathered, in_place, keep, scatter, select, served, some
from .kind import Base, Kind, factored, find_kind, kernel, pointwise


def _positions(x: Tensor, kernel, stride, padding, dilation) -> int:
    """The output positions of a conv of ``kernel`` on ``x`` (batch included): the pixels its
    output has, each a product of the kernel with the input. A plain loop: this runs on every
    forward of a conv."""
    shape, n = x.shape, len(kernel)
    total = 1
    for i in range(len(shape) - n - 1):
        total *= shape[i]
    same = padding == "same"
    for j in range(n):
        size = shape[len(shape) - n + j]
        if same:
            total *= size
            continue
        s = stride[j] if type(stride) is tuple else stride
        p = 0 if padding == "valid" else padding[j] if type(padding) is tuple else padding
        d = dilation[j] if type(dilation) is tuple else dilation
        total *= max((size + 2 * p - d * (kernel[j] - 1) - 1) // s + 1, 0)
    return total


def fits(weight, x, out_dim: int, quantized: bool = False) -> bool:
    """Whether ``weight`` is ours and not a leaf, 2-D and not an input too, DoRA (if any) scales
    ``out_dim`` (its output units, not its input units), and its ``W0`` is dense unless the op
    takes a quantized one (``quantized``: F.linear, which the backend dispatches, except for
    weights read only by their module's own forward). A leaf has no factored form: every op runs
    on it as on a dense tensor."""
    return (type(weight) is FactoredWeight and not weight._leaf and type(x) is not FactoredWeight
            and not weight._view.experts
            and (not weight._dora or not weight._across and weight._view.out_dim == out_dim)
            and ((s := weight._scheme) is None or quantized and not s.own_forward))


# -- a weight with kinds of update: their factored forms, composed in order -----------------------
def _lora_linear(x, base, params, view, scaling, options):
    p = options["dropout"]
    y = base(x)
    h = F.linear(F.dropout(x, p) if p else x, params["A"].to(x.dtype))  # (.., r)
    return y + (F.linear(h, params["B"].to(h.dtype)) * scaling).to(y.dtype)


def _lora_conv(x, base, params, view, scaling, options):
    p = options["dropout"]
    y = base(x)
    h = base.using(F.dropout(x, p) if p else x, params["A"].to(x.dtype))  # r channels
    return y + (pointwise(h, params["B"].to(h.dtype), len(kernel(view))) * scaling).to(y.dtype)


def _lora_embedding(x, base, params, view, scaling, options):
    p = options["dropout"]
    y = base(x)
    h = F.embedding(x, params["A"].mT)  # (.., r)
    return y + (F.linear(F.dropout(h, p) if p else h, params["B"]) * scaling).to(y.dtype)


# A LoRA term as a kind's step, where it shares a weight with other kinds: ``s * B @ A`` (A and B
# as the Term holds them, in the (.., out, in) view), its dropout on the input of the branch.
LORA_STEP = Kind("lora", create=lambda view, r, alpha, options: {},
                 delta=lambda params, view, scaling, options: params["B"] @ params["A"] * scaling,
                 factored={"linear": _lora_linear, "conv": _lora_conv, "embedding": _lora_embedding})


def stacked(op: str, x: Tensor, weight: FactoredWeight, bias: Tensor | None, call: Callable,
            using: Callable) -> Tensor:
    """``op`` on ``x`` with ``weight``'s terms applied in order through their factored forms
    (see :func:`lora_inject.kind.factored`), around ``call(x, b)``, the op with ``W0`` and the
    bias ``b`` as it was before the adapters; NotImplemented where a term has no form for ``op``
    (a DoRA term has none), a form does not fit, or a step's scaling is a tensor of one factor per
    output unit (a kind's dropout: see :attr:`lora_inject.Kind.dropout`): the op then gets the
    merged weight.

    Where a kind adapts the bias too (:attr:`lora_inject.Kind.apply_bias`), the forms start from
    the bias before the adapters (see :data:`lora_inject._factored.RAW_BIAS`). Where that is not
    known (under ``torch.compile``, or a bias that is not the layer's), they run with no bias and
    the bias the op was given is added to their output, as the merged weight's op adds it."""
    steps = []
    for t in weight._terms:
        if type(t) is Term:
            if t.magnitude is not None:
                break
            steps.append((LORA_STEP, {"A": t.A, "B": t.B}, t.scaling, {"dropout": t.dropout}))
        else:
            if isinstance(t.scaling, Tensor) and t.scaling.dim() or t.strength != 1:
                break  # a kind's dropout of output units, or a multiplicative kind at a strength: merged
            steps.append((find_kind(t.kind), t.params, t.scaling, t.options))
    out = given = None
    if len(steps) == len(weight._terms):
        if bias is not None and any(k.biased(options) for k, _, _, options in steps):
            raw = bias.__dict__.get(RAW_BIAS)
            if raw is None:  # the forms without a bias; the given one added after them
                given = bias if op == "linear" else bias.view(-1, *(1,) * len(kernel(weight._view)))
            bias = raw
        out = factored(op, x, Base(lambda z: call(z, bias), using, bias), steps, weight._view)
    if out is None:
        if not torch.compiler.is_compiling():  # compiled, an error would only send the frame back to eager
            refuse_lora_dropout(weight._terms, f"this {op} op takes the merged weight (a kind with no factored "
                                "form for it, a form that does not fit, DoRA, a kind's dropout of output units, "
                                "or a multiplicative kind at a strength other than 1)")
        return NotImplemented
    return out if given is None else out + given.to(out.dtype)  # as autocast casts the merged op's bias


def one_plain_term(weight: FactoredWeight, x: Tensor):
    """``(L, R, s)`` when ``weight`` has one term, no DoRA, no dropout at work, no per-sample rows,
    in plain eager mode: the case :class:`~lora_inject._kernels.LowRank` computes; else None."""
    if weight._rows is not None or len(weight._terms) != 1 or x.dim() < 1:
        return None
    term = weight._terms[0]
    if term.dropout or term.magnitude is not None:
        return None
    if not plain_eager():  # first: compiled, no choice by size, which would guard the graph on it
        return None
    if torch.is_grad_enabled() and x.numel() < FUSED_MIN and (x.requires_grad or term.A.requires_grad
                                                                 or term.B.requires_grad):
        return None  # the kernel would not pay (see fused): decided before building its factors
    L, R = weight._view.stored_factors(term.A, term.B)
    return L, R, term.scaling


def add(out: Tensor, extra: Tensor, s: float = 1.0) -> Tensor:
    """``out + s * extra`` in ``out``'s dtype: one op where the dtypes agree."""
    if isinstance(s, Tensor):  # compiled: a 0-d tensor, which `alpha=` does not take
        return out + (extra * s).to(out.dtype)
    if extra.dtype == out.dtype:
        return torch.add(out, extra, alpha=s)
    return out + (extra * s if s != 1.0 else extra).to(out.dtype)


def branch(x: Tensor, weight: FactoredWeight, out: Tensor, transposed: bool) -> Tensor:
    """``out + x @ ΔW.T`` (``transposed``, as in F.linear) or ``out + x @ ΔW``, factored."""
    if type(weight._rows) is Slots:  # compiled, the rows as data: the gathered matmul
        return served(x, weight, out, transposed)
    if weight._rows is not None and weight._terms:  # per_sample(): the gathered matmul, where it applies
        result = gathered(x, weight, out, transposed)
        if result is not None:
            return result
    chosen = weight._rows  # per_sample()'s assignment, or None
    for L, R, s, p, name in weight._factors():
        first, second = (R.t(), L.t()) if transposed else (L, R)  # x @ (s L R).T = s (x R.T) L.T
        idx = None if chosen is None else select(chosen, name, x)
        if idx is not None:  # per_sample(): this adapter's samples only, gathered and added back
            if some(idx):
                h = gather(x, idx).to(first.dtype)
                h = (F.dropout(h, p) if p else h) @ first  # (n, .., r)
                if isinstance(idx, slice) and in_place(out, h) and h.dtype == out.dtype and out.is_contiguous() \
                        and not isinstance(s, Tensor):  # contiguous samples: one addmm_ into their rows
                    out[idx].view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), second, alpha=s)
                else:
                    out = scatter(out, idx, h @ second, s)
            continue
        h = x.to(first.dtype)
        h = (F.dropout(h, p) if p else h) @ first  # (.., in) @ (in, r) -> (.., r)
        if h.dtype == out.dtype and h.dim() >= 1 and not isinstance(s, Tensor):  # out += s * h @ second, one op
            rows = h.shape[:-1].numel()  # no -1 in the reshapes: `out` may have 0 features
            out = torch.addmm(out.reshape(rows, out.shape[-1]), h.reshape(rows, h.shape[-1]), second,
                              alpha=s).view_as(out)
        else:
            out = add(out, h @ second, s)  # (.., r) @ (r, out)
    return out


def beside(x: Tensor, weight: FactoredWeight, base: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` from the base output ``base = F.linear(x, W0, bias)``,
    however it was computed: DoRA's rescaling, then the low-rank branch."""
    return branch(x, weight, weight._rescale(base, bias), transposed=True)


def plain_form(op: Callable, x: Tensor, weight: FactoredWeight, bias: Tensor | None, first: Callable,
               second: Callable) -> Tensor:
    """``op(x, W0, bias) + s * second(first(x', R), L)``, summed over the terms of a weight whose
    terms are all plain LoRA (``weight._simple``), the stored update being ``s * L @ R`` and ``x'``
    ``x`` through the term's dropout: the common case, in as few Python steps as it takes.

    ``second(h, L, s, out, in_place)`` gives ``out + s * op'(h, L)``, in place into ``out`` with
    ``in_place`` (nothing to differentiate, no ``torch.func`` transform); for mixed dtypes or a
    0-d scaling it is called with ``out=None`` and gives ``op'(h, L)``, and the sum is taken here."""
    out = op(x, weight._w0, bias)
    # Not under vmap: out may lack the batch dimension that h has.
    in_place = not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
    transpose = weight._view.transpose
    for A, B, s, p, *_ in weight._terms:
        L, R = (A.mT, B.mT) if transpose else (B, A)
        h = first(F.dropout(x, p) if p else x, R)
        if type(s) is float and h.dtype == L.dtype == out.dtype:
            out = second(h, L, s, out, in_place)
        else:  # mixed dtypes, or a 0-d scaling under compile
            out = add(out, second(h, L, 1.0, None, False), s)
    return out


def _linear_second(h: Tensor, L: Tensor, s: float, out: Tensor | None, in_place: bool) -> Tensor:
    """``out + s * F.linear(h, L)`` (see :func:`plain_form`): ``(.., r) @ (r, out)``, one ``addmm``
    where it can."""
    if out is None:
        return F.linear(h, L)
    if not in_place:  # not addmm: its backward, with an alpha and L.t()'s node, costs more
        return torch.add(out, F.linear(h, L), alpha=s)
    if h.dim() == 2:
        return out.addmm_(h, L.t(), alpha=s)
    n = h.shape[:-1].numel()  # no -1 in the views: `out` may have 0 features
    out.view(n, out.shape[-1]).addmm_(h.view(n, h.shape[-1]), L.t(), alpha=s)
    return out


def _sum(y: Tensor, s: float, out: Tensor | None, in_place: bool) -> Tensor:
    """``out + s * y`` (see :func:`plain_form`), or ``y`` where ``out`` is None."""
    if out is None:
        return y
    return out.add_(y, alpha=s) if in_place else torch.add(out, y, alpha=s)


THIN = 2  # what a multiply-add of the factored form's thin products costs, in the op's own (see merge_pays)
OP = 1 << 16  # an op's fixed cost (a few microseconds), counted in multiply-adds (see merge_pays)
TRAFFIC = 4  # what the merged weight's memory traffic costs per element (written, then read), in multiply-adds


def merge_pays(weight: FactoredWeight, x: Tensor, positions: int | Callable[[], int]) -> bool:
    """Whether an op applied at ``positions`` output positions (rows of ``F.linear``, a conv's
    output pixels; or a function that counts them, called only where the count decides) costs
    less on the merged weight ``W0 + s * L @ R`` than in the factored form, for a ``_simple``
    weight with no dropout at work and a ``W0`` of float32 or wider, outside autocast (in half
    precision the merged weight would round small updates away: the factored form keeps them).
    Costs are counted in multiply-adds.

    The factored form adds ``positions * r * (in + out)`` to the forward, each counted
    :data:`THIN` times (its products have ``r`` outputs or inputs, and run at about half the rate
    of the op's own on CPU BLAS and oneDNN); the merged one ``out * in * r``. In grad mode each
    side's backward costs twice its forward, and the merged weight's own gradient costs
    ``positions * out * in`` more; the merged weight is taken only where it is no larger than
    the input and output it sits between: training never holds a weight-sized tensor that the
    activations would not dwarf. Grad mode decides, not which tensors require a gradient, so
    that ``functional_call`` with the model's own (detached) state dict computes the forward's
    very bits. A symbolic size (``torch.compile(dynamic=True)``), where it decides, keeps the
    factored form: a choice by size would guard the graph on the batch size and recompile it for
    each new one.

    A merge is small where its multiply-adds and its memory traffic (:data:`TRAFFIC` per element
    of the weight, which is written, then read) come to :data:`OP` or fewer: less than the fixed
    cost of an op, and the factored form has one op more than the merged one (three more with a
    gradient), so these count too. Without a gradient a small merge always pays, and the choice
    reads no size of the input; with one, it pays unless the merged weight's gradient outweighs
    them, and its weight-sized tensors are small. At larger sizes the count is as above."""
    if torch.compiler.is_compiling():  # a graph's weight is made inside it: nothing to keep
        facts = _merge_facts(weight)
    else:  # what the weight itself decides, read once: a kept weight serves many calls
        facts = weight.__dict__.get("_pays")
        if facts is None:
            facts = weight.__dict__["_pays"] = _merge_facts(weight)
    if not facts:
        return False
    r, out, size, device = facts
    if device is not None and torch.is_autocast_enabled(device):  # it would build the merged weight in half
        return False
    merged, grad = size * r, torch.is_grad_enabled()
    small = merged + TRAFFIC * size <= OP
    if small and not grad:
        return True
    if callable(positions):
        positions = positions()
    if not isinstance(positions, int):
        return False
    branch = THIN * positions * r * (out + size // max(out, 1))
    if merged >= branch and not small:  # the common case, and never cheaper with a gradient either
        return False
    if not grad:
        return True
    if size > x.numel() + positions * out and not small:  # F.linear's and a conv's outputs: stored dim 0
        return False
    return 3 * merged + positions * size < 3 * branch + (3 * OP if small else 0)


def _merge_facts(weight: FactoredWeight) -> tuple[int, int, int, str | None] | tuple[()]:
    """What :func:`merge_pays` reads of the weight: ``(r, out, size, device type)``, its terms'
    total rank, ``W0``'s stored dim 0 and size; or ``()`` where the merged weight never pays (a
    ``W0`` in half precision, which would round small updates away, or a dropout at work)."""
    w0 = weight._w0
    if w0.dtype.itemsize < 4:
        return ()
    r = 0
    for t in weight._terms:
        if t.dropout:
            return ()
        r += t.A.shape[-2]
    device = w0.device.type  # None where autocast has no such device (meta)
    return r, w0.shape[0], w0.numel(), device if torch.amp.is_autocast_available(device) else None


def plain_merged(weight: FactoredWeight) -> Tensor:
    """The merged weight ``W0 + sum s * L @ R`` of a ``_simple`` weight, in its stored layout, one
    ``addmm`` per term (see :func:`merge_pays`)."""
    w0, view = weight._w0, weight._view
    M = w0 if w0.dim() == 2 else w0.flatten(1)  # the stored layout as a matrix: (out, in..), or (in, out)
    for A, B, s, *_ in weight._terms:
        L, R = (A.mT, B.mT) if view.transpose else (B, A)
        M = torch.addmm(M, L, R, alpha=s) if type(s) is float else M + (L @ R) * s
    return M if w0.dim() == 2 else M.view_as(w0)  # not view(w0.shape): a torch.Size costs 2 us more


@implements(F.linear, names=("input", "weight", "bias"), defaults=(None,))
def linear(input, weight, bias):
    if type(weight) is FactoredWeight and weight._simple and type(input) is not FactoredWeight:
        if merge_pays(weight, input, input.numel() // max(input.shape[-1], 1)):
            return F.linear(input, plain_merged(weight), bias)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or input.numel() < FUSED_MIN \
                or len(weight._terms) > 1:  # compiled: no choice by size, which would guard the graph on it
            return plain_form(F.linear, input, weight, bias, F.linear, _linear_second)
    if not fits(weight, input, 0, quantized=True):
        return NotImplemented
    if weight._kinds:
        w0 = weight._w0
        call = frozen_linear if weight._scheme is not None else F.linear
        return stacked("linear", input, weight, bias, lambda z, b: call(z, w0, b), F.linear)
    if weight._rows is not None and input.dim() == 1:  # per_sample(): an unbatched input is one sample
        return linear(input.unsqueeze(0), weight, bias).squeeze(0)
    if weight._scheme is not None:  # the backend's kernel, and the branch beside it
        return beside(input, weight, frozen_linear(input, weight._w0, bias), bias)
    plain = one_plain_term(weight, input)
    if plain is not None:  # x @ W0.T + s * (x @ R.T) @ L.T
        L, R, s = plain
        out = fused(input, weight._w0.t(), bias, R.t(), L.t(), s)
        if out is not None:
            return out
    return beside(input, weight, F.linear(input, weight._w0, bias), bias)


@implements(torch.addmm, Tensor.addmm, names=("input", "mat1", "mat2", "beta", "alpha", "out"),
            defaults=(1, 1, None))
def addmm(input, mat1, mat2, beta, alpha, out):
    if out is not None or beta != 1 or alpha != 1 or not fits(mat2, mat1, 1) or type(input) is FactoredWeight:
        return NotImplemented
    if mat2._kinds:  # x @ W is the linear op of a transposed tensor's rows
        w0 = mat2._w0
        if not mat2._view.transpose:
            return NotImplemented
        return stacked("linear", mat1, mat2, input,
                       lambda z, b: torch.mm(z, w0) if b is None else torch.addmm(b, z, w0), F.linear)
    plain = one_plain_term(mat2, mat1)
    if plain is not None and input.dim() == 1:  # a bias, as in Conv1D: x @ W0 + s * (x @ L) @ R
        L, R, s = plain
        result = fused(mat1, mat2._w0, input, L, R, s)
        if result is not None:
            return result
    result = mat2._rescale(torch.addmm(input, mat1, mat2._w0), input)
    return branch(mat1, mat2, result, transposed=False)


@implements(torch.matmul, Tensor.matmul, torch.mm, Tensor.mm, names=("input", "other", "out"),
            defaults=(None,))
def matmul(input, other, out):
    if out is not None or not fits(other, input, 1) or input.dim() == 0:
        return NotImplemented
    if other._kinds:
        w0 = other._w0
        if not other._view.transpose or input.dim() == 1:
            return NotImplemented
        return stacked("linear", input, other, None, lambda z, b: torch.matmul(z, w0), F.linear)
    if other._rows is not None and input.dim() == 1:  # per_sample(): an unbatched input is one sample
        return matmul(input.unsqueeze(0), other, None).squeeze(0)
    plain = one_plain_term(other, input)
    if plain is not None and input.dim() >= 2:
        L, R, s = plain
        result = fused(input, other._w0, None, L, R, s)
        if result is not None:
            return result
    return branch(input, other, other._rescale(torch.matmul(input, other._w0)), transposed=False)


@implements(F.embedding, names=("input", "weight", "padding_idx", "max_norm", "norm_type",
                                "scale_grad_by_freq", "sparse"), defaults=(None, None, 2.0, False, False))
def embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse):
    # max_norm renormalises the weight's rows in place, and scale_grad_by_freq scales the gradient of
    # W's rows, so of B too: both need the merged weight.
    if max_norm is not None or scale_grad_by_freq or not fits(weight, input, 1):
        return NotImplemented
    if weight._kinds:
        w0 = weight._w0
        if not weight._view.transpose:
            return NotImplemented
        out = stacked("embedding", input, weight, None,
                      lambda i, b: F.embedding(i, w0, padding_idx, None, norm_type, False, sparse),
                      lambda i, M: F.embedding(i, M.mT))
        if out is not NotImplemented and padding_idx is not None:  # the padding row gets no gradient
            out = NoGradAt.apply(out, (input == padding_idx % w0.shape[0]).unsqueeze(-1))
        return out
    base = F.embedding(input, weight._w0, padding_idx, None, norm_type, False, sparse)
    out = weight._rescaling(base)  # DoRA: (c - 1) * base
    for L, R, s, p, name in weight._factors():
        idx = select(weight._rows, name, input)
        if idx is not None:  # per_sample(): this adapter's samples only
            out = torch.zeros_like(base) if out is None else out
            if some(idx):
                h = F.embedding(gather(input, idx), L, padding_idx)
                out = scatter(out, idx, (F.dropout(h, p) if p else h) @ R, s)
            continue
        h = keep(weight._rows, name, F.embedding(input, L, padding_idx))  # (.., r); compiled per sample: masked
        extra = (F.dropout(h, p) if p else h) @ R * s  # (.., r) @ (r, dim) -> (.., dim)
        out = extra if out is None else out + extra.to(out.dtype)
    if out is None:  # no term: every adapter left out of this forward (a kind's module_dropout)
        return base
    if padding_idx is not None:  # as for the merged weight, the padding row gets no gradient
        out = NoGradAt.apply(out, (input == padding_idx % weight._w0.shape[0]).unsqueeze(-1))
    return add(base, out)


@implements(F.embedding_bag, names=(
    "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
    "per_sample_weights", "include_last_offset", "padding_idx"),
    defaults=(None, None, 2, False, "mean", False, None, False, None))
def embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                  per_sample_weights, include_last_offset, padding_idx):
    if max_norm is not None or mode == "max" or scale_grad_by_freq or not fits(weight, input, 1) \
            or weight._kinds:
        return NotImplemented
    rest = dict(offsets=offsets, mode=mode, per_sample_weights=per_sample_weights,
                include_last_offset=include_last_offset, padding_idx=padding_idx)
    out = weight._rescale(F.embedding_bag(input, weight._w0, sparse=sparse, **rest))
    for L, R, s, p, name in weight._factors():
        idx = select(weight._rows, name, input) if offsets is None and input.dim() == 2 else None
        if idx is not None:  # per_sample(), one bag per row: this adapter's bags only
            if some(idx):
                sub = dict(rest, per_sample_weights=None if per_sample_weights is None
                           else gather(per_sample_weights, idx))
                h = F.embedding_bag(gather(input, idx), L, **sub)
                out = scatter(out, idx, (F.dropout(h, p) if p else h) @ R, s)
            continue
        h = keep(weight._rows, name, F.embedding_bag(input, L, **rest))  # (bags, r); bags by offsets: masked
        out = add(out, (F.dropout(h, p) if p else h) @ R, s)
    return out


def conv_form(op: Callable) -> Callable:
    """The factored form of ``op`` (``F.conv1d``, ``conv2d`` or ``conv3d``): a conv to ``r``
    channels with ``A``, then a 1x1 conv with ``B``."""
    def conv(input, weight, bias, stride, padding, dilation, groups):
        if groups != 1 or not fits(weight, input, 0) or weight._view.transpose:
            return NotImplemented
        shape = weight._w0.shape
        if weight._simple:  # A (r, in * k..) as a conv to r channels, B (out, r) as a 1x1 conv
            kernel, ones = shape[2:], (1,) * (len(shape) - 2)
            if merge_pays(weight, input, lambda: _positions(input, kernel, stride, padding, dilation)):
                return op(input, plain_merged(weight), bias, stride, padding, dilation)
            return plain_form(lambda z, w, b: op(z, w, b, stride, padding, dilation), input, weight, bias,
                              lambda z, A: op(z, A.view(-1, shape[1], *kernel), None, stride, padding, dilation),
                              lambda h, B, s, out, in_place: _sum(op(h, B.view(*B.shape, *ones)), s, out, in_place))
        if weight._kinds:
            w0, kernel = weight._w0, shape[2:]
            return stacked("conv", input, weight, bias, lambda z, b: op(z, w0, b, stride, padding, dilation, groups),
                           lambda z, M: op(z, M.reshape(M.shape[0], -1, *kernel), None, stride, padding, dilation))
        if weight._rows is not None and input.dim() == len(shape) - 1:  # per_sample(): unbatched, one sample
            return conv(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
        kernel, ones = shape[2:], (1,) * (len(shape) - 2)
        out = op(input, weight._w0, bias, stride, padding, dilation, groups)
        out = weight._rescale(out, bias, dim=-len(kernel) - 1)  # the channel dim
        chosen = weight._rows  # per_sample()'s assignment, or None
        for L, R, s, p, name in weight._factors():
            idx = select(chosen, name, input) if chosen is not None and input.dim() == len(shape) else None
            if idx is not None and not some(idx):
                continue
            x = (input if idx is None else gather(input, idx)).to(R.dtype)
            h = op(F.dropout(x, p) if p else x, R.view(-1, shape[1], *kernel), None,
                   stride, padding, dilation)  # r output channels
            if idx is None and chosen is not None:
                h = keep(chosen, name, h)  # per_sample() on an unbatched input: masked
            y = op(h, L.reshape(*L.shape, *ones))  # 1x1 conv: r -> out
            out = add(out, y, s) if idx is None else scatter(out, idx, y, s)
        return out

    return conv


for _op in (F.conv1d, F.conv2d, F.conv3d):
    implements(_op, names=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
               defaults=(None, 1, 0, 1, 1))(conv_form(_op))
