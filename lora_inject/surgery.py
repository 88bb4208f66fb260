"""Model surgery: ``inject`` adapters into a model in place, and ``remove`` them again.

``inject`` reads as its steps: check the arguments (:class:`~lora_inject._spec.Spec`), plan the
sites (:class:`_Planned`, each a :class:`~lora_inject._sites.Site`), attach, fill, and roll back if
anything raises. ``remove`` decides every site's :class:`~lora_inject._removal.Removal` before it
writes any.
"""

from __future__ import annotations

import gc
import itertools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import _quant as quant
from ._chain import find_lora, kept, parametrized, source
from ._copies import full_groups, saved_modules, token_sites, within
from ._hooks import hook
from ._inits import WEIGHT_INITS, init_from_weight, loftq_factors
from ._module_class import own_class, own_forward, own_setter
from ._removal import detach, removal, take_off
from ._selection import matcher, named_modules, qualified
from ._sites import Site, adapter_names, loras, module_loras
from ._spec import Spec, check_model, checked
from ._tied import others, tensor_users, tie, tied_to
from ._view import View
from .kind import find_kind
from .lora import Bias, LoRA, lora_scaling, unlink_bias
from .rule import Rule, RuleKey, find_rule, type_name

__all__ = ["RequantizationWarning", "inject", "remove"]


class RequantizationWarning(UserWarning):
    """:func:`remove` merged adapters into quantized weights and requantized them: the message
    gives the largest change that requantizing made, relative to the weight's largest entry, and
    the tensor where it was largest."""


M = TypeVar("M", bound=nn.Module)
Target = Union[str, "re.Pattern[str]", Sequence[str], Callable[[str, nn.Module], bool]]


