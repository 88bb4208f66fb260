"""Model surgery: ``inject`` LoRA into a model in place, and ``remove`` it again."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .inits import WEIGHT_INITS, init_from_weight
from .lora import INITS, LoRA, check_adapter_name, compute_dtype
from .rule import Rule, RuleKey, find_rule, type_name

__all__ = ["inject", "remove"]

M = TypeVar("M", bound=nn.Module)
Target = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


def inject(
    model: M,
    targets: Target,
    *,
    r: int = 8,
    alpha: float | None = None,
    adapter: str = "default",
    exclude: Target | None = None,
    dropout: float = 0.0,
    init: str = "default",
    rules: Mapping[RuleKey, Rule] | None = None,
    dtype: torch.dtype | None = None,
    rslora: bool = False,
    dora: bool = False,
) -> M:
    r"""Add a LoRA adapter, in place, to every module of ``model`` that ``targets`` selects.

    Each selected module whose type has a :class:`~lora_inject.Rule` gets a
    :class:`~lora_inject.LoRA` parametrization on every tensor its rule names, so that
    ``module.weight`` reads ``W0 + (alpha / r) * B @ A``. The module's class, forward, hooks
    and attributes stay; ``isinstance`` holds. The state-dict key ``p.weight`` becomes
    ``p.parametrizations.weight.original``, and the factors appear as
    ``p.parametrizations.weight.<i>.lora_A.<adapter>`` and ``...lora_B.<adapter>``.
    A base checkpoint with the old keys still loads into the injected model.

    The default init (``A`` Kaiming-uniform, ``B`` zero) leaves every output unchanged.
    The call is atomic: if it raises, the model is exactly as it was.

    Args:
        model (nn.Module): the model to change in place.
        targets (str, re.Pattern or callable): a regex *searched* in each qualified module
            name (``"attn"`` reaches ``transformer.h.0.attn.c_attn``), a compiled pattern, or
            ``f(name, module) -> bool``.
        r (int): the rank. Default: 8.
        alpha (float, optional): the scaling numerator; the update is scaled by
            ``alpha / r``. Default: ``None``, meaning ``alpha = r`` (a scaling of 1).
        adapter (str): the adapter's name; several can live on one tensor. Default: ``"default"``.
        exclude (same kinds as ``targets``, optional): modules to leave out; wins over ``targets``.
        dropout (float): dropout on the input of the LoRA branch, for factored layers
            (Linear, Conv1D, Embedding, Conv with groups=1). Default: 0.0.
        init (str): ``"default"`` or ``"gaussian"`` (``A ~ N(0, 1/r)``), with ``B`` zero in both;
            or ``"pissa"``/``"olora"``: ``A`` and ``B`` from the SVD/QR of ``W0``, as in peft,
            with the initial factors kept frozen so that the weight is unchanged at init and
            ``W0`` is never written (see :mod:`lora_inject.inits`).
        rules (mapping, optional): a registry to use instead of the default one
            (see :func:`~lora_inject.default_rules`).
        dtype (torch.dtype, optional): the factors' dtype, such as ``torch.float32`` on a
            half-precision model. Default: the weight's dtype.
        rslora (bool): scale the update by ``alpha / sqrt(r)`` (rank-stabilised LoRA, peft's
            ``use_rslora``) instead of ``alpha / r``. Default: ``False``.
        dora (bool): DoRA: the weight becomes ``m * (W0 + s * B @ A) / ||W0 + s * B @ A||`` with a
            trainable magnitude ``m`` per output unit, initialised so that the model is unchanged
            (see :mod:`lora_inject.dora`). Default: ``False``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``targets``/``exclude`` is of the wrong kind, ``r`` is not an int, ``alpha``
            is not a number,
            ``adapter`` is not a str, ``dtype`` is not a floating dtype, ``rslora`` or ``dora``
            is not a bool, ``rules`` is not a mapping to :class:`~lora_inject.Rule`, or a
            selected tensor is not floating point.
        ValueError: if ``r`` is not positive, ``alpha`` is not finite, a regex is invalid,
            ``init`` or ``adapter`` is not valid, ``init="pissa"`` has ``alpha <= 0``,
            ``dropout`` is outside [0, 1) or set on a layer without a factored form, the
            adapter already exists on a selected tensor, a selected tensor is shared with
            another module, a rule names a tensor the module lacks, or nothing at all is selected.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> inject(model, r"^0$", r=2, alpha=4)
        >>> model[0].parametrizations.weight[0].lora_A["default"].shape
        torch.Size([2, 4])
    """
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"inject(): `r` must be a positive int, got {r!r}.")
    if r <= 0:
        raise ValueError(f"inject(): `r` must be a positive int, got {r}. Try r=8.")
    alpha = float(r) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"inject(): `alpha` must be a finite number, got {alpha!r}. Try alpha={2 * r}.")
    if not math.isfinite(alpha):
        raise ValueError(f"inject(): `alpha` must be a finite number, got {alpha!r}. Try alpha={2 * r}.")
    check_adapter_name("inject", adapter)
    if init not in INITS:
        raise ValueError(f"inject(): `init` must be one of {INITS}, got {init!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"inject(): `dropout` must be a number in [0, 1), got {dropout!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"inject(): `dtype` must be a floating torch.dtype or None, got {dtype!r}.")
    if not isinstance(rslora, bool):
        raise TypeError(f"inject(): `rslora` must be a bool, got {type(rslora).__name__}.")
    if not isinstance(dora, bool):
        raise TypeError(f"inject(): `dora` must be a bool, got {type(dora).__name__}.")
    if rules is not None and not (isinstance(rules, Mapping) and all(isinstance(v, Rule) for v in rules.values())):
        raise TypeError(f"inject(): `rules` must be None or a mapping from module types to lora_inject.Rule, "
                        f"such as lora_inject.default_rules(), got {type(rules).__name__}.")
    if init == "pissa" and alpha <= 0:
        raise ValueError(f"inject(): init='pissa' splits W0's singular values by the scaling, so `alpha` "
                         f"must be positive, got {alpha}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject(): `model` must be an nn.Module, got {type(model).__name__}.")
    select = matcher("inject", "targets", targets)
    leave = matcher("inject", "exclude", exclude) if exclude is not None else None

    plan = _plan(model, select, leave, rules, adapter, dropout, targets)
    spec = targets if isinstance(targets, str) else getattr(targets, "pattern", None)
    small = [f"{q}.{t}" if q else t for q, m, rule, t, shape in plan if r > min(_dims(shape, rule))]
    if small:
        warnings.warn(
            f"inject(): r={r} exceeds min(out, in) of {small[:3]}: the update is still exact, "
            "but a smaller r adds nothing.",
            UserWarning,
            stacklevel=2,
        )

    done: list[tuple[nn.Module, str, LoRA, bool]] = []
    try:
        for _, module, rule, tensor_name, shape in plan:
            lora = find_lora(module, tensor_name)
            fresh = lora is None
            if fresh:
                lora = LoRA(shape, transpose=rule.transpose, experts=rule.experts,
                            factored=rule.is_factored(module))
                # The module's order before any of our parametrizations, so that removing its
                # tensors in any order restores it (a later LoRA sees the earlier tensors gone).
                ours = [p for p in _module_loras(module) if hasattr(p, "param_order")]
                lora.param_order = ours[0].param_order if ours else list(module._parameters)
                new_class = not parametrize.is_parametrized(module)
            done.append((module, tensor_name, lora, fresh))
            if fresh:
                # Registered while empty, so parametrize's check runs the identity; filled below.
                parametrize.register_parametrization(module, tensor_name, lora)
                if new_class:
                    _own_class_on_copy(module)
                    type(module).__getstate__ = _refuse_pickle
                _hook(module)
            original = _source(module, tensor_name)
            lora.add(adapter, r=r, alpha=alpha, dropout=dropout, init=init,
                     dtype=dtype or original.dtype, device=original.device, targets=spec, rslora=rslora,
                     dora=dora)
        if dora or init in WEIGHT_INITS:  # these read the weight that LoRA receives
            for module, tensor_name, lora, _ in done:
                init_from_weight(lora, adapter, _lora_input(module, tensor_name, lora))
    except BaseException:
        for module, tensor_name, lora, fresh in reversed(done):
            if adapter in lora.adapters:
                lora.drop(adapter)
            if fresh and find_lora(module, tensor_name) is lora:
                _detach(module, tensor_name, lora)
        raise
    return model


def remove(model: M, *, merge: bool = True, adapter: str | Sequence[str] | None = None) -> M:
    r"""Remove LoRA adapters from ``model`` in place, merging them into ``W0`` or not.

    With ``merge=True`` every removed adapter that is active is folded into ``W0``: the sum
    is computed in float32 (or wider) and cast to the weight's dtype. With ``merge=False``
    the updates are discarded and ``W0`` is restored bit for bit. Either way the Parameter
    objects keep their identity, so an optimizer holding them stays valid; a module with no
    parametrization left gets its class back and loses its ``parametrizations`` attribute,
    and ``model.state_dict()`` has the original keys again. Parametrizations that are not
    ours (``weight_norm``, ``orthogonal``) stay where they were.

    Args:
        model (nn.Module): the model to change in place.
        merge (bool): fold the active updates into the weights. Default: ``True``.
        adapter (str or sequence of str, optional): the adapters to remove. Default: all.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``merge`` is not a bool, or ``adapter`` is not a str, a sequence of str
            or None.
        ValueError: if an adapter name is not in the model, or a merged weight would not be
            finite (the model is left unchanged).
        RuntimeError: if a parametrization registered before ours cannot represent the
            merged weight, so merging is ill-defined (the model is left unchanged); use
            ``merge=False`` or remove that parametrization first.
    """
    if not isinstance(merge, bool):
        raise TypeError(f"remove(): `merge` must be a bool, got {merge!r}.")
    entries = list(_loras(model))
    names = _adapter_names("remove", entries, adapter)
    plans = []
    for qualname, module, tensor_name, lora in entries:
        mine = [n for n in lora.adapters if names is None or n in names]
        if not mine:
            continue
        merge_now = [n for n in mine if n in lora.active] if merge else []
        if merge_now:
            _merge_into_originals(qualname, module, tensor_name, lora, merge_now, write=False)
        plans.append((qualname, module, tensor_name, lora, mine, merge_now))
    for qualname, module, tensor_name, lora, mine, merge_now in plans:
        if merge_now:
            _merge_into_originals(qualname, module, tensor_name, lora, merge_now, write=True)
        for name in mine:
            lora.drop(name)
        if not lora.adapters:
            _detach(module, tensor_name, lora)
    return model


# -- matching ------------------------------------------------------------------------------
def matcher(fn: str, arg: str, spec: object) -> Callable[[str, nn.Module], bool]:
    """Turn a regex str, compiled pattern or ``f(name, module)`` into one predicate."""
    if isinstance(spec, str):
        try:
            spec = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{fn}(): `{arg}` is not a valid regex: {spec!r} ({e}).") from None
    if isinstance(spec, re.Pattern):
        pattern = spec
        return lambda name, module: pattern.search(name) is not None
    if callable(spec):
        return spec  # type: ignore[return-value]
    raise TypeError(
        f"{fn}(): `{arg}` must be a regex str, a compiled re.Pattern or a callable "
        f"(name, module) -> bool, got {type(spec).__name__}."
    )


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()``, without the inside of ``parametrizations`` containers."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = [
            (f"{name}.{n}" if name else n, c)
            for n, c in module._modules.items()
            if c is not None and not (n == "parametrizations" and parametrize.is_parametrized(module))
        ]
        stack.extend(reversed(children))


def _plan(model, select, leave, rules, adapter, dropout, targets=None):
    plan, no_rule, names_seen = [], [], []
    owners = _tensor_owners(model)
    for qualname, module in named_modules(model):
        if isinstance(module, LoRA) or not select(qualname, module):
            continue
        if leave is not None and leave(qualname, module):
            continue
        rule = find_rule(module, rules)
        if rule is None:
            no_rule.append((qualname, type_name(module)))
            continue
        names_seen.append(qualname)
        for tensor_name in rule.tensor_names(module):
            where = f"{qualname}.{tensor_name}" if qualname else tensor_name
            source = _source(module, tensor_name)
            if not source.is_floating_point():
                raise TypeError(
                    f"inject(): `{where}` has dtype {source.dtype}; LoRA needs a floating-point "
                    f"tensor. Leave {type_name(module)} `{qualname}` out with `exclude=`."
                )
            shared = owners.get(id(source), [])
            if len(shared) > 1:
                raise ValueError(
                    f"inject(): `{where}` is one tensor shared by {shared}. An adapter on it "
                    "would change the other modules too, and merging would change them "
                    "silently. Untie the weights, or leave these modules out with `exclude=`."
                )
            lora = find_lora(module, tensor_name)
            if lora is not None and adapter in lora.adapters:
                raise ValueError(
                    f"inject(): the adapter {adapter!r} already exists on `{where}`. Pass another "
                    f"`adapter` name, or take it out first with remove(model, adapter={adapter!r})."
                )
            if dropout and not rule.is_factored(module):
                raise ValueError(
                    f"inject(): `dropout`={dropout} needs a layer with a factored form, and "
                    f"{type_name(module)} `{qualname}` has none (its weight is merged before its "
                    "forward). Use dropout=0.0, or leave it out with `exclude=`."
                )
            parametrized = tensor_name in _parametrized(module)
            shape = getattr(module, tensor_name).shape if parametrized else source.shape
            plan.append((qualname, module, rule, tensor_name, shape))
    if not plan:
        raise _nothing_matched(no_rule, targets, model)
    return plan


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


def _dims(shape, rule: Rule) -> tuple[int, int]:
    core = shape[1:] if rule.experts else shape
    if rule.transpose:
        return core[-1], core[0]
    return core[0], math.prod(core[1:])


def _tensor_owners(model: nn.Module) -> dict[int, list[str]]:
    """Map each tensor's id to the qualified names it is stored under (once per module)."""
    owners: dict[int, list[str]] = {}
    for qualname, module in model.named_modules():
        for n, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                owners.setdefault(id(t), []).append(f"{qualname}.{n}" if qualname else n)
    return owners


