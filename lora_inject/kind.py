r"""Kinds of update: what an adapter holds and how it changes a tensor, kept as data.

A :class:`Kind` is one small definition: its options (named as peft's config fields for that
kind), the parameters it creates for a tensor seen through a :class:`~lora_inject._view.View`,
and its update in that view's ``(.., out, in)`` matrix ("rows"):

* **additive** kinds give ``delta(params, view, scaling, options)``, the ``(.., out, in)``
  matrix added to the weight so far: ``W <- W + delta``;
* **multiplicative** kinds give ``apply(W, params, view, scaling, options)``, the weight they
  turn the weight so far into: ``W <- apply(W)`` (OFT rotates, IA³ scales rows or columns).

An adapter's strength (``activate(model, {name: strength})``) is part of an additive kind's
``scaling``; a multiplicative kind takes ``W <- W + strength * (apply(W) - W)`` instead, on the
merged weight (its factored forms run at full strength only).

Several adapters on one tensor compose in the order given (:func:`merged`), as peft applies its
layers' adapters. Every function works on any view: Linear ``(out, in)``, a conv ``(out,
in/groups * k..)`` (its kernel read from ``view.shape``), a transposed ``(in, out)`` tensor
such as GPT-2's ``Conv1D`` or an ``Embedding``, and experts with a leading ``E``.

Where the update can run without building a weight-sized tensor, ``factored`` maps an op's
name to ``form(x, base, params, view, scaling, options)``: ``base(x)`` computes the op with the
weight so far, and the form returns the op with the adapted weight (a form that does not fit
its arguments returns ``NotImplemented``; the op then gets the merged weight). Composed in
order, each adapter's form wraps the previous one's ``base``. The ops:

* ``"linear"``: ``y = x @ rows(W).T``, which covers ``F.linear``, ``Conv1D``'s ``addmm`` and
  ``x @ W`` on a transposed tensor;
* ``"conv"``: ``F.conv1d/2d/3d`` on a row-stored kernel, channels at dim ``-len(kernel) - 1``;
* ``"embedding"``: ``F.embedding`` on a transposed ``(num, dim)`` table, ``x`` the indices.

``base(x)`` adds the layer's bias as it was before the adapters (``base.bias``, or None), and
the form returns the output with the bias that goes with the adapted weight: a kind with
:attr:`Kind.apply_bias` adapts it as that does (IA³'s ``base(x) * l`` scales both). So an
additive kind at init returns ``base(x)`` itself, bit for bit. ``base`` is a :class:`Base`:
``base.using(x, M)`` runs the same op (its stride, padding..) with the ``(out', in)`` matrix
``M`` in place of the weight and no bias, as a conv form needs.

Kinds are registered by name, as rules are by module type: :func:`register_kind`,
:func:`find_kind`, :func:`default_kinds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._view import View

__all__ = ["Kind", "Option", "default_kinds", "find_kind", "register_kind"]

Params = Mapping[str, Tensor]
Options = Mapping[str, Any]


class Base:
    """The op with the weight so far, as a factored form receives it: ``base(x)``;
    ``base.using(x, M)``, the same op on ``x`` with the ``(out', in)`` matrix ``M`` (the view's
    rows layout) in place of the weight and no bias (None where the caller gives none); and
    ``base.bias``, the bias ``base(x)`` adds as it was before the adapters, or None."""

    __slots__ = ("call", "using", "bias")

    def __init__(self, call: Callable[[Tensor], Tensor],
                 using: Callable[[Tensor, Tensor], Tensor] | None = None, bias: Tensor | None = None) -> None:
        self.call, self.using, self.bias = call, using, bias

    def __call__(self, x: Tensor) -> Tensor:
        return self.call(x)


class _Unfit(Exception):
    """A form returned NotImplemented: the composed op falls back to the merged weight."""


@dataclass(frozen=True)
class Option:
    """One option of a kind, with peft's config field name and default.

    Args:
        name (str): the option's name, as peft's config field for that kind.
        default: the value used when the option is not given.
        check (callable): ``check(value) -> bool``, whether ``value`` is allowed.
        expect (str): what ``check`` allows, in words, for the error message
            (``"a float in [0, 1)"``).
        selector (bool): ``inject`` also takes a selector of modules for it, as ``targets``
            (a regex, a list of names, a callable), and gives each tensor ``True`` where its
            module is selected (IA³'s ``feedforward``, peft's ``feedforward_modules``); a bool
            applies to every tensor. Default: ``False``.
        dropout (bool): a probability of the kind's own dropout (:attr:`Kind.dropout`), which
            draws nothing while every such option is 0. Default: ``False``.
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    expect: str
    selector: bool = False
    dropout: bool = False