def inject(
    model: M,
    targets: Target,
    *,
    kind: str = "lora",
    r: int | None = None,
    alpha: float | None = None,
    adapter: str = "default",
    exclude: Target | None = None,
    dropout: float = 0.0,
    init: str = "default",
    rules: Mapping[RuleKey, Rule] | None = None,
    dtype: torch.dtype | None = None,
    rslora: bool = False,
    dora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    dense: Mapping[str, Tensor] | None = None,
    **options,
) -> M:
    r"""Add a LoRA adapter, in place, to every module of ``model`` that ``targets`` selects.

    Each selected module whose type has a :class:`~lora_inject.Rule` gets a
    :class:`~lora_inject.LoRA` parametrization on every tensor its rule names, so that
    ``module.weight`` reads ``W0 + (alpha / r) * B @ A``. The module's class, forward, hooks
    and attributes stay; ``isinstance`` holds. In the state dict ``p.weight`` still holds ``W0``
    (where LoRA is the tensor's only parametrization; with another one registered before it,
    parametrize's ``p.parametrizations.weight.original*`` keys stay), and the factors appear as
    ``p.parametrizations.weight.<i>.lora_A.<adapter>`` and ``...lora_B.<adapter>``. So a plain
    model (``save_pretrained`` and ``from_pretrained``) loads the base from it, the state dict
    loads back strictly into an adapted model, and a base checkpoint loads into one too.

    The default init (``A`` Kaiming-uniform, ``B`` zero) leaves every output unchanged.
    The adapted tensors stop training (``requires_grad=False`` on each ``W0``), so an optimizer
    over ``model.parameters()`` that require grad trains the adapters; every other parameter is
    left as it was, and ``remove`` lets ``W0`` train again.
    The call is atomic: if it raises, the model is exactly as it was.

    Args:
        model (nn.Module): the model to change in place.
        targets (str, re.Pattern, list of str or callable): a regex *searched* in each qualified
            module name (``"attn"`` reaches ``transformer.h.0.attn.c_attn``), a compiled pattern,
            a list of module names matched as peft matches ``target_modules`` (a whole name or its
            last dotted parts: ``["q_proj", "v_proj"]``), or ``f(name, module) -> bool``.
        kind (str): the kind of update (see :mod:`lora_inject.kind`): ``"lora"``, ``"loha"``,
            ``"lokr"``, ``"oft"``, ``"ia3"``, ``"vera"``, or one registered with
            :func:`~lora_inject.register_kind`. Each has peft's defaults for ``r`` and ``alpha``
            (IA³ has neither, VeRA and OFT no ``alpha``); ``dropout``, ``init``, ``rslora`` and
            ``dora`` are LoRA's own. Default: ``"lora"``.
        r (int): the rank. Default: 8 (another kind: peft's default for it).
        alpha (float, optional): the scaling numerator; the update is scaled by
            ``alpha / r``. Default: ``None``, meaning ``alpha = r`` (a scaling of 1).
        adapter (str): the adapter's name; several can live on one tensor. Default: ``"default"``.
        exclude (same kinds as ``targets``, optional): modules to leave out; wins over ``targets``.
        dropout (float): dropout on the input of the LoRA branch, for factored layers
            (Linear, Conv1D, Embedding, Conv with groups=1). Default: 0.0.
        init (str): ``"default"`` or ``"gaussian"`` (``A ~ N(0, 1/r)``), with ``B`` zero in both;
            or ``"pissa"``/``"olora"``: ``A`` and ``B`` from the SVD/QR of ``W0``, as in peft,
            with the initial factors kept frozen so that the weight is unchanged at init and
            ``W0`` is never written (see :mod:`lora_inject._inits`); or ``"loftq"`` on quantized
            targets, with ``dense``: ``s * B @ A`` starts as the best rank-``r`` approximation of
            ``dense - dequantize(W0)``, so the quantized model starts close to the dense one.
        rules (mapping, optional): a registry to use instead of the default one
            (see :func:`~lora_inject.default_rules`).
        dtype (torch.dtype, optional): the factors' dtype, such as ``torch.float32`` on a
            half-precision model. Default: the weight's dtype.
        rslora (bool): scale the update by ``alpha / sqrt(r)`` (rank-stabilised LoRA, peft's
            ``use_rslora``) instead of ``alpha / r``. Default: ``False``.
        dora (bool): DoRA: the weight becomes ``m * (W0 + s * B @ A) / ||W0 + s * B @ A||`` with a
            trainable magnitude ``m`` per output unit, initialised so that the model is unchanged
            (see :mod:`lora_inject._dora`). Default: ``False``.
        modules_to_save (list of str, optional): modules that train whole as part of the adapter,
            matched as peft matches them (a module whose path ends with a name, and everything in
            it): each floating parameter gets kind ``"full"``, a trainable copy that the tensor
            reads while the adapter is active (``W0`` stays, frozen), so ``remove(merge=False)``
            and :func:`~lora_inject.disabled` give the base back and ``remove(merge=True)`` keeps
            the trained values. ``targets`` never reach them. Default: ``None``.
        trainable_token_indices (list of int, or dict of str to list of int, optional): token
            rows that train whole as part of the adapter (peft's ``trainable_token_indices``,
            kind ``"tokens"``): a list for ``model.get_input_embeddings()``, or a dict from
            module names (matched as ``modules_to_save``) to ids. A tied head reads the same rows.
            Default: ``None``.
        dense (mapping, optional): for ``init="loftq"``, the dense weights the quantized targets
            were made from, under the model's state-dict keys (``"model.layers.0.mlp.up_proj.weight"``):
            the original checkpoint's state dict. Default: ``None``.
        **options: the options of ``kind``, named as peft's config fields for that kind (such as
            ``oft_block_size`` for OFT, ``feedforward`` for IA³: a selector of modules as
            ``targets``, peft's ``feedforward_modules``); see each kind's module.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``targets``/``exclude`` is of the wrong kind, ``r`` is not an int, ``alpha``
            is not a number, ``modules_to_save`` is not a list of str, ``trainable_token_indices``
            is not a list (or dict of lists) of distinct ints, or a list of them meets a model
            without ``get_input_embeddings()``,
            ``adapter`` is not a str, ``dtype`` is not a floating dtype, ``rslora`` or ``dora``
            is not a bool, ``rules`` is not a mapping to :class:`~lora_inject.Rule`, or a
            selected tensor is not floating point, or ``dense`` is not a mapping of tensors.
        ValueError: if ``r`` is not positive, ``alpha`` is not finite, a regex is invalid,
            ``init`` or ``adapter`` is not valid, ``init="pissa"``/``"loftq"`` has ``alpha <= 0``,
            ``dense`` is given without ``init="loftq"`` (or that init without it, or with
            ``dora``), a LoftQ target is not quantized or ``dense`` lacks its weight or holds
            another shape,
            ``dropout`` is outside [0, 1) or set on a layer without a factored form, the
            adapter already exists on a selected tensor, a rule names a tensor the module
            lacks, a sparse ``Embedding`` or ``EmbeddingBag`` has no factored form (``max_norm``,
            ``scale_grad_by_freq``, ``mode="max"``), ``init="pissa"``/``"olora"`` meets a weight that is not finite, a
            selected tensor is an uninitialised lazy one, or nothing at all is selected; for a
            ``kind`` other than LoRA: the kind is unknown, an option or its value is not the
            kind's, ``dora``/``init``/``rslora``/``dropout`` or an ``alpha``/``r`` the kind lacks
            is given, a dropout option is nonzero (not implemented), a lookup is sparse, or the
            kind changes the bias (IA³) where the rule names none or it does not fit; a tensor
            tied to another module that has a parametrization of its own on it; a name of
            ``modules_to_save``/``trainable_token_indices`` that selects no module, a token id
            past the embedding's rows, or tokens on a tensor that ``targets`` adapt already.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> inject(model, r"^0$", r=2, alpha=4)
        >>> model[0].parametrizations.weight[0].lora_A["default"].shape
        torch.Size([2, 4])
    """
    if modules_to_save is not None or trainable_token_indices is not None:
        return _inject_with_copies(model, targets, modules_to_save, trainable_token_indices, dict(
            kind=kind, r=r, alpha=alpha, adapter=adapter, exclude=exclude, dropout=dropout, init=init, rules=rules,
            dtype=dtype, rslora=rslora, dora=dora, dense=dense, **options))
    spec = checked(model, targets, kind, r=r, alpha=alpha, adapter=adapter, dropout=dropout, init=init,
                    rules=rules, dtype=dtype, rslora=rslora, dora=dora, dense=dense, options=options)
    # Bulk surgery makes thousands of small objects; a cyclic collection set off midway would
    # walk the whole model (hundreds of ms on a 7B one), so it waits until the end.
    with _gc_paused():
        sites = _plan(model, targets, exclude, rules, adapter, spec.dropout)
        _prepare(model, sites, spec)
        starts = _starts(sites, spec, dense)  # checked before anything changes
        # The tensors LoRA adapts stop training (an optimizer over the parameters that require
        # grad trains the factors only); every other parameter stays as it was.
        frozen = [t for site in sites for t in site.originals if isinstance(t, nn.Parameter) and t.requires_grad]
        try:
            for t in frozen:
                t.requires_grad_(False)
            for site in sites:
                _attach(site, adapter, spec, dtype)
            _fill(sites, adapter, starts)
        except BaseException:
            _roll_back(sites, adapter, frozen)
            raise
        ids = {id(t) for t in frozen}
        for site in sites:  # remove() lets them train again
            site.lora.froze = site.lora.froze or any(id(t) in ids for t in site.originals)
    return model