# -- the parametrizations on one module ------------------------------------------------------
def _parametrized(module: nn.Module) -> dict:
    """``module.parametrizations`` as a dict (tensor name -> ParametrizationList), or ``{}``."""
    plists = module._modules.get("parametrizations")  # no getattr: a miss would raise inside
    return dict(plists._modules) if isinstance(plists, nn.ModuleDict) else {}


def find_lora(module: nn.Module, tensor_name: str) -> LoRA | None:
    """Return our parametrization on ``module.<tensor_name>``, or None."""
    plist = _parametrized(module).get(tensor_name)
    return next((p for p in plist if isinstance(p, LoRA)), None) if plist is not None else None


def _source(module: nn.Module, tensor_name: str) -> Tensor:
    """The stored tensor under ``tensor_name``: the parameter itself, or the first original."""
    plist = _parametrized(module).get(tensor_name)
    if plist is None:
        return getattr(module, tensor_name)
    return plist.original if plist.is_tensor else plist.original0


def _lora_input(module: nn.Module, tensor_name: str, lora: LoRA) -> Tensor:
    """The tensor that ``lora`` receives: the original, through the parametrizations before it."""
    plist = module.parametrizations[tensor_name]
    index = list(plist).index(lora)
    if index == 0:
        return plist.original if plist.is_tensor else plist.original0
    originals = [plist.original] if plist.is_tensor else [
        getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    with torch.no_grad():
        out = plist[0](*originals)
        for p in list(plist)[1:index]:
            out = p(out)
    return out


def _loras(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LoRA]]:
    for qualname, module in named_modules(model):
        for tensor_name, plist in _parametrized(module).items():
            for p in plist:
                if isinstance(p, LoRA):
                    yield qualname, module, tensor_name, p