@dataclass(frozen=True)
class Kind:
    r"""Define a kind of update: its options, its parameters, and how it changes a tensor.

    Exactly one of ``delta`` (additive) and ``apply`` (multiplicative) is set.

    Args:
        name (str): the kind's name, as ``inject(kind=...)`` takes it.
        create (callable): ``create(view, r, alpha, options) -> dict[str, Tensor]``, the
            adapter's own tensors for a tensor seen through ``view``, with their init, so that
            the update is the identity; in float32 on the CPU (the caller casts and moves them).
            ``options`` is complete (see :meth:`resolve`).
        delta (callable or None): ``delta(params, view, scaling, options) -> Tensor``, the
            additive update ``(.., out, in)``. ``params`` holds the adapter's tensors and the
            shared ones (see ``shared``).
        apply (callable or None): ``apply(W, params, view, scaling, options) -> Tensor``, the
            weight ``(.., out, in)`` that a multiplicative kind makes of ``W`` ``(.., out, in)``.
        options (tuple of Option): the kind's options, named as in peft's config.
        validate (callable or None): ``validate(r, alpha, options)``, the checks that span
            several options; raises ``ValueError``.
        scaling (callable): ``scaling(r, alpha, options) -> float``; ``alpha / r`` by default
            (1 for a kind without a rank or an alpha).
        default_r (int or None): peft's default rank; ``None`` for a kind without one (IA³).
        default_alpha (float or None): peft's default alpha; ``None`` for a kind without one.
        apply_bias (callable or None): ``apply_bias(b, params, view, options) -> Tensor``, the
            bias that goes with the adapted weight, for a kind that changes it too (IA³ scaling
            the output scales the bias). ``None``: the bias is left alone.
        changes_bias (callable or None): ``changes_bias(options) -> bool``, whether
            ``apply_bias`` changes the bias with these options (IA³: not where it scales the
            input); ``None``: wherever ``apply_bias`` is set. Where it does not, ``inject``
            neither checks nor links the module's bias.
        shared (callable or None): ``shared(views, r, options) -> dict[str, Tensor]``, tensors
            shared by every site of one adapter (VeRA's random projections), built once from
            all the sites' views. Each site's ``params`` holds them under the same names.
        share (callable or None): ``share(shared, view, r, options) -> dict[str, Tensor]``, the
            part of the shared tensors that one site holds (VeRA: the slices it reads), as
            frozen buffers of its own; ``None``: the whole of them.
        frozen (tuple of str): the names of tensors that are not trained (buffers).
        factored (mapping): op name to ``form(x, base, params, view, scaling, options)``, the
            op's output with the adapted weight, computed without building it.
        peft_key (callable): ``peft_key(tensor_name) -> str``, the tensor's key in peft's
            adapter files below the module path; the tensor's name by default.
        fill (callable or None): ``fill(params, W, view, options)``, for a kind whose tensors
            start from the weight they adapt (a full copy, chosen rows): set them in place from
            ``W``, the stored tensor the kind receives, so that the update is the identity.
            ``None``: ``create`` alone makes the identity.
        dropout (callable or None): ``dropout(view, scaling, options, like) -> scaling or None``,
            drawn once per forward in training mode: the scaling this forward uses (a ``(out, 1)``
            tensor drops output units of the update: the adapter then runs on the merged weight),
            or ``None`` to leave the adapter out of this forward; ``like`` is a tensor of the
            adapter's (its dtype and device). ``None``: the kind has no dropout of its own. Mark
            its probabilities ``Option(..., dropout=True)``: while all are 0 nothing is drawn, and
            compiled code keeps the kind's factored forms (a draw branches in Python, which breaks
            the graph, so a forward that draws runs on the merged weight there; a kind that marks
            no option is taken to draw in every training forward).

    Example::

        >>> def create(view, r, alpha, options):  # one gain per output unit, ones at init
        ...     return {"gain": torch.ones(*view.lead, view.out_features)}
        >>> def apply(W, params, view, scaling, options):  # (.., out, in) -> (.., out, in)
        ...     return W * params["gain"][..., :, None]
        >>> register_kind("gain", Kind("gain", create=create, apply=apply,
        ...                            default_r=None, default_alpha=None))
    """

    name: str
    create: Callable[[View, int, float, Options], dict[str, Tensor]]
    delta: Callable[[Params, View, float, Options], Tensor] | None = None
    apply: Callable[[Tensor, Params, View, float, Options], Tensor] | None = None
    options: tuple[Option, ...] = ()
    validate: Callable[[int, float, Options], None] | None = None
    scaling: Callable[[int, float, Options], float] = field(
        default=lambda r, alpha, options: 1.0 if alpha is None or not r else alpha / r)
    default_r: int | None = 8
    default_alpha: float | None = 8.0
    apply_bias: Callable[[Tensor, Params, View, Options], Tensor] | None = None
    changes_bias: Callable[[Options], bool] | None = None
    shared: Callable[[Sequence[View], int, Options], dict[str, Tensor]] | None = None
    share: Callable[[Mapping[str, Tensor], View, int, Options], dict[str, Tensor]] | None = None
    frozen: tuple[str, ...] = ()
    factored: Mapping[str, Callable[..., Tensor]] = field(default_factory=dict)
    peft_key: Callable[[str], str] = field(default=lambda tensor_name: tensor_name)
    fill: Callable[[Params, Tensor, View, Options], None] | None = None
    dropout: Callable[[View, float | Tensor, Options, Tensor], float | Tensor | None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Kind(): `name` must be an identifier str, got {self.name!r}.")
        if (self.delta is None) == (self.apply is None):
            raise ValueError(
                f"Kind({self.name!r}): set exactly one of `delta` (an additive update) and `apply` "
                f"(a multiplicative one); got delta={self.delta!r}, apply={self.apply!r}."
            )
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"Kind({self.name!r}): `options` names an option twice: {names}.")

    @property
    def additive(self) -> bool:
        """Whether the update adds ``delta`` (else it maps the weight with ``apply``)."""
        return self.delta is not None

    def biased(self, options: Options) -> bool:
        """Whether an adapter of this kind with ``options`` changes the bias too (see ``apply_bias``)."""
        return self.apply_bias is not None and (self.changes_bias is None or bool(self.changes_bias(options)))

    def resolve(self, r: int | None = None, alpha: float | None = None,
                **options: Any) -> tuple[int | None, float | None, dict[str, Any]]:
        """Return ``(r, alpha, options)`` with peft's defaults filled in and every value checked.

        Raises:
            TypeError: if an option is not one of this kind's.
            ValueError: if a value is not allowed; the message names the option, the value and
                what is allowed.
        """
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"inject(kind={self.name!r}): unknown option(s) {unknown}; the options of "
                f"{self.name!r} are {sorted(known) or 'none'}."
            )
        r = self.default_r if r is None else r
        alpha = self.default_alpha if alpha is None else alpha
        if self.default_r is not None and not (integer(r) and r >= 0):
            raise ValueError(f"inject(kind={self.name!r}): `r` must be an int >= 0, got {r!r}.")
        if alpha is not None and not real(alpha):
            raise ValueError(f"inject(kind={self.name!r}): `alpha` must be a real number, got {alpha!r}.")
        out = {}
        for name, opt in known.items():
            value = options.get(name, opt.default)
            if not opt.check(value):
                raise ValueError(
                    f"inject(kind={self.name!r}): option `{name}` must be {opt.expect}, got "
                    f"{value!r}. Pass {name}=<{opt.expect}>, or leave it out for peft's default "
                    f"{opt.default!r}."
                )
            out[name] = value
        if self.validate is not None:
            self.validate(r, alpha, out)
        return r, alpha, out


