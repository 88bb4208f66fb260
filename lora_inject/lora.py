"""The LoRA parametrization ``W -> W + sum over active adapters of s * (B @ A)``, and its adapters."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _call
from . import _quant as quant
from ._factored import RAW_BIAS, FactoredWeight, Step, Term, composed, merge, refuse_lora_dropout, toward
from ._inits import WEIGHT_INITS, init_factors
from ._rows import Slots, enabled
from ._view import View, compute_dtype
from .kind import find_kind

__all__ = ["Adapter", "LoRA"]

ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
GIVEN = "_lora_inject_given"  # on a merged weight LoRA handed out: (that LoRA, the W it came from)
SCALE = "scale_"  # each adapter's scaling as a non-persistent 0-d buffer, scale_<name>


@dataclass
class Adapter:
    """One adapter's settings on one tensor.

    Its tensors live in the :class:`LoRA` module that holds it, under the state-dict keys
    ``<prefix>.<tensor>.<name>`` for each tensor in :attr:`tensor_names`: for ``kind="lora"``
    the factors ``lora_A`` and ``lora_B``, DoRA's ``lora_magnitude``, and the frozen initial
    factors ``lora_A0``/``lora_B0`` of the ``"pissa"``/``"olora"`` inits; for another kind (see
    :mod:`lora_inject.kind`), the tensors its ``create`` (and ``shared``) make, by their names.
    """

    r: int | None
    alpha: float | None
    dropout: float = 0.0
    init: str = "default"
    rslora: bool = False
    dora: bool = False
    dora_axis: str = "out"  # DoRA's norm per output unit ("out", as peft) or per input unit ("in", LyCORIS')
    targets: str | None = None
    error: float | None = None  # combine(rank=k): the relative error of the truncation
    combined: dict[str, float] | None = field(default=None)  # combine(): the weights it was made from
    kind: str = "lora"  # the kind of update (see lora_inject.kind)
    options: dict = field(default_factory=dict)  # the kind's options, resolved for this tensor
    held: tuple[str, ...] = ()  # a kind other than LoRA: the names of its tensors, set by LoRA.add
    strength: float = 1.0  # a multiplier of the update, set by activate(model, {name: strength})

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA; another kind's own scaling; times
        :attr:`strength`."""
        if self.kind != "lora":
            return find_kind(self.kind).scaling(self.r, self.alpha, self.options) * self.strength
        return lora_scaling(self.r, self.alpha, self.rslora) * self.strength

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors this adapter holds, by attribute of :class:`LoRA`."""
        if self.kind != "lora":
            return self.held
        return ("lora_A", "lora_B", *(("lora_magnitude",) if self.dora else ()),
                *(("lora_A0", "lora_B0") if self.init in WEIGHT_INITS else ()))


class BufferDict(nn.Module):
    """A dict of buffers, saved in the state dict as ``<prefix>.<key>``, as ``ParameterDict`` does."""

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()


class LoRA(nn.Module):
    r"""Parametrize one tensor as ``W + sum_i s_i * view(B_i @ A_i)`` over the active adapters.

    It is registered with :func:`torch.nn.utils.parametrize.register_parametrization` by
    :func:`lora_inject.inject`, and holds every named adapter of that tensor: an
    :class:`Adapter` record each (``lora.adapter(name)``), with ``lora_A[name]`` of shape
    ``(r, in)`` and ``lora_B[name]`` of shape ``(out, r)`` (with a leading experts dimension for
    expert weights). ``W`` is never written: the update is computed on the fly, so ``W0`` stays
    bit-identical while LoRA is attached.

    Variants change this parametrization only, so they work for every rule: a DoRA adapter
    (``dora=True``) also holds ``lora_magnitude[name]`` of shape ``(out,)`` (see
    :mod:`lora_inject._dora`); the ``"pissa"``/``"olora"`` inits keep their initial factors
    as buffers ``lora_A0[name]``/``lora_B0[name]`` (see :mod:`lora_inject._inits`).

    Its forward gives a :class:`~lora_inject._factored.FactoredWeight` where the rule is
    factored, and the merged weight elsewhere. ``right_inverse`` is the identity: assigning
    ``module.weight = X`` sets ``W0`` to ``X``.
    """

    def __init__(self, shape: torch.Size, *, transpose: bool = False, experts: bool = False,
                 factored: bool = False) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # Plain attributes, set at once: Module.__setattr__ costs ~1 µs a call.
        self.__dict__.update(
            view=View(tuple(shape), transpose, experts),
            factored=factored,
            records={},  # adapter name -> Adapter, in the order they were added
            active=[],  # adapter names, in order
            memo=None,  # (input, adapters, output) within one forward of the adapted module
            memo_depth=0,
            opens=0,  # per_sample()/disabled() blocks open on it, in any call (see lora_inject._call)
            serving=False,  # opens > 0: a compiled graph reads this call's state as data
            non_persistent=False,  # the adapted tensor is a buffer kept out of the state dict
            froze=False,  # inject stopped the adapted tensor's training; remove restarts it
            made=None,  # the FactoredWeight the last common-case forward made (see _made_weight)
        )
        self.register_load_state_dict_post_hook(LoRA._materialize_scalings)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def per_sample(self) -> tuple[str | None, ...] | None:
        """This call's per-sample adapter names inside :func:`lora_inject.per_sample`, else None."""
        return _call.names(self)[0]

    @property
    def adapters(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self.records)

    def adapter(self, name: str) -> Adapter:
        """The :class:`Adapter` record of ``name`` (a ``KeyError`` if there is none)."""
        return self.records[name]

    @property
    def config(self) -> dict[str, dict]:
        """Each adapter's settings as a dict (a copy: change them through :meth:`adapter`, and a
        scaling through :meth:`set_scaling`)."""
        return {n: asdict(a) for n, a in self.records.items()}

    @property
    def scaling(self) -> dict[str, float]:
        """Each adapter's scaling ``s`` (a copy)."""
        return {n: a.scaling for n, a in self.records.items()}

    def factor_dtype(self) -> torch.dtype:
        """The dtype of the adapters' tensors (of the first adapter's first one), or float32."""
        if len(self.lora_A):
            return next(iter(self.lora_A.values())).dtype
        for name, a in self.records.items():
            if a.tensor_names:
                return self._modules[a.tensor_names[0]][name].dtype
        return torch.float32

    def stackable(self) -> tuple[str, ...]:
        """The names of its plain LoRA adapters (kind ``"lora"``, no DoRA), in order: those whose
        factors stack into one gathered matmul, where each sample chooses its own."""
        return tuple(n for n, a in self.records.items() if a.kind == "lora" and not a.dora)

    def only_lora(self, names) -> bool:
        """Whether every adapter in ``names`` is of kind ``"lora"`` (the factored fast path's)."""
        records = self.records
        for n in names:  # a loop, not all(): this runs on every forward
            if records[n].kind != "lora":
                return False
        return True

    # -- adapters -----------------------------------------------------------------------------
    def add(self, name: str, settings: Adapter, *, dtype: torch.dtype, device: torch.device,
            shared: dict[str, Tensor] | None = None) -> None:
        """Create adapter ``name`` with fresh factors, and make it active.

        The ``"pissa"``/``"olora"`` factors and DoRA's magnitude depend on ``W0``: they are set by
        :func:`lora_inject._inits.init_from_weight` (``inject`` calls it). A kind other than LoRA makes its tensors with
        its ``create``, and holds this tensor's part of ``shared`` (see :attr:`Kind.shared`) too,
        each in a dict named after the tensor (a ``BufferDict`` for its ``frozen`` ones)."""
        if settings.kind != "lora":
            kind = find_kind(settings.kind)
            made = {**kind.create(self.view, settings.r, settings.alpha, settings.options), **(shared or {})}
            for attr, t in made.items():
                t = t.to(dtype=dtype, device=device)
                if attr in kind.frozen:
                    self.extra(attr, BufferDict)[name] = t
                else:
                    self.extra(attr, nn.ParameterDict)[name] = nn.Parameter(t)
            settings.held = tuple(made)
            self._attach(name, settings, device)
            return
        shape_A, shape_B = self.view.factor_shapes(settings.r)
        A = torch.empty(shape_A, dtype=dtype, device=device)
        B = torch.empty(shape_B, dtype=dtype, device=device)
        init_factors(A, B, settings.init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if settings.init in WEIGHT_INITS:
            self.extra("lora_A0", BufferDict)[name] = torch.zeros_like(A)
            self.extra("lora_B0", BufferDict)[name] = torch.zeros_like(B)
        if settings.dora:
            m = torch.ones(self.view.magnitude_shape(settings.dora_axis), dtype=dtype, device=device)
            self.extra("lora_magnitude", nn.ParameterDict)[name] = nn.Parameter(m)
        self._attach(name, settings, device)

    def _attach(self, name: str, settings: Adapter, device: torch.device) -> None:
        # The scaling as a tensor too, for torch.compile: a graph reads its value, so changing
        # alpha (a hot swap) recompiles nothing. set_scaling keeps the two in step.
        self.register_buffer(SCALE + name, torch.tensor(settings.scaling, device=device), persistent=False)
        self.records[name] = settings
        self.active.append(name)

    def set_scaling(self, name: str, *, alpha: float | None = None, rslora: bool | None = None,
                    strength: float | None = None) -> None:
        """Set adapter ``name``'s ``alpha``, ``rslora`` and ``strength`` (those given) on its record,
        and the tensor copy of its scaling (``scale_<name>``, which compiled code reads) to match.
        With none given, it only refreshes that copy from the record (after ``to_empty()``;
        :func:`lora_inject.init_lora` and loading the factors do it).

        Change a scaling with this, not by setting the record's fields: a compiled graph would go on
        reading the old value.
        """
        a = self.records[name]
        if alpha is not None:
            a.alpha = alpha
        if rslora is not None:
            a.rslora = rslora
        if strength is not None:
            a.strength = strength
        with torch.no_grad():
            self._buffers[SCALE + name].fill_(a.scaling)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        for name in self.records:  # loading the factors after to_empty(): the scalings too
            if not self._buffers[SCALE + name].is_meta:
                self.set_scaling(name)

    def _materialize_scalings(self, incompatible=None) -> None:
        """A load post-hook: a scaling still on the meta device once its factors are real (a model
        built on meta, then ``load_state_dict(..., assign=True)``) is made again on theirs. The
        scalings are not in the state dict, so nothing else would give them a value."""
        for name, a in self.records.items():
            A = self._modules[a.tensor_names[0]][name]
            if self._buffers[SCALE + name].is_meta and not A.is_meta:
                self._buffers[SCALE + name] = torch.tensor(self.records[name].scaling, device=A.device)

    def drop(self, name: str) -> None:
        """Delete adapter ``name``."""
        for attr in self.records[name].tensor_names:
            del self._modules[attr][name]
        del self.records[name], self._buffers[SCALE + name]
        if name in self.active:
            self.active.remove(name)

    def extra(self, attr: str, kind: type[nn.Module]) -> nn.Module:
        if attr not in self._modules:
            self.add_module(attr, kind())
        return self._modules[attr]

    def tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors by their names (see :attr:`Adapter.tensor_names`). The
        state-dict key of each is ``<this module's prefix>.<tensor>.<name>``."""
        return {k: self._modules[k][name] for k in self.records[name].tensor_names}

    # -- the update -----------------------------------------------------------------------------
    def composed(self, W: Tensor, names: list[str], dropout: bool = False) -> Tensor:
        """``W`` with the adapters ``names`` applied in the order they were added (LoRA terms as
        additive steps, DoRA on the weight so far, other kinds through their ``delta``/``apply``),
        in the ``(.., out, in)`` view, summed in float32 (or wider) and cast back once (see
        :func:`lora_inject._factored.composed`)."""
        return composed(W, self.parts(names, dropout), self.view)

    def parts(self, names, dropout: bool = False) -> list[Term | Step]:
        """Each adapter in ``names``, in the order they were added: a
        :class:`~lora_inject._factored.Term` for LoRA, a :class:`~lora_inject._factored.Step` for
        another kind; the terms of a LoRA-only list keep the order of ``names``. With ``dropout``
        (a training forward), a kind's own dropout (:attr:`Kind.dropout`) is drawn: it may give
        the step another scaling, or leave the adapter out."""
        if self.only_lora(names):
            return self.terms(names)
        chosen, compiling = set(names), torch.compiler.is_compiling()
        out = []
        for name in [n for n in self.records if n in chosen]:
            a = self.records[name]
            s = self._buffers[SCALE + name] if compiling else a.scaling  # compiled: no guard on its value
            if a.kind == "lora":
                out.append(self.terms([name], compiling)[0])
                continue
            kind, params, strength = find_kind(a.kind), self.tensors(name), 1.0
            if not kind.additive:  # a strength moves W towards apply(W): not a scaling of it
                s, strength = kind.scaling(a.r, a.alpha, a.options), a.strength
            if dropout and kind.dropout is not None:
                s = kind.dropout(self.view, s, a.options, next(iter(params.values())))
                if s is None:
                    continue
            out.append(Step(a.kind, params, s, a.options, name, strength))
        return out

    def bias_of(self, b: Tensor, names: list[str] | None = None) -> Tensor:
        """The bias that goes with the adapted weight: ``b`` through each adapter in ``names``
        (default: the active ones) whose kind changes it (:attr:`Kind.apply_bias`), in order."""
        names = self.active if names is None else names
        chosen = set(names)
        for name in [n for n in self.records if n in chosen]:
            a = self.records[name]
            if a.kind == "lora":
                continue
            kind = find_kind(a.kind)
            if kind.biased(a.options):
                ct = compute_dtype(b.dtype)
                params = {k: v.to(ct) for k, v in self.tensors(name).items()}
                b0 = b.to(ct)
                b = toward(b0, kind.apply_bias(b0, params, self.view, a.options), a.strength).to(b.dtype)
        return b

    def factor_pair(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` such that adapter ``name``'s update is ``s * B @ A`` in the matrix view:
        ``lora_A``/``lora_B``, with the frozen ``A0``/``-B0`` appended along ``r`` when present."""
        modules = self._modules  # not self.lora_A: Module.__getattr__ costs a call each
        A, B = modules["lora_A"]._parameters[name], modules["lora_B"]._parameters[name]
        if self.records[name].init in WEIGHT_INITS:
            A = torch.cat([A, self.lora_A0[name]], dim=-2)  # (.., 2r, in)
            B = torch.cat([B, -self.lora_B0[name]], dim=-1)  # (.., out, 2r)
        return A, B

    def plain_terms(self) -> list[Term] | None:
        """:meth:`terms` of the active adapters in eager mode where each is a LoRA adapter with
        plain factors (no DoRA, no PiSSA/OLoRA init), else None: the common case, in one loop."""
        out, training, records = [], self.training, self.records
        lora_A, lora_B = self._modules["lora_A"]._parameters, self._modules["lora_B"]._parameters
        for name in self.active:
            a = records[name]
            if a.kind != "lora" or a.dora or a.init in WEIGHT_INITS:
                return None
            s = lora_scaling(a.r, a.alpha, a.rslora) * a.strength  # Adapter.scaling, without its kind lookup
            out.append(tuple.__new__(Term, (lora_A[name], lora_B[name], s, a.dropout if training else 0.0,
                                            None, name, a.dora_axis)))
        return out

    def terms(self, names, compiling: bool | None = None) -> list[Term]:
        """The :class:`~lora_inject._factored.Term` of each adapter in ``names``, in order
        (``compiling``: whether under ``torch.compile``, if the caller knows)."""
        out, training = [], self.training
        compiling = torch.compiler.is_compiling() if compiling is None else compiling
        modules, records = self._modules, self.records
        for name in names:
            a = records[name]
            m = modules["lora_magnitude"]._parameters[name] if a.dora else None
            if a.init in WEIGHT_INITS:
                A, B = self.factor_pair(name)
            else:  # factor_pair's plain case, inline: this runs on every forward
                A, B = modules["lora_A"]._parameters[name], modules["lora_B"]._parameters[name]
            # compiled: a 0-d tensor, with no guard on its value
            s = self._buffers[SCALE + name] if compiling else a.scaling
            out.append(tuple.__new__(Term, (A, B, s, a.dropout if training else 0.0, m, name, a.dora_axis)))
        return out

    def merged(self, W: Tensor, names: list[str] | None = None, dropout: bool = False) -> Tensor:
        """Return the weight ``W`` takes with ``names`` (default: the active ones), in ``W``'s dtype
        (see :func:`lora_inject._factored.merge`, and :meth:`composed` for other kinds; ``dropout``:
        a training forward's, see :meth:`parts`)."""
        names = self.active if names is None else names
        if not self.only_lora(names):
            return self.composed(W, names, dropout)
        return merge(W, self.terms(names), self.view)

    # -- the parametrization --------------------------------------------------------------------
    def forward(self, W: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and self.factored and _call.CURRENT.get() is None:
            # The common case, first and in few steps: the model's active adapters, no block open.
            terms = self.plain_terms()
            if terms:
                return self._made_weight(W, terms)
            self.__dict__["made"] = None  # no adapter active: hold no tensor for the next one
        if torch.compiler.is_compiling():  # a graph cannot read this call's state: see _served
            if self.serving:
                return self._served(W)
            rows, names, cell = None, self.active, None
        else:
            (rows, names), cell = _call.names(self), _call.cache_cell(self)
        if not names and self.factored:  # the table ops never write their weight
            if not isinstance(W, nn.Parameter) or torch.compiler.is_compiling() or quant.scheme(W) is not None:
                return W
            out = W.view_as(W)  # not the Parameter itself, which could not be assigned back
            out.__dict__[GIVEN] = (self, W)
            return out
        if rows is not None and not self.only_lora(names):
            other = sorted({self.records[n].kind for n in names} - {"lora"})
            raise RuntimeError(f"per_sample(): adapters of kind {other} on a tensor of shape {self.view.shape} "
                               "cannot differ per sample (their update is merged into one weight for the "
                               "batch); per_sample() takes LoRA adapters only. Run one forward per adapter "
                               "with li.activate() instead.")
        compiling = torch.compiler.is_compiling()
        if self.factored and (cell is None or rows is not None or torch.is_grad_enabled()
                              or compiling or quant.scheme(W) is not None):
            only = self.only_lora(names)
            # Other kinds merge on a weight only its module's forward reads (bitsandbytes'), and
            # compiled in training where a kind's dropout draws (see _draws): the draw branches in
            # Python on a random tensor, which breaks the graph, and an adapted weight cannot
            # cross from one graph into the next.
            draws = compiling and self.training and self._draws(names)
            if only or not (draws or (scheme := quant.scheme(W)) is not None and scheme.own_forward):
                owner = None if compiling else self  # for right_inverse; a graph needs none
                terms = self.terms(names, compiling) if only else self.parts(names, self.training)
                return FactoredWeight(W, terms, self.view, rows, owner)
        if rows is not None and names:
            raise RuntimeError(f"per_sample(): a LoRA of shape {self.view.shape} is on the merged path, where "
                               "one weight serves the whole batch; per-sample adapters need the fast path.")
        # Compiled, an error would only send the frame back to eager: a known limit.
        if self.training and not compiling and not self.only_lora(names):
            refuse_lora_dropout(self.parts(names), f"the update of this tensor of shape {self.view.shape} is merged "
                                "into one weight (a weight only its module's forward reads, as bitsandbytes')")
        out = self.merged_once(W, names, cell, self.training)
        if not torch.compiler.is_compiling():  # a value handed out: assigning it back restores W
            out.__dict__[GIVEN] = (self, W)
        return out

    def _draws(self, names) -> bool:
        """Whether a kind's own dropout (:attr:`~lora_inject.Kind.dropout`) draws for an adapter in
        ``names`` in a training forward: where one of its options with ``dropout=True`` is above 0,
        or always for a kind that marks no option so."""
        for name in names:
            a = self.records[name]
            kind = find_kind(a.kind) if a.kind != "lora" else None
            if kind is not None and kind.dropout is not None:
                marked = [o.name for o in kind.options if o.dropout]
                if not marked or any(a.options.get(o) for o in marked):
                    return True
        return False

    def _made_weight(self, W: Tensor, terms: list[Term]) -> FactoredWeight:
        """The :class:`FactoredWeight` of ``W`` and ``terms``: the one made last time where it holds
        the very same tensors, of the same dtypes and device (a ``.data`` swap can change them),
        with the same scalings and dropouts, in the same inference mode; else a new one.

        A FactoredWeight reads its tensors when an op runs, so one made before an optimizer step
        is still the adapted weight after it: making it again each forward would only add the cost
        of a wrapper tensor, its allocation and its release. Only a weight made of ``nn.Parameter``
        objects as they are (no cast copy, no tensor of a ``torch.func`` transform) is kept. A kept
        weight holds its tensors until the next forward reads the weight again; assigning the
        adapted tensor (``layer.weight = t``, ``functional_call`` by the state dict's keys),
        ``_apply`` (``.to()``, ``.half()``, ``to_empty()``) and a forward with no adapter active
        forget it."""
        made, inference = self.made, torch.is_inference_mode_enabled()
        if made is not None:
            w, mode, dtype, device, held = made._made_as
            if w is W and mode is inference and dtype is W.dtype and device == W.device and len(held) == len(terms):
                for (A, B, a, b, s, p, n), t in zip(held, terms):
                    if A is not t.A or B is not t.B or s != t.scaling or p != t.dropout or n != t.name \
                            or a is not A.dtype or b is not B.dtype:
                        break
                else:
                    return made
        out = FactoredWeight(W, terms, self.view, None, self)
        keep = type(W) is nn.Parameter and not torch._C._are_functorch_transforms_active()
        for t, kept in zip(terms, out._terms):
            keep = keep and type(t.A) is nn.Parameter and type(t.B) is nn.Parameter and kept.A is t.A
        if keep:  # not out.dtype and the like: a wrapper's metadata costs a dispatch
            out.__dict__["_made_as"] = (W, inference, W.dtype, W.device, tuple(
                (t.A, t.B, t.A.dtype, t.B.dtype, t.scaling, t.dropout, t.name) for t in terms))
        self.__dict__["made"] = out if keep else None
        return out

    def _apply(self, fn, recurse=True):
        self.__dict__["made"] = None  # its wrapper's dtype and device are W0's before the move
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["made"] = None  # a copy makes its own
        return state

    def _served(self, W: Tensor) -> Tensor:
        """The compiled forward while some call may have per-sample rows or adapters off here
        (``serving``): the same graph for every assignment, which it reads as data at run time
        (see :mod:`lora_inject._call`). A factored weight holds the active adapters' terms (or,
        where one is of another kind or DoRA, their merged weight as its base), then one term per
        plain LoRA adapter this tensor carries, for the samples that choose it (:class:`Slots`);
        a merged weight is the adapted one where the call leaves the active adapters on, else ``W``."""
        names, key = self.active, id(self)
        dora = ",".join(n for n, a in self.records.items() if a.dora)
        slots = self.stackable() if self.factored else ()
        if slots and self.only_lora(names) and not any(self.records[n].dora for n in names):
            terms = self.terms(names) + [t._replace(name=Slots.term(j)) for j, t in enumerate(self.terms(slots))]
            return FactoredWeight(W, terms, self.view, Slots(key, slots, len(names), dora), None)
        base = W
        if names or dora and not slots:  # the active adapters, where the call leaves them on
            dense = quant.dense(W)
            merged = self.merged_once(W, names, None) if names else dense
            base = torch.where(enabled(dense, key, dora, ""), merged, dense)
        if not slots:
            return base
        terms = [t._replace(name=Slots.term(j)) for j, t in enumerate(self.terms(slots))]
        return FactoredWeight(base, terms, self.view, Slots(key, slots, 0, dora), None)

    def merged_once(self, W: Tensor, names: list[str], cell: list | None = None, dropout: bool = False) -> Tensor:
        """The merged weight, built once per forward of the adapted module (RNNs and
        MultiheadAttention read it several times), or once for as long as it stays the same
        inside :func:`lora_inject.cached` (``cell``, this call's: it watches the storage and
        version counter of ``W`` and of every factor). It is a fresh tensor even with no adapter
        active, so that a layer that writes its weight in place (``Embedding(max_norm=...)``)
        never writes ``W0``. ``dropout``: a training forward's (see :meth:`parts`), drawn once per
        forward of the module."""
        if cell is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            tensors = [W, *(t for n in names for t in self.tensors(n).values())]
            key = (tuple(names), tuple((t.data_ptr(), t._version) for t in tensors),
                   tuple(self.records[n].scaling for n in names))
            held = cell[0]
            if held is None or held[0] != key:
                held = cell[0] = (key, self.merged(W, names))
            return held[1]
        memo, key = self.memo, tuple(names)
        if memo is not None and memo[0] is W and memo[1] == key:  # keyed by the adapters: calls differ
            return memo[2]
        out = self.merged(W, names, dropout)
        if self.memo_depth:
            self.memo = (W, key, out)
        return out

    def right_inverse(self, value: Tensor) -> Tensor:
        """What to store as ``W`` when ``value`` is assigned to the adapted tensor (``module.weight =
        value``, ``torch.func.functional_call``, loading a state dict).

        The state dict holds ``W`` under the tensor's own key, so a plain tensor is the new ``W``, as
        it would be on loading. A value this LoRA handed out (the adapted weight, factored or merged)
        gives back the very ``W`` it was computed from: assigning it restores ``W`` exactly, as
        ``functional_call`` does on exit. It is never taken for a new ``W``, which would add the
        update twice.

        Raises:
            ValueError: if ``value`` is the adapted weight of another tensor, or has another shape.
        """
        if isinstance(value, FactoredWeight) and not value._leaf:
            owner, W = value._owner, value._w0
        else:
            owner, W = value.__dict__.get(GIVEN, (None, value))
        if owner is not None and owner is not self:
            raise ValueError(
                f"lora_inject: assigning an adapted weight of shape {tuple(value.shape)} read from another "
                "LoRA-adapted tensor would store its update as this tensor's base weight W0. Assign a plain "
                "tensor (it becomes W0, as loading the state dict does), e.g. its merged value "
                "`other.weight.detach().clone()`, or merge first with lora_inject.remove(model).")
        shape = self.view.shape
        if owner is None and tuple(quant.shape(value)) != shape:
            raise ValueError(f"lora_inject: the adapted tensor has shape {shape}; assigning one of shape "
                             f"{tuple(quant.shape(value))} to it is refused. Assign a tensor of shape {shape}.")
        return W

    def extra_repr(self) -> str:
        items = ", ".join(f"{n}: {'' if a.kind == 'lora' else a.kind + ', '}r={a.r}, alpha={a.alpha}"
                          f"{'' if n in self.active else ' (inactive)'}"
                          for n, a in self.records.items())
        return f"shape={self.view.shape}, {items}"


class Bias(nn.Module):
    """Parametrize a module's bias as the one that goes with its adapted weight: ``b`` through
    :meth:`LoRA.bias_of` of the weight's :class:`LoRA` (IA³ scaling the output scales the bias,
    :attr:`Kind.apply_bias`); the identity while no such adapter is active. It holds no tensor of
    its own, so the bias keeps its key in the state dict (see :mod:`lora_inject._hooks`), and
    ``b`` is never written."""

    def __init__(self, weight: LoRA, weight_name: str) -> None:
        super().__init__()
        self.__dict__.update(weight=weight, weight_name=weight_name)  # not a submodule: no keys twice

    def forward(self, b: Tensor) -> Tensor:
        lora = self.weight
        if torch.compiler.is_compiling():
            if lora.serving and lora.active:  # this call's state, read as data (see LoRA._served)
                return torch.where(enabled(b, id(lora), "", ""), lora.bias_of(b), b)
            return lora.bias_of(b)
        out = lora.bias_of(b, _call.names(lora)[1])
        out = out.view_as(out) if out is b else out  # not b itself, which keeps no mark
        out.__dict__[RAW_BIAS] = b  # the factored forms start from b
        out.__dict__[GIVEN] = (self, b)
        return out

    def right_inverse(self, value: Tensor) -> Tensor:
        """What to store as ``b`` when ``value`` is assigned to the bias: a plain tensor itself, and
        a bias this handed out the very ``b`` it came from (see :meth:`LoRA.right_inverse`).

        Raises:
            ValueError: if ``value`` is not a tensor of the bias's shape, or is the adapted bias of
                another tensor.
        """
        view = self.weight.view
        shape = (*view.lead, view.out_features)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(
                f"lora_inject: the bias goes with an adapted weight ({self.weight_name}) and has shape {shape}; "
                f"assigning {got} to it is refused. Assign a tensor of shape {shape}, or take the adapter off "
                "first with lora_inject.remove(model).")
        owner, b = value.__dict__.get(GIVEN, (None, value))
        if owner is not None and owner is not self:
            raise ValueError(
                f"lora_inject: assigning an adapted bias of shape {tuple(value.shape)} read from another adapted "
                "layer would store its adapter's scaling as this layer's bias. Assign a plain tensor, e.g. "
                "`other.bias.detach().clone()`.")
        return b

    def extra_repr(self) -> str:
        return f"of {self.weight_name}"


def unlink_bias(module: nn.Module, lora: LoRA | None) -> None:
    """Take the :class:`Bias` parametrization off the bias linked to ``lora`` (``inject`` links it
    where a kind changes the bias, see :attr:`Kind.apply_bias`), if there is one."""
    bias = None if lora is None else lora.__dict__.pop("bias_link", None)
    if bias is not None:
        parametrize.remove_parametrizations(module, bias, leave_parametrized=False)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The scaling ``s`` of an update ``s * B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_adapter_name(fn: str, name: object) -> str:
    """Return ``name`` if it is a valid adapter name.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: if it is not a Python identifier.
    """
    if not isinstance(name, str):
        raise TypeError(f"{fn}(): `adapter` must be a str, got {type(name).__name__}.")
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"{fn}(): `adapter` must be a Python identifier (it becomes part of state-dict "
            f"keys), got {name!r}. Use letters, digits and '_', such as 'default' or 'task_1'."
        )
    return name