def _adapter_names(fn: str, entries, adapter) -> set[str] | None:
    if adapter is None:
        return None
    names = [adapter] if isinstance(adapter, str) else adapter
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{fn}(): `adapter` must be a str, a sequence of str or None, got {adapter!r}.")
    present = {n for *_, lora in entries for n in lora.adapters}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(
            f"{fn}(): no adapter named {missing[0]!r} in the model; it has {sorted(present)}."
        )
    return set(names)


def _merge_into_originals(qualname, module, tensor_name, lora, names, *, write: bool) -> None:
    """Fold ``names`` of ``lora`` into the originals of ``module.<tensor_name>``.

    With ``write=False`` only check that it can be done: a finite result, and, when other
    parametrizations come before ours, that they can represent it.
    """
    where = f"{qualname}.{tensor_name}" if qualname else tensor_name
    plist = module.parametrizations[tensor_name]
    index = list(plist).index(lora)
    non_finite = ValueError(
        f"remove(): merging adapter(s) {names} into `{where}` gives non-finite values "
        "(NaN or inf in lora_A/lora_B or in the weight, or overflow in the weight's dtype). "
        "The model is unchanged; fix the factors, or remove with merge=False."
    )
    with torch.no_grad():
        if index == 0:  # ours comes first: the originals are W0 itself
            if write:
                lora.merge_(plist.original, names)
            elif not lora.merge_is_finite(plist.original, names):
                raise non_finite
            return
        originals = [plist.original] if plist.is_tensor else [
            getattr(plist, f"original{i}") for i in range(plist.ntensors)]
        before = plist[0](*originals)
        for p in list(plist)[1:index]:
            before = p(before)
        target = lora.merged(before, names)
        if target.device.type != "meta" and not torch.isfinite(target).all():
            raise non_finite
        # A right_inverse may set its own tensors (orthogonal's `base`): a check must not keep them.
        saved = [] if write else [
            (d, dict(d), {k: v.clone() for k, v in d.items() if v is not None})
            for p in list(plist)[:index] for q in p.modules() for d in (q._parameters, q._buffers)]
        try:
            new = target
            for p in reversed(list(plist)[:index]):
                new = p.right_inverse(new) if hasattr(p, "right_inverse") else new
            new = [new] if isinstance(new, Tensor) else list(new)
            check = plist[0](*new)
            for p in list(plist)[1:index]:
                check = p(check)
        finally:
            for d, tensors, values in saved:
                d.clear()
                d.update(tensors)
                for k, v in values.items():
                    tensors[k].copy_(v)
        tol = 1e-3 if compute_dtype(target.dtype) != target.dtype else 1e-5
        if check.shape != target.shape or not torch.allclose(check, target, rtol=tol, atol=tol):
            raise RuntimeError(
                f"remove(): cannot merge into `{where}`: the parametrization "
                f"{type(plist[index - 1]).__name__} registered before LoRA cannot represent "
                "W + ΔW, so merging is ill-defined. The model is unchanged; use merge=False, "
                "or remove that parametrization first."
            )
        if write:
            for o, n in zip(originals, new):
                o.copy_(n)