# -- whole tensors and token rows in the same adapter ----------------------------------------------
def _inject_with_copies(model, targets, modules_to_save, trainable_token_indices, kwargs) -> nn.Module:
    """``inject`` on ``targets``, then the whole tensors of ``modules_to_save`` (kind ``"full"``) and
    the rows of ``trainable_token_indices`` (kind ``"tokens"``) as part of the same adapter; all or
    nothing."""
    check_model(model)
    saved = [] if modules_to_save is None else saved_modules("inject", model, modules_to_save)
    tokens = [] if trainable_token_indices is None else token_sites("inject", model, trainable_token_indices)
    groups = full_groups(model, saved)
    if saved:  # as in peft, the targets never reach a module that is saved whole
        exclude, inside = kwargs["exclude"], within(saved)
        leave = matcher("inject", "exclude", exclude) if exclude is not None else None
        kwargs["exclude"] = lambda q, m: inside(q, m) or (leave is not None and leave(q, m))
    adapter = kwargs["adapter"]
    inject(model, targets, **kwargs)
    try:
        for paths, rule in groups:
            inject(model, lambda q, m, paths=paths: q in paths, kind="full", adapter=adapter, rules={nn.Module: rule})
        modules = dict(named_modules(model))
        for path, idx, rule in tokens:
            lora = find_lora(modules[path], "weight") or tied_to(modules[path], "weight")
            if lora is not None and adapter in lora.adapters:
                raise ValueError(
                    f"inject(): `trainable_token_indices` names `{path}`, whose weight carries adapter {adapter!r} "
                    "already (from `targets` or `modules_to_save`); one adapter holds one update per tensor. "
                    "Leave that module out of `targets` with `exclude=`, or train its tokens in another adapter.")
            inject(model, lambda q, m, path=path: q == path, kind="tokens", token_indices=idx, adapter=adapter,
                   rules={nn.Module: rule})
    except BaseException:
        remove(model, adapter=adapter, merge=False)
        raise
    return model


