r"""The adapted weight as a value: ``W0`` plus low-rank terms, kept factored where an op allows it.

``LoRA.forward`` returns a :class:`FactoredWeight` for layers whose rule is factored. It is a
wrapper tensor with no storage of its own: it holds ``W0`` and one :class:`Term` per active
adapter (its factors, scaling, dropout and DoRA magnitude), and nothing else. The layer's own
forward runs unchanged:

* an op with an entry in :data:`OPS` runs that entry: a factored form (see :mod:`lora_inject._ops`)
  computes ``op(x, W0) + s * op'(op''(x, A), B)``, so no weight-sized update is built, saved for
  backward or differentiated; the value's own entries (below) answer its metadata, ``detach()``
  and what reads its memory;
* every other op, and a table op whose arguments do not fit (another orientation under DoRA, a
  grouped conv, ``max_norm``...), gets the merged weight ``W0 + s * B @ A``, computed above
  autograd so that gradients reach the factors;
* anything that reaches ``__torch_dispatch__`` (below autograd) gets the merged value where no
  gradient is wanted, and an error that names lora_inject where one is: it never computes with
  ``W0`` alone.

Both dispatchers are a lookup in :data:`OPS`, keyed by torch functions and by aten ops as
torchao's tables are, and one fallback. :func:`implements` registers an entry.

A quantized ``W0`` (see :mod:`lora_inject._quant`) stays quantized: ``F.linear`` runs the backend's
kernel on it (:func:`lora_inject._kernels.frozen_linear`), other ops get the merged weight from its
dense value, and a weight only its module's forward can read (bitsandbytes') is never given to an
op by us. Inside :func:`lora_inject.per_sample` each term runs on its own samples' rows only
(see :mod:`lora_inject._rows`). Under ``torch.compile`` a term's scaling is a 0-d tensor, so that
changing it recompiles nothing.

Autocast, ``torch.func`` transforms, forward-mode AD and ``torch.compile`` run the same composable
ops; the one fused kernel (one plain adapter, see :class:`lora_inject._kernels.LowRank`) runs in
plain eager mode on inputs of 64k elements or more (on smaller ones its Python backward costs more
than it saves), and under autocast on inputs cast as autocast casts them. With nothing to
differentiate, the same sums run without an autograd node.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from . import _dora as dora
from . import _quant as quant
from ._rows import Slots, enabled, mask, one_weight
from ._view import View, compute_dtype
from .kind import find_kind

aten = torch.ops.aten


class Term(NamedTuple):
    """One active adapter's part of the weight: ``scaling * B @ A`` in the matrix view."""

    A: Tensor  # (r, in); with PiSSA/OLoRA's frozen factors appended along r
    B: Tensor  # (out, r)
    scaling: float | Tensor  # a 0-d tensor under torch.compile (see LoRA.terms)
    dropout: float = 0.0  # the probability at work: 0 in eval mode
    magnitude: Tensor | None = None  # DoRA's m, (out,); (in,) for axis "in"
    name: str = ""
    axis: str = "out"  # DoRA's norm per output unit ("out", as peft) or per input unit ("in", LyCORIS')

    def _detached(self) -> Term:
        m = None if self.magnitude is None else self.magnitude.detach()
        return self._replace(A=self.A.detach(), B=self.B.detach(), magnitude=m)


class Step(NamedTuple):
    """One active adapter of a kind other than LoRA (see :mod:`lora_inject.kind`): the name its
    kind is registered under (a string, which ``torch.compile`` can put in a graph; a
    :class:`~lora_inject.kind.Kind` holds functions), its tensors by name, its scaling and its
    options, as :func:`lora_inject.kind.merged` applies it."""

    kind: str
    params: dict[str, Tensor]
    scaling: float
    options: Mapping[str, Any]
    name: str = ""
    strength: float = 1.0  # a multiplicative kind's: W <- W + strength * (apply(W) - W); else in scaling