def _detach(module: nn.Module, tensor_name: str, lora: LoRA) -> None:
    """Take ``lora`` off ``module.<tensor_name>``, leaving the originals as they are."""
    plist = module.parametrizations[tensor_name]
    if len(plist) == 1:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    else:
        del plist[list(plist).index(lora)]
    order = getattr(lora, "param_order", None)
    if order is not None and tensor_name in module._parameters:
        params = module._parameters
        kept = {k: params[k] for k in order if k in params}
        kept.update({k: v for k, v in params.items() if k not in kept})
        params.clear()
        params.update(kept)
    if not any(find_lora(module, t) for t in _parametrized(module)):
        _unhook(module)


def _own_class_on_copy(module: nn.Module) -> None:
    """Make ``copy.deepcopy(module)`` give the copy a class of its own.

    parametrize keeps a parametrized module's properties on a class made for that one module
    and edits it in place, but its deepcopy shares that class with the copy: removing LoRA
    from the copy would then take the property off the original too.
    """
    cls = type(module)
    base = cls.__deepcopy__

    def __deepcopy__(self, memo):
        replica = base(self, memo)
        if type(replica) is type(self):
            own = type(self)
            body = {k: v for k, v in vars(own).items() if k not in ("__dict__", "__weakref__")}
            replica.__class__ = type(own.__name__, own.__bases__, body)
        return replica

    cls.__deepcopy__ = __deepcopy__