# -- plan -----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Planned(Site):
    """A site ``inject`` will adapt: its rule, how its tensor is seen (``view``), and what the call
    did there, to roll back (``fresh``: it attached the LoRA; ``linked``: it parametrized the bias)."""

    rule: Rule
    view: View
    fresh: bool = False
    linked: bool = False
    tied: list = field(default_factory=list)  # the tensor's other users, (path, module, tensor name) (see _tied)


def _plan(model, targets, exclude, rules, adapter: str, dropout: float) -> list[_Planned]:
    """The sites that ``targets`` (less ``exclude``) select, each checked; nothing is changed yet.

    Raises:
        ValueError, TypeError: where a selected tensor cannot take the adapter (see :func:`_planned`),
            or nothing at all is selected.
    """
    select = matcher("inject", "targets", targets)
    leave = matcher("inject", "exclude", exclude) if exclude is not None else None
    sites, no_rule = [], []
    users = tensor_users(model)
    planned: set[int] = set()  # the stored tensors planned: a tied one once, at its first user
    for path, module in named_modules(model):
        if isinstance(module, LoRA) or not select(path, module):
            continue
        if leave is not None and leave(path, module):
            continue
        rule = find_rule(module, rules)
        if rule is None:
            no_rule.append((path, type_name(module)))
            continue
        for t in rule.tensor_names(module):
            if id(source(module, t)) not in planned:
                planned.add(id(source(module, t)))
                sites.append(_planned(path, module, rule, t, users, adapter, dropout))
    if not sites:
        raise _nothing_matched(no_rule, targets, model)
    return sites


