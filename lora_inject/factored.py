r"""The adapted weight as a value: ``W0`` plus low-rank terms, kept factored where an op allows it.

``LoRA.forward`` returns a :class:`FactoredWeight` for layers whose rule is factored. It is a
wrapper tensor with no storage of its own: it holds ``W0`` and one :class:`Term` per active
adapter (its factors, scaling, dropout and DoRA magnitude), and nothing else. The layer's own
forward runs unchanged:

* an op of the table below computes ``op(x, W0) + s * op'(op''(x, A), B)``, so no weight-sized
  update is built, saved for backward or differentiated;
* every other op, and a table op whose arguments do not fit (another orientation under DoRA, a
  grouped conv, ``max_norm``...), gets the merged weight ``W0 + s * B @ A``, computed above
  autograd so that gradients reach the factors;
* anything that reaches ``__torch_dispatch__`` (below autograd) gets the merged value where no
  gradient is wanted, and an error that names lora_inject where one is: it never computes with
  ``W0`` alone.

The table, one entry per op: ``F.linear``, ``torch.addmm``, ``torch.matmul`` (and ``x @ w``),
``torch.mm``, ``F.embedding``, ``F.embedding_bag``, ``F.conv1d/2d/3d``. Each entry knows which
dimension of the stored weight its output carries (``F.linear`` and conv: dim 0; the others:
dim 1, as each form tells :func:`fits`); DoRA's gains scale output units, so a DoRA weight is
factored only where that dimension is the rule's output dimension.

A quantized ``W0`` (see :mod:`lora_inject.quant`) stays quantized: ``F.linear`` runs the backend's
kernel on it (:func:`frozen_linear`), other ops get the merged weight from its dense value, and a
weight only its module's forward can read (bitsandbytes') is never given to an op by us.
Inside :func:`lora_inject.per_sample` each term runs on its own samples' rows only
(:meth:`FactoredWeight._select`, :func:`scatter`). Under ``torch.compile`` a term's scaling is a
0-d tensor, so that changing it recompiles nothing.

Autocast, ``torch.func`` transforms, forward-mode AD and ``torch.compile`` run the same composable
ops; the one fused kernel (one plain adapter, see :class:`_LowRank`) runs in plain eager mode on
inputs of 64k elements or more (on smaller ones its Python backward costs more than it saves),
and under autocast on inputs cast as autocast casts them. With nothing to differentiate, the
same sums run without an autograd node.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map_only

from . import dora, quant
from .view import View, compute_dtype

__all__: list[str] = []

aten = torch.ops.aten


class Term(NamedTuple):
    """One active adapter's part of the weight: ``scaling * B @ A`` in the matrix view."""

    A: Tensor  # (r, in); with PiSSA/OLoRA's frozen factors appended along r
    B: Tensor  # (out, r)
    scaling: float | Tensor  # a 0-d tensor under torch.compile (see LoRA.terms)
    dropout: float = 0.0  # the probability at work: 0 in eval mode
    magnitude: Tensor | None = None  # DoRA's m, (out,)
    name: str = ""

    def _detached(self) -> Term:
        m = None if self.magnitude is None else self.magnitude.detach()
        return self._replace(A=self.A.detach(), B=self.B.detach(), magnitude=m)