def _refuse_pickle(self: nn.Module):
    """Replace parametrize's refusal to pickle (``torch.save(model)``) with one that says what to do."""
    raise RuntimeError(
        f"torch.save(model) and pickle cannot save the parametrized {type_name(self)} module: "
        "PyTorch saves parametrized modules only through state_dict(). Save the adapter with "
        "lora_inject.save_adapter(model, path) or torch.save(lora_inject.lora_state_dict(model), path); "
        "or take LoRA out with lora_inject.remove(model) (merging it) to get a plain model that pickles."
    )


# -- hooks on the adapted module -------------------------------------------------------------
def _open_memo(module: nn.Module, args) -> None:
    for lora in _module_loras(module):
        lora.memo_depth += 1


def _close_memo(module: nn.Module, args, output) -> None:
    for lora in _module_loras(module):
        lora.memo_depth = max(lora.memo_depth - 1, 0)
        if not lora.memo_depth:
            lora.memo = None
    # RNNs keep the weights their forward read in `_flat_weights`: with LoRA these are computed
    # tensors, which would hold this step's graph and make deepcopy fail. Keep them detached.
    flat = module.__dict__.get("_flat_weights")
    if flat is not None:
        module.__dict__["_flat_weights"] = [
            w.detach() if isinstance(w, Tensor) and w.grad_fn is not None else w for w in flat]