def _planned(path: str, module: nn.Module, rule: Rule, tensor_name: str, users: dict[int, list],
             adapter: str, dropout: float) -> _Planned:
    """``module.<tensor_name>`` as a site to adapt, once it is checked that it can be; a tensor tied
    to other modules (``users``, see :func:`~lora_inject._tied.tensor_users`) at the user that
    holds its LoRA, if one does."""
    where = qualified(path, tensor_name)
    stored = source(module, tensor_name)
    if isinstance(stored, nn.parameter.UninitializedTensorMixin):
        raise ValueError(
            f"inject(): `{where}` of {type_name(module)} `{path}` is an uninitialised lazy tensor, with "
            "no shape yet. Run one forward through the model first (it sets the shapes), then inject; "
            "or leave the module out with `exclude=`.")
    if not stored.is_floating_point() and quant.scheme(stored) is None:
        raise TypeError(
            f"inject(): `{where}` has dtype {stored.dtype}; LoRA needs a floating-point "
            f"tensor. Leave {type_name(module)} `{path}` out with `exclude=`."
        )
    sharing = users.get(id(stored), [])
    if tied_to(module, tensor_name) is not None:  # adapted already at another user: the site is there
        path, module, tensor_name = next(u for u in sharing if find_lora(u[1], u[2]) is not None)
        where = qualified(path, tensor_name)
    rest = others("inject", where, sharing, module, tensor_name)
    lora = find_lora(module, tensor_name)
    if lora is not None and adapter in lora.adapters:
        raise ValueError(
            f"inject(): the adapter {adapter!r} already exists on `{where}`. Pass another "
            f"`adapter` name, or take it out first with remove(model, adapter={adapter!r})."
        )
    if getattr(module, "sparse", False) is True and not rule.is_factored(module):
        raise ValueError(
            f"inject(): {type_name(module)} `{path}` has sparse=True, but its lookup has no factored "
            "form (max_norm, scale_grad_by_freq or mode='max'), so LoRA merges its weight first, and a "
            "sparse gradient cannot flow from a merged weight into the factors. Set sparse=False on "
            "that layer, or leave it out with `exclude=`."
        )
    if dropout and not rule.is_factored(module):
        raise ValueError(
            f"inject(): `dropout`={dropout} needs a layer with a factored form, and "
            f"{type_name(module)} `{path}` has none (its weight is merged before its "
            "forward). Use dropout=0.0, or leave it out with `exclude=`."
        )
    plist = parametrized(module).get(tensor_name)
    if plist is None:
        shape = quant.shape(stored)
    else:  # what the parametrizations give, read without changing their state
        with torch.no_grad(), kept(list(plist)):
            shape = getattr(module, tensor_name).shape
    return _Planned(path, module, tensor_name, lora, rule, View(tuple(shape), rule.transpose, rule.experts),
                    tied=[] if lora is not None else rest)


def _prepare(model: nn.Module, sites: list[_Planned], spec: Spec) -> None:
    """Check the plan as a whole, and make what its sites share: LoRA's warning for a rank above a
    tensor's; another kind's refusals (a sparse lookup, a bias it cannot change with the weight)
    and its shared tensors."""
    if spec.kind is None:
        small = [site.where for site in sites if spec.r > min(site.view.out_features, site.view.in_features)]
        if small:
            warnings.warn(
                f"inject(): r={spec.r} exceeds min(out, in) of {small[:3]}: the update is still exact, "
                "but a smaller r adds nothing.",
                UserWarning,
                stacklevel=3,
            )
        return
    kind, name = spec.kind, spec.kind.name
    sparse = next((site for site in sites if getattr(site.module, "sparse", False) is True), None)
    if sparse is not None:
        raise ValueError(
            f"inject(kind={name!r}): {type_name(sparse.module)} `{sparse.path}` has "
            f"sparse=True, but {name!r} merges its update into the weight before the lookup, and a sparse "
            "gradient cannot flow from a merged weight into its tensors. Set sparse=False on that layer, "
            "or leave it out with `exclude=`.")
    for site in sites:
        if kind.biased(spec.record(site).options):
            _bias_name(name, site)
    if kind.shared is not None:
        spec.shared = kind.shared([site.view for site in sites], spec.r, spec.options)