class FactoredWeight(Tensor):
    """``W0 + sum_i s_i * view(B_i @ A_i)`` (DoRA: see :mod:`lora_inject._dora`), kept factored.

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
    _terms: tuple[Term | Step, ...]  # one per active adapter, in order
    _kinds: bool  # whether a term is a Step (a kind other than LoRA)
    _dora: bool  # whether a term has DoRA's magnitude
    _across: bool  # whether a DoRA term takes its norm per input unit: no op's output carries its gain
    _scheme: object  # W0's quantization scheme (lora_inject.quant), or None
    _view: View
    _rows: tuple[str | None, ...] | None
    _leaf: bool
    _owner: object  # the LoRA that made it, or None
    _simple: bool  # its terms are plain LoRA (no DoRA) in W0's dtype, W0 is dense, no rows: see _ops.plain_form

    @staticmethod
    def __new__(cls, w0: Tensor, terms, view: View, rows=None, owner=None):
        scheme = quant.scheme(w0)
        if scheme is None:
            shape, strides, dtype = w0.shape, w0.stride(), w0.dtype
        else:  # a quantized W0 reads as the dense weight it stands for
            shape, dtype = quant.shape(w0), quant.dtype(w0)
            strides = torch.empty(shape, device="meta").stride()
        out = Tensor._make_wrapper_subclass(cls, shape, strides=strides, dtype=dtype,
                                            device=w0.device, requires_grad=False)
        # A LoRA term's branch runs in the wider of W0's dtype and the factors': half factors on a
        # float32 base are upcast (as peft upcasts them), float32 factors on a half base stay float32.
        terms = list(terms)
        kinds = dora = across = mixed = False
        for i, t in enumerate(terms):  # a loop, not comprehensions: this runs on every forward
            if type(t) is Step:
                kinds = True
                continue
            if t.magnitude is not None:
                dora, across = True, across or t.axis != "out"
            if not t.A.dtype == t.B.dtype == dtype:
                a, b = torch.promote_types(dtype, t.A.dtype), torch.promote_types(dtype, t.B.dtype)
                if not t.A.dtype == t.B.dtype == a:
                    terms[i] = t = t._replace(A=t.A.to(a), B=t.B.to(b))
                mixed = mixed or not t.A.dtype == t.B.dtype == dtype
        simple = bool(terms) and not (kinds or dora or mixed or view.experts) and rows is None and scheme is None
        out.__dict__.update(_w0=w0, _terms=tuple(terms), _view=view, _rows=rows, _gains=None, _kinds=kinds,
                            _dora=dora, _across=across, _scheme=scheme, _leaf=False, _simple=simple,
                            _owner=owner)  # owner: see LoRA.right_inverse
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"FactoredWeight({self._merged()!r}, adapters={[t.name for t in self._terms]})"

    # -- compile: the inner tensors and the rest -------------------------------------------------
    def __tensor_flatten__(self):
        # Literal attribute names, as torchao's tensor_data_names: ``_w0``, then ``_A<i>``,
        # ``_B<i>``, ``_m<i>`` (DoRA) and ``_s<i>`` (a 0-d scaling) for each LoRA term, and
        # ``_p<i>_<tensor>`` for each tensor of a kind's step. They are set here, where compile
        # asks for them, and cost nothing per forward.
        inner = {"_w0": self._w0}
        meta = []
        for i, t in enumerate(self._terms):
            if type(t) is Step:
                inner.update({f"_p{i}_{k}": v for k, v in t.params.items()})
                meta.append(("step", t.kind, tuple(t.params), t.scaling, tuple(t.options.items()), t.name,
                             t.strength))
                continue
            inner[f"_A{i}"], inner[f"_B{i}"] = t.A, t.B
            if t.magnitude is not None:
                inner[f"_m{i}"] = t.magnitude
            if isinstance(t.scaling, Tensor):
                inner[f"_s{i}"] = t.scaling
            meta.append((None if isinstance(t.scaling, Tensor) else t.scaling, t.dropout, t.name,
                         None if t.magnitude is None else t.axis))
        self.__dict__.update(inner)
        return list(inner), (self._view, self._rows, tuple(meta), self._owner)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        view, rows, meta, owner = ctx
        terms = []
        for i, m in enumerate(meta):
            if m[0] == "step":
                _, kind, keys, s, options, name, strength = m
                terms.append(Step(kind, {k: inner[f"_p{i}_{k}"] for k in keys}, s, dict(options), name, strength))
                continue
            s, p, name, axis = m
            terms.append(Term(inner[f"_A{i}"], inner[f"_B{i}"], inner[f"_s{i}"] if s is None else s, p,
                              None if axis is None else inner[f"_m{i}"], name, axis or "out"))
        return FactoredWeight(inner["_w0"], terms, view, rows, owner)

    def __getattr__(self, name: str):  # a quantized W0's own state (bitsandbytes' quant_state, CB, SCB)
        if not name.startswith("_") and quant.scheme(self._w0) is not None:
            return getattr(self._w0, name)
        raise AttributeError(name)

    # -- the value ---------------------------------------------------------------------------
    def _merged(self) -> Tensor:
        """The weight as a plain tensor (see :func:`merge`)."""
        rows = self._rows
        if type(rows) is Slots:
            # Compiled, the rows as data: the active adapters' weight where the call leaves them on,
            # else W0; a call whose rows choose one of the tensor's adapters is refused at run time.
            w0, first = quant.dense(self._w0), self._terms[:rows.first]
            whole = ",".join(n for n in (*rows.names, *rows.dora.split(",")) if n)
            on = enabled(w0, rows.key, rows.dora, whole)
            return torch.where(on, merge(self._w0, first, self._view) if first else w0, w0)
        if rows is not None:
            raise one_weight(self.shape)
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
        return [self._w0] + [x for t in self._terms
                             for x in (t.params.values() if type(t) is Step else (t.A, t.B, t.magnitude))
                             if x is not None]

    def _has_dora(self) -> bool:
        return self._dora

    def _scales(self) -> tuple[Tensor | None, list[Tensor | None]]:
        """DoRA's ``(c, k)`` (see :func:`lora_inject._dora.scales`), computed on first use.

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

    def _rescale(self, out: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor:
        """DoRA: the base output ``out = op(x, W0) + bias`` scaled by ``c`` along its output units
        (``dim``), as ``out + (c - 1) * (out - bias)``, which is ``out`` exactly where ``c`` is 1
        (at init); ``out`` itself without DoRA."""
        if not self._dora:
            return out
        extra = self._rescaling(out, bias, dim)
        return out + extra.to(out.dtype)

    def _rescaling(self, out: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor | None:
        """``(c - 1) * (out - bias)`` (see :meth:`rescale`), or None without DoRA."""
        if not self._dora:
            return None
        c, k = self._scales()
        shape = [1] * out.dim()
        shape[dim] = -1
        if c is not None:
            c1 = (c - 1).view(shape)
        else:  # per sample: the gain of each sample's own DoRA adapter
            c1 = sum(mask(self._rows, t.name, out).to(g.dtype) * (g - 1).view(shape)
                     for t, g in zip(self._terms, k) if g is not None)
        if bias is not None and bias.dim() == 1:
            bias = bias.view(shape)
        return (out if bias is None else out - bias).to(c1.dtype) * c1

    def _factors(self) -> list[tuple]:
        """``(L, R, s, p, name)`` per term: the stored update is ``s * L @ R``.

        For a rows layout that is ``B @ A``; for a transposed one ``A.T @ B.T``. With DoRA, ``B``
        is scaled per output unit by ``k`` (see :meth:`scales`)."""
        if not self._dora:
            transpose = self._view.transpose
            return [(t.A.mT, t.B.mT, t.scaling, t.dropout, t.name) if transpose else
                    (t.B, t.A, t.scaling, t.dropout, t.name) for t in self._terms]
        out = []
        for term, ki in zip(self._terms, self._scales()[1]):
            B = term.B if ki is None else term.B * ki.unsqueeze(-1).to(term.B.dtype)  # (out, r)
            L, R = self._view.stored_factors(term.A, B)
            out.append((L, R, term.scaling, term.dropout, term.name))
        return out

    # -- dispatch: a lookup in the table, and one fallback ---------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = OPS.get(func)
        if entry is not None:
            out = entry(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return _on_values(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = OPS.get(func)
        if entry is not None:
            return entry(func, args, kwargs)
        found = []
        tree_map_only(FactoredWeight, found.append, (args, kwargs))
        if torch.is_grad_enabled() and any(w._needs_grad() for w in found):
            raise RuntimeError(
                f"lora_inject: the op {func} reached an adapted weight below autograd, where its gradient "
                "could not reach the LoRA factors. Call it through torch's Python API, under torch.no_grad(), "
                "or merge the adapters first with lora_inject.remove(model).")
        args, kwargs = tree_map_only(FactoredWeight, _value, (args, kwargs))
        return func(*args, **kwargs)


def _on_values(func, args, kwargs):
    """``func`` above autograd with each adapted weight's merged value. A leaf stays itself: the
    op runs on it, and autograd records it (its value comes in ``__torch_dispatch__``)."""
    leaves = []

    def value(w: FactoredWeight):
        if w._leaf:
            leaves.append(w)
            return w
        return w._merged()

    args, kwargs = tree_map_only(FactoredWeight, value, (args, kwargs))
    if leaves:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return func(*args, **kwargs)


def _value(w: FactoredWeight) -> Tensor:
    """The plain tensor an op below autograd gets: a leaf's own value (in-place ops write it), or
    the merged weight."""
    return w._w0 if w._leaf else w._merged()


def refuse_lora_dropout(terms, why: str) -> None:
    """Raise for a training forward where a LoRA term among ``terms`` has its dropout at work but
    the op takes the merged weight of the stack, for the reason ``why``: the dropout acts on the
    input of the LoRA branch, which a merged weight has not.

    Raises:
        RuntimeError: naming the first such adapter and the kinds beside it.
    """
    for t in terms:
        if type(t) is Term and t.dropout:
            kinds = sorted({s.kind for s in terms if type(s) is Step})
            raise RuntimeError(
                f"lora_inject: LoRA adapter {t.name!r}'s dropout ({t.dropout}) cannot act in this training forward: "
                f"with the adapters of kind {kinds} on the same tensor, {why}, and LoRA's dropout acts on the "
                "input of its branch only. Inject the LoRA adapter with dropout=0, or train the adapters one at a "
                "time (li.activate).")


def merge(w0: Tensor, terms, view: View) -> Tensor:
    """``W0`` with ``terms`` applied, in ``W0``'s shape and dtype: summed in float32 (or wider, as
    the factors are) and cast back once, with gradients to every tensor.

    Without DoRA the sum is built in the stored layout, ``W0 + s * L @ R``, with no view of the
    result on the way back: a sparse gradient (``Embedding(sparse=True)``) then reaches the factors.
    """
    w0 = quant.dense(w0)  # a quantized W0 merges from its dense value
    if not terms:  # a fresh tensor all the same: a layer that writes its weight must not write W0
        return w0.clone()
    if any(type(t) is Step for t in terms):
        return composed(w0, terms, view)
    ct = compute_dtype(w0.dtype, *(t.A.dtype for t in terms))
    if any(t.magnitude is not None for t in terms):
        return view.stored(dora.merged(view.rows(w0), terms, ct)).to(w0.dtype)
    total = w0.to(ct)
    for t in terms:
        L, R = view.stored_factors(t.A, t.B)  # stored update = s * L @ R
        update = torch.matmul(L.to(ct), R.to(ct)) * t.scaling  # (.., rows, r) @ (.., r, cols)
        total = total + (update if update.dim() == total.dim() else update.reshape(total.shape))
    return total.to(w0.dtype)


def toward(before: Tensor, after: Tensor, strength: float) -> Tensor:
    """``before + strength * (after - before)``: how far a multiplicative kind at ``strength``
    moves a tensor towards what it makes of it (``after`` itself at full strength)."""
    return after if strength == 1 else torch.lerp(before, after, strength)


def composed(w0: Tensor, terms, view: View) -> Tensor:
    """``W0`` with ``terms`` applied in order, LoRA terms and kinds' steps alike (a LoRA term as an
    additive step, DoRA on the weight so far, a kind through its ``delta`` or ``apply``), in the
    ``(.., out, in)`` view, summed in float32 (or wider) and cast back once, in ``W0``'s layout."""
    w0 = quant.dense(w0)
    ct = compute_dtype(w0.dtype, *(x.dtype for t in terms
                                   for x in (t.params.values() if type(t) is Step else (t.A, t.B))))
    M = view.rows(w0).to(ct)
    for t in terms:
        if type(t) is Term:
            if t.magnitude is not None:
                M = dora.merged(M, [t], ct)
            else:
                M = M + torch.matmul(t.B.to(ct), t.A.to(ct)) * t.scaling
            continue
        params, kind = {k: v.to(ct) for k, v in t.params.items()}, find_kind(t.kind)
        if kind.additive:
            M = M + kind.delta(params, view, t.scaling, t.options)
        else:
            M = toward(M, kind.apply(M, params, view, t.scaling, t.options), t.strength)
    # In W0's own layout, so that the layer runs the kernels it runs on W0 (a transposed view's
    # product would come back strided otherwise).
    return view.stored(M).to(w0.dtype).contiguous()


# On the bias a layer's op receives where a kind adapts it too (IA³, see Kind.apply_bias): the bias
# before the adapters, set by the bias's parametrization (lora_inject.lora.Bias), so that the
# factored forms start from it and adapt it as they adapt the weight.
RAW_BIAS = "_lora_inject_raw_bias"


# Ops of PyTorch's OpInfo database that an adapted weight refuses, as (name, reason), each with an
# error that names lora_inject (tests/test_opinfo.py holds every other op on a float matrix to the
# merged weight's result, in value and gradient). None is refused today: an op outside the table
# gets the merged weight above autograd, and one that reaches __torch_dispatch__ with a gradient to
# compute raises there.
REFUSED: tuple[tuple[str, str], ...] = ()


# -- the table -------------------------------------------------------------------------------
OPS: dict[Callable, Callable] = {}  # a torch function or an aten op -> entry(func, args, kwargs)


def implements(*funcs: Callable, names: tuple[str, ...] | None = None, defaults: tuple = ()):
    """Register the decorated function as the entry of each of ``funcs`` in :data:`OPS`.

    With ``names`` it is called with the op's arguments bound to them, positionally (the last
    ``len(defaults)`` of them optional); without, as ``entry(func, args, kwargs)``. It returns the
    op's result, or NotImplemented where the arguments do not fit: the op then gets the merged
    weight (above autograd; an entry of an aten op always returns a result)."""
    def register(form: Callable) -> Callable:
        entry = form if names is None else _bound(form, names, defaults)
        for f in funcs:
            OPS[f] = entry
        return form
    return register


def _bound(form: Callable, names: tuple[str, ...], defaults: tuple) -> Callable:
    def entry(func, args, kwargs):
        if kwargs or len(args) != len(names):
            args = bind(names, defaults, args, kwargs)
        return form(*args)
    return entry


def bind(names: tuple[str, ...], defaults: tuple, args, kwargs) -> list:
    """``args`` and ``kwargs`` as one positional list over ``names``, defaults filled in."""
    optional = len(names) - len(defaults)
    values = list(args) + list(defaults[max(len(args) - optional, 0):])
    if len(values) < len(names):  # a required argument given by keyword
        values = list(args) + [None] * (optional - len(args)) + list(defaults)
    for k, v in kwargs.items():
        values[names.index(k)] = v
    return values


# -- the value's own entries -----------------------------------------------------------------
REQUIRES_GRAD = Tensor.requires_grad.__get__
# What a leaf hands to its dense tensor (see FactoredWeight._plain): numpy() and tolist() (which refuse
# subclasses), its memory (safetensors reads data_ptr), copying it and pickling it (torch.save, which
# then loads with weights_only=True as a plain tensor or nn.Parameter).
HOST = (Tensor.numpy, Tensor.tolist, Tensor.__reduce_ex__, Tensor.data_ptr, Tensor.untyped_storage,
        Tensor.__array__)
# The wrapper's own metadata: W0's.
OWN = (
    *(getattr(Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "layout", "is_cpu", "is_cuda", "is_meta", "is_mkldnn", "is_nested",
        "is_quantized", "is_sparse", "is_sparse_csr", "itemsize", "nbytes")),
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.stride, Tensor.storage_offset,
    Tensor.element_size,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.is_contiguous, Tensor.requires_grad_, Tensor.__hash__,
)
_PARAMETER_NEW = torch.nn.Parameter.__new__.__code__


@implements(Tensor.detach)
def detach(func, args, kwargs):
    """A plain tensor of the value; ``nn.Parameter(weight)`` needs its own type (a leaf)."""
    w = args[0]
    return w._detached() if _making_parameter() else w._w0.detach() if w._leaf else w._plain()


def _making_parameter() -> bool:
    """Whether ``nn.Parameter(weight)`` asks for this ``detach()``: it wants a tensor of the type it
    was given, and marks that as the Parameter (a plain tensor would make it refuse)."""
    if torch.compiler.is_compiling():
        return False
    frame = sys._getframe(3)  # this function, detach(), __torch_function__, then detach()'s caller
    return frame is not None and frame.f_code is _PARAMETER_NEW


@implements(aten.detach.default)
def detach_below(func, args, kwargs):
    """``aten.detach`` (autograd's own, as when saving for backward): a leaf of the value."""
    return args[0]._detached()


@implements(Tensor.__deepcopy__)
def deepcopy(func, args, kwargs):
    """A copy of the value, as of a dense weight; a leaf's is its dense tensor's copy."""
    w, memo = args[0], args[1]
    if w._leaf:
        out = memo[id(w)] = w._plain().__deepcopy__(*args[1:], **kwargs)  # nn.Parameter's own, if one
        return out
    with torch._C.DisableTorchFunctionSubclass():
        grad = REQUIRES_GRAD(w) or w._needs_grad()
    out = memo[id(w)] = w._plain().clone().requires_grad_(grad)
    return out


@implements(*HOST)
def host(func, args, kwargs):
    """What reads a leaf's memory or pickles it: its dense tensor's (an ``nn.Parameter``'s own, if
    one); for a weight that is not a leaf, the merged value's."""
    if not args[0]._leaf:
        return NotImplemented
    return getattr(args[0]._plain(), func.__name__)(*args[1:], **kwargs)


@implements(*OWN)
def own(func, args, kwargs):
    """The wrapper's own metadata: ``W0``'s."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@implements(REQUIRES_GRAD)
def requires_grad(func, args, kwargs):
    """Its own flag (a Parameter made of it), or its value's (a leaf is its own value)."""
    w = args[0]
    with torch._C.DisableTorchFunctionSubclass():
        return func(w) or (not w._leaf and w._needs_grad())