def merged(W: Tensor, steps: Sequence[tuple[Kind, Params, float, Options]], view: View) -> Tensor:
    """Return the weight ``(.., out, in)`` that ``steps`` make of ``W`` ``(.., out, in)``, in order.

    Each step is ``(kind, params, scaling, options)``: an additive kind adds its ``delta``, a
    multiplicative one maps the weight so far with ``apply``.
    """
    for kind, params, scaling, options in steps:
        if kind.additive:
            W = W + kind.delta(params, view, scaling, options)
        else:
            W = kind.apply(W, params, view, scaling, options)
    return W


def factored(op: str, x: Tensor, base, steps: Sequence[tuple[Kind, Params, float, Options]],
             view: View) -> Tensor | None:
    """Return ``op``'s output with the weight that ``steps`` make, through each kind's factored
    form, or None where a step's kind has no factored form for ``op`` or a form does not fit.

    ``base(x)`` (a callable, or a :class:`Base`) computes ``op`` with the weight before the steps.
    """
    if not isinstance(base, Base):
        base = Base(base)
    for kind, params, scaling, options in steps:
        form = kind.factored.get(op)
        if form is None:
            return None
        base = Base(_bind(form, base, params, view, scaling, options), base.using, base.bias)
    try:
        return base(x)
    except _Unfit:
        return None


def _bind(form, base: Base, params: Params, view: View, scaling: float, options: Options):
    def call(x: Tensor) -> Tensor:
        out = form(x, base, params, view, scaling, options)
        if out is NotImplemented:
            raise _Unfit
        return out
    return call


def pointwise(h: Tensor, M: Tensor, dims: int) -> Tensor:
    """``M`` ``(out', r)`` applied to the channels of ``h`` ``(.., r, *spatial)`` with ``dims``
    spatial dimensions: a 1x1 conv (a plain matmul for ``dims == 0``)."""
    if dims == 0:
        return torch.nn.functional.linear(h, M)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[dims - 1]
    return conv(h, M.reshape(*M.shape, *(1,) * dims))