def _bias_name(kind: str, site: _Planned) -> str | None:
    """The bias of the site's module that goes with its tensor, for a kind that changes it, or None.

    Raises:
        ValueError: where the rule does not say, or the bias does not fit the tensor's outputs.
    """
    module, rule, view = site.module, site.rule, site.view
    if rule.bias is None:
        if getattr(module, "bias", None) is None:
            return None
        raise ValueError(
            f"inject(kind={kind!r}): {kind!r} changes the bias with `{site.where}`, but the rule for "
            f"{type_name(module)} does not say which bias goes with {site.tensor_name!r}. Give the rule "
            "`bias=` (Rule(..., bias=lambda tensor_name: 'bias'), or lambda tensor_name: None for none), "
            "or leave the module out with `exclude=`.")
    bias = rule.bias(site.tensor_name)
    if bias is None or bias not in module._parameters and bias not in parametrized(module) or (
            bias in module._parameters and module._parameters[bias] is None):
        return None
    plist = parametrized(module).get(bias)
    b = source(module, bias)
    want = (*view.lead, view.out_features)
    if tuple(b.shape) != want or (plist is not None and not (len(plist) == 1 and isinstance(plist[0], Bias))):
        why = (f"has shape {tuple(b.shape)}, not the {want} of the tensor's outputs" if tuple(b.shape) != want
               else "is parametrized by another parametrization")
        raise ValueError(
            f"inject(kind={kind!r}): {kind!r} changes the bias with `{site.where}`, and its bias "
            f"`{qualified(site.path, bias)}` {why}, so it cannot be changed with it. Leave the module out "
            "with `exclude=`, or use another kind.")
    return bias


# -- attach, fill, roll back ------------------------------------------------------------------------
def _attach(site: _Planned, adapter: str, spec: Spec, dtype: torch.dtype | None) -> None:
    """Add adapter ``adapter`` on ``site``: a LoRA parametrization first where the tensor has none,
    then the adapter's record and tensors, then (for a kind that changes it) the bias's link."""
    module, tensor_name = site.module, site.tensor_name
    if site.lora is None:
        site.lora, site.fresh = _new_lora(site), True
        _register(site)
    lora, stored = site.lora, site.stored
    lora.add(adapter, spec.record(site), dtype=dtype or quant.dtype(stored), device=stored.device,
             shared=spec.share(lora.view))
    if spec.kind is not None and spec.kind.biased(lora.adapter(adapter).options) and "bias_link" not in lora.__dict__:
        bias = _bias_name(spec.kind.name, site)
        if bias is not None:
            parametrize.register_parametrization(module, bias, Bias(lora, tensor_name))
            own_setter(module, bias)  # functional_call swaps the stored bias, as it does W0
            lora.__dict__["bias_link"] = bias
            site.linked = True


def _new_lora(site: _Planned) -> LoRA:
    """An empty LoRA for ``site``, with what :func:`detach` needs to put the module back."""
    module, view = site.module, site.view
    # A tied tensor's users run their own ops on it: the fast path where every one has it.
    factored = site.rule.is_factored(module) and all(
        (rule := find_rule(m)) is not None and rule.is_factored(m) for _, m, _ in site.tied)
    lora = LoRA(view.shape, transpose=view.transpose, experts=view.experts, factored=factored)
    # The module's order before any of our parametrizations, so that removing its
    # tensors in any order restores it (a later LoRA sees the earlier tensors gone).
    ours = [p for p in module_loras(module) if hasattr(p, "param_order")]
    lora.param_order = ours[0].param_order if ours else list(module._parameters)
    # parametrize registers the original as a persistent buffer: keep a
    # non-persistent one out of the state dict, as it was.
    lora.non_persistent = site.tensor_name in module._non_persistent_buffers_set and (
        site.tensor_name not in parametrized(module))
    return lora


def _register(site: _Planned) -> None:
    """Register the site's new LoRA on its tensor, and give the module what an adapted one needs
    (see :mod:`lora_inject._module_class` and :mod:`lora_inject._hooks`)."""
    module, tensor_name, lora = site.module, site.tensor_name, site.lora
    # A quantized weight carries its whole state while LoRA holds it (bitsandbytes'
    # Linear8bitLt moves its scales to the module in a forward): DoRA, PiSSA, the
    # weight's value and remove(merge=True) read the weight alone.
    quant.adopt(module, site.stored)
    # Registered while empty, so parametrize's check runs the identity; filled below.
    # parametrize reads the tensor through the ones already there: keep their state
    with kept(list(parametrized(module).get(tensor_name, ()))):
        _register_parametrization(module, tensor_name, lora)
    if lora.non_persistent:
        module.parametrizations[tensor_name]._non_persistent_buffers_set.add("original")
    own_class(module)
    own_setter(module, tensor_name)
    if getattr(quant.scheme(site.stored), "own_forward", False):
        own_forward(module, tensor_name)
    hook(module)
    tie(lora, site.where, site.tied)  # the tensor's other users read this LoRA