def _module_loras(module: nn.Module) -> list[LoRA]:
    return [p for plist in _parametrized(module).values() for p in plist if isinstance(p, LoRA)]


def _load_base_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Let a checkpoint saved before injection (``p.weight``) load into the injected model."""
    for tensor_name, plist in _parametrized(module).items():
        key = prefix + tensor_name
        inner = f"{prefix}parametrizations.{tensor_name}."
        if key not in state_dict or not any(isinstance(p, LoRA) for p in plist):
            continue
        if any(k.startswith(inner + "original") for k in state_dict):
            continue
        value = state_dict.pop(key)
        with torch.no_grad():
            for p in reversed(list(plist)):
                value = p.right_inverse(value) if hasattr(p, "right_inverse") else value
        if isinstance(value, Tensor):
            state_dict[inner + "original"] = value
        else:
            for i, v in enumerate(value):
                state_dict[f"{inner}original{i}"] = v


def _hook(module: nn.Module) -> None:
    """Hook the adapted module: base checkpoints load into it, and while its forward runs, the
    merged-path weights are built once (RNNs and MultiheadAttention read them several times)."""
    found = {getattr(hook, "hook", hook) for hooks, key in _find_hooks(module) for hook in [hooks[key]]}
    if _load_base_keys not in found:
        module.register_load_state_dict_pre_hook(_load_base_keys)
    if _open_memo not in found and not all(lora.factored for lora in _module_loras(module)):
        module.register_forward_pre_hook(_open_memo)
        module.register_forward_hook(_close_memo, always_call=True)


def _find_hooks(module: nn.Module) -> list[tuple[dict, int]]:
    found = []
    for hooks in (module._load_state_dict_pre_hooks, module._forward_pre_hooks, module._forward_hooks):
        for key, hook in hooks.items():
            if getattr(hook, "hook", hook) in (_load_base_keys, _open_memo, _close_memo):
                found.append((hooks, key))
    return found


def _unhook(module: nn.Module) -> None:
    for hooks, key in _find_hooks(module):
        del hooks[key]
        module._forward_hooks_always_called.pop(key, None)