# -- shapes every kind reads from the view ------------------------------------------------------
def kernel(view: View) -> tuple[int, ...]:
    """The trailing dimensions of a row-stored tensor past ``(out, in_channels)``: a conv's
    kernel, ``()`` for a matrix or a transposed tensor."""
    if view.transpose:
        return ()
    return tuple(view.shape[len(view.lead) + 2:])


def channels(view: View) -> int:
    """The input channels of the view: ``in`` over the kernel's size."""
    return view.in_features // math.prod(kernel(view))


def kaiming_(t: Tensor, lead: int = 0) -> Tensor:
    """Fill ``t`` in place as ``nn.init.kaiming_uniform_(t, a=sqrt(5))`` does (peft's init for
    LoHa and LoKr), each of its ``lead`` leading dimensions (experts) on its own: uniform within
    ``1 / sqrt(fan_in)``, with ``fan_in`` the product of the dimensions past the first one."""
    fan = math.prod(t.shape[lead + 1:])
    bound = 1 / math.sqrt(fan) if fan else 0.0
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_rank(kind: str) -> Callable[[int, float, Options], None]:
    """A ``validate`` for a kind whose rank must be at least 1."""
    def validate(r, alpha, options) -> None:
        if r < 1:
            raise ValueError(f"inject(kind={kind!r}): `r` must be an int >= 1, got {r!r}.")
    return validate


def probability(v) -> bool:
    """A dropout probability: a real in ``[0, 1)``."""
    return real(v) and 0 <= v < 1


def boolean(v) -> bool:
    return isinstance(v, bool)


# The options LoHa and LoKr share, as peft's LycorisConfig holds them for both.
LYCORIS_OPTIONS = (
    Option("rank_dropout", 0.0, probability, "a float in [0, 1)", dropout=True),
    Option("module_dropout", 0.0, probability, "a float in [0, 1)", dropout=True),
    Option("use_effective_conv2d", False, boolean, "a bool"),
)


def lycoris_dropout(view: View, scaling, options: Options, like: Tensor):
    """LoHa's and LoKr's dropouts for one training forward (a :attr:`Kind.dropout`), as peft 0.21
    draws them, draw for draw from torch's default generator: ``torch.rand(1)`` leaves the
    adapter out unless it exceeds ``module_dropout``; then each output unit of the update is
    kept where ``torch.rand(out)`` exceeds ``rank_dropout``, the kept ones divided by their share
    (``rank_dropout_scale``, which LoHa always does). With both at 0 nothing is drawn."""
    module, rank = options["module_dropout"], options["rank_dropout"]
    if not (module or rank):
        return scaling
    if not torch.rand(1) > module:
        return None
    if not rank:
        return scaling
    drop = (torch.rand(view.out_features) > rank).to(like.dtype)
    if options.get("rank_dropout_scale", True):
        drop /= drop.mean()
    return drop.to(like.device).view(-1, 1) * scaling  # (out, 1): one factor per row of (.., out, in)


# -- the registry -------------------------------------------------------------------------------
_KINDS: dict[str, Kind] = {}


def register_kind(name: str, kind: Kind) -> None:
    """Register ``kind`` under ``name``, for every later ``inject(kind=name)``.

    Args:
        name (str): the name ``inject(kind=...)`` takes; it replaces a kind of that name.
        kind (Kind): the definition.

    Raises:
        TypeError: if ``name`` is not a str or ``kind`` is not a :class:`Kind`.
        ValueError: if ``name`` differs from ``kind.name``.
    """
    if not isinstance(name, str):
        raise TypeError(f"register_kind(): `name` must be a str, got {type(name).__name__}.")
    if not isinstance(kind, Kind):
        raise TypeError(f"register_kind(): `kind` must be a lora_inject.Kind, got {type(kind).__name__}.")
    if name != kind.name:
        raise ValueError(
            f"register_kind(): `name` {name!r} differs from the kind's own name {kind.name!r}; "
            f"register it as {kind.name!r}, or build it with Kind(name={name!r}, ...)."
        )
    _KINDS[name] = kind


def _load_builtin() -> None:
    from . import _kinds  # noqa: F401  (each module of the package registers its kind)


def default_kinds() -> dict[str, Kind]:
    """Return a copy of the registry: each kind's name to its :class:`Kind`."""
    _load_builtin()
    return dict(_KINDS)


def find_kind(name: str) -> Kind:
    """Return the kind registered as ``name``.

    Raises:
        ValueError: if no kind is registered under ``name``.
    """
    _load_builtin()
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(
            f"inject(): unknown `kind` {name!r}; the kinds are {sorted({'lora', *_KINDS})} "
            "(register your own with lora_inject.register_kind)."
        )
    return kind