def _starts(sites: list[_Planned], spec: Spec, dense) -> dict[str, tuple[Tensor, Tensor]] | None:
    """LoftQ's starting factors for each site, by its path (``init="loftq"``; see
    :func:`~lora_inject._inits.loftq_factors`), or None for the other inits."""
    if dense is None:
        return None
    return loftq_factors([(site.where, site.stored, site.view) for site in sites], dense, spec.r,
                         lora_scaling(spec.r, spec.alpha, spec.rslora))


def _fill(sites: list[_Planned], adapter: str, starts: dict[str, tuple[Tensor, Tensor]] | None = None) -> None:
    """Give the new adapters what they read from the weight they receive: PiSSA/OLoRA factors,
    DoRA's magnitudes, another kind's :attr:`~lora_inject.Kind.fill` (once every site is attached),
    LoftQ's ``starts``."""
    for site in sites:
        if starts is not None:
            A, B = starts[site.where]
            with torch.no_grad():
                site.lora.lora_A[adapter].copy_(A)
                site.lora.lora_B[adapter].copy_(B)
            continue
        a = site.lora.adapter(adapter)
        if a.dora or a.init in WEIGHT_INITS or a.kind != "lora" and find_kind(a.kind).fill is not None:
            init_from_weight(site.lora, adapter, site.received)


def _roll_back(sites: list[_Planned], adapter: str, frozen: list[Tensor]) -> None:
    """Undo what ``inject`` did on ``sites`` so far, last first: the model is as it was."""
    for site in reversed(sites):
        if site.linked:
            unlink_bias(site.module, find_lora(site.module, site.tensor_name))
    for site in reversed(sites):
        lora = site.lora
        if lora is None:
            continue
        if adapter in lora.adapters:
            lora.drop(adapter)
        if site.fresh and find_lora(site.module, site.tensor_name) is lora:
            detach(site)
    for t in frozen:
        t.requires_grad_(True)


def _register_parametrization(module: nn.Module, tensor_name: str, lora: LoRA) -> None:
    """``register_parametrization``, also where the tensor is a wrapper subclass (a torchao weight)
    that an earlier forward's autograd graph still references.

    parametrize sets such an original to itself with ``swap_tensors``, which refuses a tensor with
    other references. A fresh wrapper of the same data stands in while it registers, and the very
    tensor goes back in its place after, so ``remove(merge=False)`` returns that tensor.
    """
    original = module._parameters.get(tensor_name)
    if original is None or not is_traceable_wrapper_subclass(original):
        parametrize.register_parametrization(module, tensor_name, lora)
        return
    module._parameters[tensor_name] = nn.Parameter(original.detach(), requires_grad=original.requires_grad)
    try:
        parametrize.register_parametrization(module, tensor_name, lora)
    except BaseException:
        module._parameters[tensor_name] = original
        raise
    module.parametrizations[tensor_name].original = original


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _nothing_matched(no_rule: list[tuple[str, str]], targets, model: nn.Module) -> ValueError:
    how = ("Register a rule with lora_inject.register_rule(MyType, lora_inject.Rule(('weight',))), "
           "or pass `rules=`.")
    if not no_rule:
        names = itertools.islice(((q, type_name(m)) for q, m in named_modules(model) if q), 5)
        some = ", ".join(f"{q} ({t})" for q, t in names)
        return ValueError(
            f"inject(): `targets`={targets!r} matched no module name (after `exclude`). Names are "
            f"searched with re.search in model.named_modules(), such as {some}; check them with "
            "[n for n, _ in model.named_modules()]."
        )
    shown = ", ".join(f"{q or '<root>'} ({t})" for q, t in no_rule[:5])
    more = f" and {len(no_rule) - 5} more" if len(no_rule) > 5 else ""
    return ValueError(
        f"inject(): `targets`={targets!r} matched only modules whose types have no rule: "
        f"{shown}{more}. {how}"
    )