class FactoredWeight(Tensor):
    """``W0 + sum_i s_i * view(B_i @ A_i)`` (DoRA: see :mod:`lora_inject.dora`), kept factored.

    Its shape, dtype, device and strides are ``W0``'s; its value, for every op, is the adapted
    weight. ``rows`` is set inside :func:`lora_inject.per_sample`: each sample's adapter name, or
    None; then each term acts only on the samples that chose it.

    ``detach()`` gives a plain tensor holding the merged value. ``nn.Parameter(weight)``, which
    needs a tensor of the type it is given, gets a *leaf*: a FactoredWeight with no terms whose
    ``W0`` is the merged value, detached. Every op runs on the leaf itself, above autograd, so that
    a gradient reaches it as it reaches a dense leaf of that value; what reads its memory or
    pickles it (``numpy()``, ``data_ptr()``, ``torch.save``, ``copy.deepcopy``) gets that dense
    tensor (see ``HOST``).
    """

    _w0: Tensor  # W0; for a leaf, the merged value
    _terms: tuple[Term, ...]
    _view: View
    _rows: tuple[str | None, ...] | None
    _leaf: bool
    _owner: object  # the LoRA that made it, or None

    @staticmethod
    def __new__(cls, w0: Tensor, terms, view: View, rows=None, owner=None):
        if quant.scheme(w0) is None:
            shape, strides, dtype = w0.shape, w0.stride(), w0.dtype
        else:  # a quantized W0 reads as the dense weight it stands for
            shape, dtype = quant.shape(w0), quant.dtype(w0)
            strides = torch.empty(shape, device="meta").stride()
        out = Tensor._make_wrapper_subclass(cls, shape, strides=strides, dtype=dtype,
                                            device=w0.device, requires_grad=False)
        out._w0, out._terms, out._view, out._rows, out._gains = w0, tuple(terms), view, rows, None
        out._leaf, out._owner = False, owner  # owner: the LoRA whose forward made it (see LoRA.right_inverse)
        return out

    def __init__(self, *args, **kwargs):
        pass

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"FactoredWeight({self._merged()!r}, adapters={[t.name for t in self._terms]})"

    # -- compile: the inner tensors and the rest -------------------------------------------------
    def __tensor_flatten__(self):
        # Literal attribute names, as torchao's tensor_data_names: ``_w0``, then ``_A<i>``,
        # ``_B<i>``, ``_m<i>`` (DoRA) and ``_s<i>`` (a 0-d scaling) for each term. They are set
        # here, where compile asks for them, and cost nothing per forward.
        inner = {"_w0": self._w0}
        for i, t in enumerate(self._terms):
            inner[f"_A{i}"], inner[f"_B{i}"] = t.A, t.B
            if t.magnitude is not None:
                inner[f"_m{i}"] = t.magnitude
            if isinstance(t.scaling, Tensor):
                inner[f"_s{i}"] = t.scaling
        self.__dict__.update(inner)
        meta = tuple((None if isinstance(t.scaling, Tensor) else t.scaling, t.dropout, t.name,
                      t.magnitude is not None) for t in self._terms)
        return list(inner), (self._view, self._rows, meta, self._owner)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        view, rows, meta, owner = ctx
        terms = [Term(inner[f"_A{i}"], inner[f"_B{i}"], inner[f"_s{i}"] if s is None else s, p,
                      inner.get(f"_m{i}") if has_m else None, name)
                 for i, (s, p, name, has_m) in enumerate(meta)]
        return FactoredWeight(inner["_w0"], terms, view, rows, owner)

    def __getattr__(self, name: str):  # a quantized W0's own state (bitsandbytes' quant_state, CB, SCB)
        if not name.startswith("_") and quant.scheme(self._w0) is not None:
            return getattr(self._w0, name)
        raise AttributeError(name)

    # -- the value ---------------------------------------------------------------------------
    def _merged(self) -> Tensor:
        """The weight as a plain tensor (see :func:`merge`)."""
        if self._rows is not None:
            raise RuntimeError(
                f"per_sample(): an adapted weight of shape {tuple(self.shape)} reached an op that has no "
                "factored form, so it would be one weight for the whole batch and its samples could not "
                "differ. Run one forward per adapter with li.activate() instead.")
        return merge(self._w0, self._terms, self._view)

    def _detached(self) -> FactoredWeight:
        """A leaf holding the merged value (see the class docstring)."""
        if self._leaf:
            value = self._w0
        else:
            with torch.no_grad():
                value = self._merged()
        out = FactoredWeight(value, (), self._view)
        out._leaf = True
        return out

    def _plain(self) -> Tensor:
        """The dense tensor this one stands for, detached: a leaf's own storage (with its
        ``requires_grad``, and an ``nn.Parameter`` where the leaf is one), or the merged value."""
        if not self._leaf:
            with torch.no_grad():
                return self._merged().detach()
        with torch._C.DisableTorchFunctionSubclass():
            grad = REQUIRES_GRAD(self)
        if self.__dict__.get("_is_param"):
            return torch.nn.Parameter(self._w0, requires_grad=grad)
        return self._w0.detach().requires_grad_(grad)

    def _needs_grad(self) -> bool:
        return any(t.requires_grad for t in self._inner_tensors())

    def _inner_tensors(self) -> list[Tensor]:
        return [self._w0] + [x for t in self._terms for x in (t.A, t.B, t.magnitude) if x is not None]

    def _has_dora(self) -> bool:
        return any(t.magnitude is not None for t in self._terms)

    def _scales(self) -> tuple[Tensor | None, list[Tensor | None]]:
        """DoRA's ``(c, k)`` (see :func:`lora_inject.dora.scales`), computed on first use.

        Inside per_sample() each sample has one adapter: ``c`` is each term's own gain, so
        ``k`` holds the gains and ``c`` is None (see :meth:`rescale`)."""
        if self._gains is None:
            M = self._view.rows(quant.dense(self._w0))
            ct = compute_dtype(M.dtype, *(t.A.dtype for t in self._terms))
            if self._rows is None:
                self._gains = dora.scales(M, self._terms, ct)
            else:
                self._gains = (None, [None if t.magnitude is None else dora.gain(M, t, ct) for t in self._terms])
        return self._gains

    def _keep(self, h: Tensor, name: str) -> Tensor:
        """Inside per_sample(): ``h`` with the rows (dim 0) of samples that use another adapter zeroed."""
        return h if self._rows is None else h * self._mask(name, h)

    def _mask(self, name: str, t: Tensor) -> Tensor:
        """1 for the rows of ``t`` (dim 0) whose sample uses ``name``, else 0; shaped to broadcast."""
        per = self._per_row(t)
        m = torch.tensor([a == name for a in self._rows], dtype=t.dtype, device=t.device)
        return m.repeat_interleave(per).view(t.shape[0], *[1] * (t.dim() - 1))

    def _per_row(self, t: Tensor) -> int:
        """How many rows of ``t`` (dim 0) each sample has: 1, or T where a 2-D input holds each
        sample's T rows in turn (transformers' Conv1D flattens ``(batch, seq, in)``)."""
        rows, n = self._rows, t.shape[0]
        if n != len(rows) and not (t.dim() == 2 and n % len(rows) == 0):
            raise RuntimeError(f"per_sample(): a batch has {n} samples along dim 0 of the layer's input, but "
                               f"{len(rows)} adapters were given, one per sample. Pass one per sample.")
        return n // len(rows)

    def _select(self, name: str, t: Tensor) -> Tensor | slice | None:
        """Inside per_sample(): the rows along dim 0 of ``t`` of the samples that use ``name``
        (each adapter's branch then runs on its own rows only): a slice where they are
        contiguous, else their indices; None outside."""
        if self._rows is None:
            return None
        per = self._per_row(t)
        key = (self._rows, name, per, t.device)
        idx = None if torch.compiler.is_compiling() else _SELECTED.get(key)
        if idx is None:
            picked = [i * per + j for i, a in enumerate(self._rows) if a == name for j in range(per)]
            contiguous = picked == list(range(picked[0], picked[0] + len(picked))) if picked else False
            idx = slice(picked[0], picked[-1] + 1) if contiguous else torch.tensor(
                picked, dtype=torch.long, device=t.device)
            if not torch.compiler.is_compiling():
                if len(_SELECTED) > 64:
                    _SELECTED.clear()
                _SELECTED[key] = idx
        return idx

    def _rescale(self, out: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor:
        """DoRA: the base output ``out = op(x, W0) + bias`` scaled by ``c`` along its output units
        (``dim``), as ``out + (c - 1) * (out - bias)``, which is ``out`` exactly where ``c`` is 1
        (at init); ``out`` itself without DoRA."""
        extra = self._rescaling(out, bias, dim)
        return out if extra is None else out + extra.to(out.dtype)

    def _rescaling(self, out: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor | None:
        """``(c - 1) * (out - bias)`` (see :meth:`rescale`), or None without DoRA."""
        if not self._has_dora():
            return None
        c, k = self._scales()
        shape = [1] * out.dim()
        shape[dim] = -1
        if c is not None:
            c1 = (c - 1).view(shape)
        else:  # per sample: the gain of each sample's own DoRA adapter
            c1 = sum(self._mask(t.name, out).to(g.dtype) * (g - 1).view(shape)
                     for t, g in zip(self._terms, k) if g is not None)
        if bias is not None and bias.dim() == 1:
            bias = bias.view(shape)
        return (out if bias is None else out - bias).to(c1.dtype) * c1

    def _factors(self):
        """Yield ``(L, R, s, p, name)`` per term: the stored update is ``s * L @ R``.

        For a rows layout that is ``B @ A``; for a transposed one ``A.T @ B.T``. With DoRA, ``B``
        is scaled per output unit by ``k`` (see :meth:`scales`)."""
        k = self._scales()[1] if self._has_dora() else [None] * len(self._terms)
        for term, ki in zip(self._terms, k):
            B = term.B if ki is None else term.B * ki.unsqueeze(-1).to(term.B.dtype)  # (out, r)
            L, R = self._view.stored_factors(term.A, B)
            yield L, R, term.scaling, term.dropout, term.name

    # -- dispatch ----------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.detach:  # a plain tensor of the value; nn.Parameter(weight) needs its own type
            w = args[0]
            return w._detached() if _making_parameter() else w._w0.detach() if w._leaf else w._plain()
        if func is Tensor.__deepcopy__ and not args[0]._leaf:  # a copy of the value, as of a dense weight
            with torch._C.DisableTorchFunctionSubclass():
                grad = REQUIRES_GRAD(args[0]) or args[0]._needs_grad()
            out = args[1][id(args[0])] = args[0]._plain().clone().requires_grad_(grad)
            return out
        if func in HOST and args[0]._leaf:  # what reads a leaf's memory or pickles it: its dense tensor
            out = getattr(args[0]._plain(), func.__name__)(*args[1:], **kwargs)  # nn.Parameter's own, if one
            if func is Tensor.__deepcopy__:
                args[1][id(args[0])] = out
            return out
        leaves = []
        tree_map_only(FactoredWeight, lambda w: leaves.append(w) if w._leaf else None, (args, kwargs))
        if leaves:  # a leaf: the op runs on it, and autograd records it (its value comes in dispatch)
            args, kwargs = tree_map_only(FactoredWeight, lambda w: w if w._leaf else w._merged(), (args, kwargs))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        op = OPS.get(func)
        if op is not None:
            out = op.compute(args, kwargs)
            if out is not NotImplemented:
                return out
        elif func in OWN:  # the wrapper's own metadata: W0's
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        elif func == REQUIRES_GRAD:  # its own flag (a Parameter made of it), or its value's
            with torch._C.DisableTorchFunctionSubclass():
                return func(args[0]) or args[0]._needs_grad()
        args, kwargs = tree_map_only(FactoredWeight, FactoredWeight._merged, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default:
            return args[0]._detached()
        found = []
        tree_map_only(FactoredWeight, found.append, (args, kwargs))
        if torch.is_grad_enabled() and any(w._needs_grad() for w in found):
            raise RuntimeError(
                f"lora_inject: the op {func} reached an adapted weight below autograd, where its gradient "
                "could not reach the LoRA factors. Call it through torch's Python API, under torch.no_grad(), "
                "or merge the adapters first with lora_inject.remove(model).")
        args, kwargs = tree_map_only(FactoredWeight, _value, (args, kwargs))
        return func(*args, **kwargs)


def _value(w: FactoredWeight) -> Tensor:
    """The plain tensor an op below autograd gets: a leaf's own value (in-place ops write it), or
    the merged weight."""
    return w._w0 if w._leaf else w._merged()


_SELECTED: dict[tuple, Tensor] = {}  # (rows, name, rows per sample, device) -> indices, for per_sample()


def gather(t: Tensor, idx: Tensor | slice) -> Tensor:
    """The rows ``idx`` of ``t`` (dim 0): a view for a slice."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def some(idx: Tensor | slice) -> bool:
    return idx.stop > idx.start if isinstance(idx, slice) else bool(idx.numel())


def scatter(out: Tensor, idx: Tensor | slice, extra: Tensor, s) -> Tensor:
    """``out`` with ``s * extra`` added to its rows ``idx`` (dim 0), in ``out``'s dtype: in place
    where nothing is differentiated (``out`` is always a fresh result of the op), so that
    each adapter's rows cost no copy of the whole output."""
    if isinstance(s, Tensor):
        extra, s = extra * s, 1
    extra = extra.to(out.dtype)
    if isinstance(idx, slice):
        if in_place(out, extra):
            out[idx].add_(extra, alpha=s)
            return out
        pad = [0, 0] * (out.dim() - 1) + [idx.start, out.shape[0] - idx.stop]
        return out + F.pad(extra * s if s != 1 else extra, pad)
    return (out.index_add_ if in_place(out, extra) else out.index_add)(0, idx, extra, alpha=s)


def in_place(out: Tensor, extra: Tensor) -> bool:
    """Whether ``out`` (a fresh result of the op) may be written in place: nothing differentiated, eager."""
    return not (torch.is_grad_enabled() and (out.requires_grad or extra.requires_grad)) \
        and not torch.compiler.is_compiling()


def merge(w0: Tensor, terms, view: View) -> Tensor:
    """``W0`` with ``terms`` applied, in ``W0``'s shape and dtype: summed in float32 (or wider, as
    the factors are) and cast back once, with gradients to every tensor.

    Without DoRA the sum is built in the stored layout, ``W0 + s * L @ R``, with no view of the
    result on the way back: a sparse gradient (``Embedding(sparse=True)``) then reaches the factors.
    """
    w0 = quant.dense(w0)  # a quantized W0 merges from its dense value
    if not terms:  # a fresh tensor all the same: a layer that writes its weight must not write W0
        return w0.clone()
    ct = compute_dtype(w0.dtype, *(t.A.dtype for t in terms))
    if any(t.magnitude is not None for t in terms):
        return view.stored(dora.merged(view.rows(w0), terms, ct)).to(w0.dtype)
    total = w0.to(ct)
    for t in terms:
        L, R = view.stored_factors(t.A, t.B)  # stored update = s * L @ R
        update = torch.matmul(L.to(ct), R.to(ct)) * t.scaling  # (.., rows, r) @ (.., r, cols)
        total = total + (update if update.dim() == total.dim() else update.reshape(total.shape))
    return total.to(w0.dtype)


# Ops of PyTorch's OpInfo database that an adapted weight refuses, as (name, reason), each with an
# error that names lora_inject (tests/test_opinfo.py holds every other op on a float matrix to the
# merged weight's result, in value and gradient). None is refused today: an op outside the table
# gets the merged weight above autograd, and one that reaches __torch_dispatch__ with a gradient to
# compute raises there.
REFUSED: tuple[tuple[str, str], ...] = ()

REQUIRES_GRAD = Tensor.requires_grad.__get__
# What a leaf hands to its dense tensor (see FactoredWeight._plain): numpy() and tolist() (which refuse
# subclasses), its memory (safetensors reads data_ptr), copying it and pickling it (torch.save, which
# then loads with weights_only=True as a plain tensor or nn.Parameter).
HOST = {Tensor.numpy, Tensor.tolist, Tensor.__deepcopy__, Tensor.__reduce_ex__, Tensor.data_ptr,
        Tensor.untyped_storage, Tensor.__array__}
_PARAMETER_NEW = torch.nn.Parameter.__new__.__code__


def _making_parameter() -> bool:
    """Whether ``nn.Parameter(weight)`` asks for this ``detach()``: it wants a tensor of the type it
    was given, and marks that as the Parameter (a plain tensor would make it refuse)."""
    if torch.compiler.is_compiling():
        return False
    frame = sys._getframe(2)
    return frame is not None and frame.f_code is _PARAMETER_NEW
OWN = {
    *(getattr(Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "layout", "is_cpu", "is_cuda", "is_meta", "is_mkldnn", "is_nested",
        "is_quantized", "is_sparse", "is_sparse_csr", "itemsize", "nbytes")),
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.stride, Tensor.storage_offset,
    Tensor.element_size,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.is_contiguous, Tensor.requires_grad_, Tensor.__hash__,
}


# -- the op table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """A factored form: ``compute(args, kwargs)`` gives the op's result, or NotImplemented where
    the arguments do not fit (the weight is then merged)."""

    compute: Callable


OPS: dict[Callable, Op] = {}


def implements(*funcs: Callable, names: tuple[str, ...], defaults: tuple = ()):
    """Register a factored form for ``funcs``, called with their arguments bound to ``names``
    (the last ``len(defaults)`` of them optional)."""
    def register(form: Callable) -> Callable:
        def compute(args, kwargs):
            if kwargs or len(args) != len(names):
                args = bind(names, defaults, args, kwargs)
            return form(*args)

        for f in funcs:
            OPS[f] = Op(compute)
        return form
    return register


def bind(names: tuple[str, ...], defaults: tuple, args, kwargs) -> list:
    """``args`` and ``kwargs`` as one positional list over ``names``, defaults filled in."""
    optional = len(names) - len(defaults)
    values = list(args) + list(defaults[max(len(args) - optional, 0):])
    if len(values) < len(names):  # a required argument given by keyword
        values = list(args) + [None] * (optional - len(args)) + list(defaults)
    for k, v in kwargs.items():
        values[names.index(k)] = v
    return values


def fits(weight, x, out_dim: int, quantized: bool = False) -> bool:
    """Whether ``weight`` is ours, 2-D and not an input too, DoRA (if any) scales ``out_dim``, and its
    ``W0`` is dense unless the op takes a quantized one (``quantized``: F.linear, which the backend
    dispatches, except for weights read only by their module's own forward)."""
    return (type(weight) is FactoredWeight and type(x) is not FactoredWeight and not weight._view.experts
            and (not weight._has_dora() or weight._view.out_dim == out_dim)
            and ((s := quant.scheme(weight._w0)) is None or quantized and not s.own_forward))


def plain_eager() -> bool:
    """Whether the fused kernel may run: eager mode, no torch.func transform, no forward AD."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or forward_ad._current_level >= 0)


def one_plain_term(weight: FactoredWeight, x: Tensor):
    """``(L, R, s)`` when ``weight`` has one term, no DoRA, no dropout at work, no per-sample rows,
    in plain eager mode: the case :class:`_LowRank` computes; else None."""
    if weight._rows is not None or len(weight._terms) != 1 or x.dim() < 1:
        return None
    term = weight._terms[0]
    if term.dropout or term.magnitude is not None or not plain_eager():
        return None
    L, R = weight._view.stored_factors(term.A, term.B)
    return L, R, term.scaling


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) and x.is_floating_point() else None


def fused(x: Tensor, W: Tensor, bias: Tensor | None, first: Tensor, second: Tensor, s: float) -> Tensor | None:
    """``bias + x @ W + s * (x @ first) @ second`` with :class:`_LowRank`, in one dtype (autocast's
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
        out = _LowRank.apply(x2, W, bias, first, second, s)
    else:  # nothing to differentiate: the same sums, without an autograd node
        out = torch.addmm(bias, x2, W) if bias is not None else x2 @ W  # (N, in) @ (in, out)
        out.addmm_(x2 @ first, second, alpha=s)  # += s * (N, r) @ (r, out)
    return out.view(*x.shape[:-1], W.shape[-1])


FUSED_MIN = 1 << 16  # elements of the input from which the fused kernel pays for its Python backward


def add(out: Tensor, extra: Tensor, s: float = 1.0) -> Tensor:
    """``out + s * extra`` in ``out``'s dtype: one op where the dtypes agree."""
    if isinstance(s, Tensor):  # compiled: a 0-d tensor, which `alpha=` does not take
        return out + (extra * s).to(out.dtype)
    if extra.dtype == out.dtype:
        return torch.add(out, extra, alpha=s)
    return out + (extra * s if s != 1.0 else extra).to(out.dtype)


def branch(x: Tensor, weight: FactoredWeight, out: Tensor, transposed: bool) -> Tensor:
    """``out + x @ ΔW.T`` (``transposed``, as in F.linear) or ``out + x @ ΔW``, factored."""
    for L, R, s, p, name in weight._factors():
        first, second = (R.t(), L.t()) if transposed else (L, R)  # x @ (s L R).T = s (x R.T) L.T
        idx = weight._select(name, x)
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
                              alpha=s).view(out.shape)
        else:
            out = add(out, h @ second, s)  # (.., r) @ (r, out)
    return out


def frozen_linear(x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, w0, bias)`` for a frozen quantized ``w0``, with the backend's own kernel.

    In plain eager mode with a gradient to compute, :class:`_Frozen` keeps the backend from saving
    a dequantized ``w0`` for backward: ``x``'s gradient dequantizes it again and lets it go, as
    QLoRA does."""
    if not (torch.is_grad_enabled() and plain_eager() and (x.requires_grad or (
            bias is not None and bias.requires_grad))):
        return F.linear(x, w0, bias)
    return _Frozen.apply(x, bias, (w0,))


class _Frozen(torch.autograd.Function):
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


@implements(F.linear, names=("input", "weight", "bias"), defaults=(None,))
def linear(input, weight, bias):
    if not fits(weight, input, 0, quantized=True):
        return NotImplemented
    if weight._rows is not None and input.dim() == 1:  # per_sample(): an unbatched input is one sample
        return linear(input.unsqueeze(0), weight, bias).squeeze(0)
    if quant.scheme(weight._w0) is not None:  # the backend's kernel, and the branch beside it
        return beside(input, weight, frozen_linear(input, weight._w0, bias), bias)
    plain = one_plain_term(weight, input)
    if plain is not None:  # x @ W0.T + s * (x @ R.T) @ L.T
        L, R, s = plain
        out = fused(input, weight._w0.t(), bias, R.t(), L.t(), s)
        if out is not None:
            return out
    return beside(input, weight, F.linear(input, weight._w0, bias), bias)


def beside(x: Tensor, weight: FactoredWeight, base: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` from the base output ``base = F.linear(x, W0, bias)``,
    however it was computed: DoRA's rescaling, then the low-rank branch."""
    return branch(x, weight, weight._rescale(base, bias), transposed=True)


@implements(torch.addmm, Tensor.addmm, names=("input", "mat1", "mat2", "beta", "alpha", "out"),
            defaults=(1, 1, None))
def addmm(input, mat1, mat2, beta, alpha, out):
    if out is not None or beta != 1 or alpha != 1 or not fits(mat2, mat1, 1) or type(input) is FactoredWeight:
        return NotImplemented
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
    base = F.embedding(input, weight._w0, padding_idx, None, norm_type, False, sparse)
    out = weight._rescaling(base)  # DoRA: (c - 1) * base
    for L, R, s, p, name in weight._factors():
        idx = weight._select(name, input)
        if idx is not None:  # per_sample(): this adapter's samples only
            out = torch.zeros_like(base) if out is None else out
            if some(idx):
                h = F.embedding(gather(input, idx), L, padding_idx)
                out = scatter(out, idx, (F.dropout(h, p) if p else h) @ R, s)
            continue
        h = F.embedding(input, L, padding_idx)  # (.., r)
        extra = (F.dropout(h, p) if p else h) @ R * s  # (.., r) @ (r, dim) -> (.., dim)
        out = extra if out is None else out + extra.to(out.dtype)
    if padding_idx is not None:  # as for the merged weight, the padding row gets no gradient
        out = _NoGradAt.apply(out, (input == padding_idx % weight._w0.shape[0]).unsqueeze(-1))
    return add(base, out)


class _NoGradAt(torch.autograd.Function):
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


@implements(F.embedding_bag, names=(
    "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
    "per_sample_weights", "include_last_offset", "padding_idx"),
    defaults=(None, None, 2, False, "mean", False, None, False, None))
def embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                  per_sample_weights, include_last_offset, padding_idx):
    if max_norm is not None or mode == "max" or scale_grad_by_freq or not fits(weight, input, 1):
        return NotImplemented
    rest = dict(offsets=offsets, mode=mode, per_sample_weights=per_sample_weights,
                include_last_offset=include_last_offset, padding_idx=padding_idx)
    out = weight._rescale(F.embedding_bag(input, weight._w0, sparse=sparse, **rest))
    for L, R, s, p, name in weight._factors():
        idx = weight._select(name, input) if offsets is None and input.dim() == 2 else None
        if idx is not None:  # per_sample(), one bag per row: this adapter's bags only
            if some(idx):
                sub = dict(rest, per_sample_weights=None if per_sample_weights is None
                           else gather(per_sample_weights, idx))
                h = F.embedding_bag(gather(input, idx), L, **sub)
                out = scatter(out, idx, (F.dropout(h, p) if p else h) @ R, s)
            continue
        h = weight._keep(F.embedding_bag(input, L, **rest), name)  # (bags, r); bags by offsets: masked
        out = add(out, (F.dropout(h, p) if p else h) @ R, s)
    return out


def conv_form(op: Callable) -> Callable:
    def conv(input, weight, bias, stride, padding, dilation, groups):
        if groups != 1 or not fits(weight, input, 0) or weight._view.transpose:
            return NotImplemented
        shape = weight._w0.shape
        if weight._rows is not None and input.dim() == len(shape) - 1:  # per_sample(): unbatched, one sample
            return conv(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
        kernel, ones = shape[2:], (1,) * (len(shape) - 2)
        out = op(input, weight._w0, bias, stride, padding, dilation, groups)
        out = weight._rescale(out, bias, dim=-len(kernel) - 1)  # the channel dim
        for L, R, s, p, name in weight._factors():
            idx = weight._select(name, input) if input.dim() == len(shape) else None
            if idx is not None and not some(idx):
                continue
            x = (input if idx is None else gather(input, idx)).to(R.dtype)
            h = op(F.dropout(x, p) if p else x, R.view(-1, shape[1], *kernel), None,
                   stride, padding, dilation)  # r output channels
            if idx is None:
                h = weight._keep(h, name)  # per_sample() on an unbatched input: masked
            y = op(h, L.reshape(*L.shape, *ones))  # 1x1 conv: r -> out
            out = add(out, y, s) if idx is None else scatter(out, idx, y, s)
        return out

    return conv


for _op in (F.conv1d, F.conv2d, F.conv3d):
    implements(_op, names=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
               defaults=(None, 1, 0, 1, 1))(conv_form(_op))