# -- remove ---------------------------------------------------------------------------------------
def remove(model: M, *, merge: bool = True, adapter: str | Sequence[str] | None = None,
           dequantize: bool = False) -> M:
    r"""Remove LoRA adapters from ``model`` in place, merging them into ``W0`` or not.

    With ``merge=True`` every removed adapter that is active is folded into ``W0``: the sum
    is computed in float32 (or wider) and cast to the weight's dtype. With ``merge=False``
    the updates are discarded and ``W0`` is restored bit for bit. Either way the Parameter
    objects keep their identity, so an optimizer holding them stays valid; a module with no
    parametrization left gets its class back and loses its ``parametrizations`` attribute,
    and ``model.state_dict()`` has the original keys again. Parametrizations that are not
    ours (``weight_norm``, ``orthogonal``) stay where they were.

    A quantized ``W0`` (torchao's ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ``NF4Tensor``;
    bitsandbytes' ``Params4bit``, ``Int8Params``) is given back as the very same tensor with
    ``merge=False``. With ``merge=True`` it is dequantized, ``ΔW`` is added in float32, and the sum
    is requantized in the weight's own scheme (same type, block sizes, quantization type, mapping
    and zero points, scale dtype), as a new tensor, rounding as quantizing the merged weight
    afresh with the same config would; requantizing rounds, and a :class:`RequantizationWarning`
    reports the largest change it made (relative to the weight's largest entry) and where. With
    ``dequantize=True`` the weight is written dense instead (the merged one with ``merge=True``,
    else ``W0``), in its logical dtype, for export; a bitsandbytes layer then becomes a plain ``nn.Linear``.

    Args:
        model (nn.Module): the model to change in place.
        merge (bool): fold the active updates into the weights. Default: ``True``.
        adapter (str or sequence of str, optional): the adapters to remove. Default: all.
        dequantize (bool): write quantized weights dense. Default: ``False``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``merge`` or ``dequantize`` is not a bool, or ``adapter`` is not a str, a
            sequence of str or None.
        ValueError: if an adapter name is not in the model, a merged weight would not be
            finite, the merge would leave other active adapters on a tensor where one of
            them, or a merged one, is DoRA (its norm depends on ``W0``), a merged adapter comes
            after a staying one on a tensor where a kind that is not a sum (OFT, IA³) is
            involved (adapters apply in the order they were injected), or a quantized weight's
            scheme cannot be rebuilt (torchao's per-group ``Int8Tensor``: pass
            ``dequantize=True``). Every tensor is checked before any is written, so the model
            is left unchanged.
        RuntimeError: if a parametrization registered before ours cannot represent the
            merged weight, so merging is ill-defined (the model is left unchanged); use
            ``merge=False`` or remove that parametrization first.
    """
    if not isinstance(merge, bool):
        raise TypeError(f"remove(): `merge` must be a bool, got {merge!r}.")
    if not isinstance(dequantize, bool):
        raise TypeError(f"remove(): `dequantize` must be a bool, got {dequantize!r}.")
    entries = list(loras(model))
    names = adapter_names("remove", entries, adapter)
    # Two phases: every site is checked, and every quantized weight's requantization decided,
    # before anything is written; a refusal leaves the model unchanged.
    plans = [plan for site in entries if (plan := removal(site, names, merge, dequantize)) is not None]
    rounding: list[tuple[float, str]] = []  # requantized: (largest relative change, where)
    for plan in plans:
        take_off(plan, dequantize, rounding)
    if rounding:
        worst, where = max(rounding)
        warnings.warn(f"remove(): merged into {len(rounding)} quantized weight(s) and requantized them; "
                      f"requantizing changed them by up to {worst:.3g} of a weight's largest entry (at "
                      f"`{where}`). Pass dequantize=True for dense weights that keep the update exactly.",
                      RequantizationWarning, stacklevel=2)
    return model


