"""Adapters as entries, one per adapted tensor, whatever the format: read from a model, checked
against a model, and put into one."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .. import _quant as quant
from .._chain import find_lora, kept, parametrized, source
from .._dora import set_axis
from .._inits import OVERWRITTEN, WEIGHT_INITS
from .._selection import named_modules
from .._sites import loras
from .._view import View
from ..kind import find_kind
from ..lora import LoRA, check_adapter_name, lora_scaling
from ..params import refuse_flat_params
from ..rule import Rule, find_rule, own_tensor_names, type_name
from ..surgery import inject, remove

FACTORS = ("lora_A", "lora_B")
EXTRAS = ("lora_magnitude", "lora_A0", "lora_B0")  # what an adapter may hold besides its factors


@dataclass
class Entry:
    """One adapted tensor of a saved adapter: where it is, its factors and how to re-inject it."""

    module: str  # qualified module path
    tensor: str  # tensor name on that module
    type: str  # the module's type name
    shape: tuple[int, ...]  # the tensor's shape
    A: Tensor | None  # (r, in), or (E, r, in); None for another kind than LoRA
    B: Tensor | None  # (out, r), or (E, out, r); None for another kind than LoRA
    r: int | None
    alpha: float | None
    rslora: bool = False
    dropout: float = 0.0
    init: str = "default"
    targets: str | None = None
    transpose: bool = False
    experts: bool = False
    factored: bool = False
    dora: bool = False
    dora_axis: str = "out"  # DoRA's norm per output unit, or per input unit ("in": LyCORIS' wd_on_out=False)
    # lora_magnitude (DoRA), lora_A0/lora_B0 (pissa/olora); another kind: all its tensors, by name
    extra: dict[str, Tensor] = field(default_factory=dict)
    kind: str = "lora"
    options: dict = field(default_factory=dict)  # the kind's options, resolved for this tensor

    def cast(self, dtype: torch.dtype) -> Entry:
        """This entry with its tensors in ``dtype``."""
        return replace(self, A=None if self.A is None else self.A.to(dtype),
                       B=None if self.B is None else self.B.to(dtype),
                       extra={k: t.to(dtype) for k, t in self.extra.items()})

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the entry, by name: ``lora_A``, ``lora_B`` and the extras."""
        factors = {} if self.A is None else {"lora_A": self.A, "lora_B": self.B}
        return {**factors, **self.extra}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def key(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class Copy:
    """An integer tensor of a saved adapter (a BatchNorm's ``num_batches_tracked``): no update can
    hold it, so a load copies it into the model's tensor exactly, once everything else is checked."""

    module: str
    tensor: str
    value: Tensor

    @property
    def key(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


def tensor_shape(module: nn.Module, tensor_name: str) -> tuple[int, ...]:
    """The shape ``module.<tensor_name>`` reads as, without computing a parametrization if avoidable."""
    lora = find_lora(module, tensor_name)
    if lora is not None:
        return tuple(lora.view.shape)
    if tensor_name in parametrized(module):
        with torch.no_grad(), kept(list(parametrized(module)[tensor_name])):
            return tuple(getattr(module, tensor_name).shape)
    return tuple(quant.shape(source(module, tensor_name)))


def check_entries(fn: str, model: nn.Module, entries: Sequence[Entry]) -> None:
    """Raise unless every entry fits ``model``: module path, type, tensor, shapes, layout."""
    modules = dict(named_modules(model))
    for e in entries:
        module = modules.get(e.module)
        if module is None or isinstance(module, LoRA):
            near = [n for n in modules if n and n.rsplit(".", 1)[-1] == e.module.rsplit(".", 1)[-1]][:3]
            raise ValueError(f"{fn}(): the adapter has `{e.key}`, but the model has no module "
                             f"`{e.module}` (modules with that last name: {near}). It was saved from "
                             "another model.")
        if not quant.same_layer(e.type, type_name(module)):
            raise ValueError(f"{fn}(): `{e.key}` was saved from a {e.type}, but `{e.module}` is a "
                             f"{type_name(module)}. It was saved from another model.")
        if e.tensor not in own_tensor_names(module):
            raise ValueError(f"{fn}(): the adapter has `{e.key}`, but {e.type} `{e.module}` has no "
                             f"tensor {e.tensor!r}. It was saved from another model.")
        shape = tensor_shape(module, e.tensor)
        if shape != tuple(e.shape):
            raise ValueError(f"{fn}(): `{e.key}` has shape {shape} in the model but {tuple(e.shape)} "
                             "in the adapter. It was saved from another model (or another size of it).")
        view = View(tuple(shape), e.transpose, e.experts)
        if e.kind != "lora":
            _check_kind_entry(fn, e, view)
        else:
            _check_lora_entry(fn, e, view, shape)
        lora = find_lora(module, e.tensor)
        if lora is not None and (lora.view.transpose, lora.view.experts) != (e.transpose, e.experts):
            raise ValueError(f"{fn}(): `{e.key}` carries LoRA with transpose={lora.view.transpose}, "
                             f"experts={lora.view.experts}, but the adapter was saved with "
                             f"transpose={e.transpose}, experts={e.experts}.")
        rule = find_rule(module) if lora is None else None
        if rule is not None and rule.adapts(e.tensor) and (rule.transpose, rule.experts) != (e.transpose, e.experts):
            raise ValueError(f"{fn}(): `{e.key}` was saved with transpose={e.transpose}, experts={e.experts}, "
                             f"but the rule for {type_name(module)} says transpose={rule.transpose}, "
                             f"experts={rule.experts}. The file was edited, or the adapter was made with other "
                             "rules: register those with li.register_rule() first.")


def _check_lora_entry(fn: str, e: Entry, view: View, shape) -> None:
    shape_A, shape_B = view.factor_shapes(e.r)
    needs = {"lora_A": shape_A, "lora_B": shape_B}
    if e.dora:
        needs["lora_magnitude"] = view.magnitude_shape(e.dora_axis)
    if e.init in WEIGHT_INITS:
        needs.update(lora_A0=needs["lora_A"], lora_B0=needs["lora_B"])
    if set(e.extra) != set(needs) - set(FACTORS):
        raise ValueError(f"{fn}(): `{e.key}` comes with {sorted(e.extra)}, but dora={e.dora} and "
                         f"init={e.init!r} need {sorted(set(needs) - set(FACTORS))}. The file is corrupt.")
    for f, t in (("lora_A", e.A), ("lora_B", e.B), *e.extra.items()):
        if tuple(t.shape) != needs[f]:
            raise ValueError(f"{fn}(): `{e.key}.{f}` has shape {tuple(t.shape)}, but r={e.r} on "
                             f"`{e.key}` of shape {shape} needs {needs[f]}. The file is corrupt.")


def _check_kind_entry(fn: str, e: Entry, view: View) -> None:
    """Raise unless ``e`` holds the tensors its kind makes for ``view``, in their shapes (the shared
    ones, such as VeRA's projections, by name only)."""
    kind = find_kind(e.kind)
    with torch.device("meta"):
        made = kind.create(view, e.r, e.alpha, e.options)
    shared = set(e.extra) - set(made)
    if not set(made) <= set(e.extra) or (shared and kind.shared is None):
        raise ValueError(f"{fn}(): `{e.key}` comes with {sorted(e.extra)}, but kind {e.kind!r} with its options "
                         f"makes {sorted(made)}. The file is corrupt.")
    for f, t in made.items():
        if tuple(e.extra[f].shape) != tuple(t.shape):
            raise ValueError(f"{fn}(): `{e.key}.{f}` has shape {tuple(e.extra[f].shape)}, but kind {e.kind!r} "
                             f"on `{e.key}` of shape {view.shape} needs {tuple(t.shape)}. The file is corrupt.")


def collect(fn: str, model: nn.Module, adapter: str) -> list[Entry]:
    """Read adapter ``adapter`` of ``model`` into entries, one per adapted tensor."""
    check_adapter_name(fn, adapter)
    entries, present = [], set()
    found = list(loras(model))
    refuse_flat_params(fn, model, found)  # FSDP1
    for site in found:
        qualname, module, tensor_name, lora = site.path, site.module, site.tensor_name, site.lora
        present.update(lora.adapters)
        if adapter not in lora.adapters:
            continue
        if any(hasattr(t, "full_tensor") for t in lora.tensors(adapter).values()):
            raise RuntimeError(
                f"{fn}(): the factors of `{qualname}.{tensor_name}` are shards (DTensors, as FSDP2 leaves "
                "them). Unshard every FSDP module on every rank (m.unshard()), save on one rank, then "
                "reshard; or save lora_state_dict(model), which gathers them. See the README's "
                "\"Distributed training\".")
        c = lora.adapter(adapter)
        if c.kind != "lora":
            entries.append(Entry(
                module=qualname, tensor=tensor_name, type=type_name(module), shape=tuple(lora.view.shape), A=None,
                B=None, r=c.r, alpha=None if c.alpha is None else float(c.alpha), targets=c.targets,
                transpose=lora.view.transpose, experts=lora.view.experts, factored=bool(lora.factored),
                extra={k: t.detach() for k, t in lora.tensors(adapter).items()}, kind=c.kind,
                options=dict(c.options)))
            continue
        entries.append(Entry(
            module=qualname, tensor=tensor_name, type=type_name(module), shape=tuple(lora.view.shape),
            A=lora.lora_A[adapter].detach(), B=lora.lora_B[adapter].detach(), r=c.r,
            alpha=float(c.alpha), rslora=c.rslora, dropout=float(c.dropout),
            init=c.init, targets=c.targets, transpose=lora.view.transpose, experts=lora.view.experts,
            factored=bool(lora.factored), dora=c.dora, dora_axis=c.dora_axis,
            extra={k: t.detach() for k, t in lora.tensors(adapter).items() if k not in FACTORS},
        ))
    if not entries:
        raise ValueError(f"{fn}(): no adapter named {adapter!r} in the model; it has {sorted(present)}. "
                         "Pass `adapter=` with one of those names.")
    return entries


def _check_copies(fn: str, modules: dict[str, nn.Module], copies: Sequence[Copy]) -> None:
    for c in copies:
        module = modules.get(c.module)
        have = None if module is None else module._buffers.get(c.tensor, module._parameters.get(c.tensor))
        if have is None or have.dtype != c.value.dtype or have.shape != c.value.shape:
            raise ValueError(f"{fn}(): the adapter holds `{c.key}` ({c.value.dtype}, shape {list(c.value.shape)}), "
                             "but the model has no such tensor of that dtype and shape. It was saved from "
                             "another model.")


def apply(fn: str, model: nn.Module, entries: Sequence[Entry], name: str, copies: Sequence[Copy] = ()) -> None:
    """Check ``entries`` and ``copies`` against ``model``, then inject the entries as adapter
    ``name`` (or update it) and copy the copies into the model's tensors.

    Nothing changes unless every check passes; a failure while injecting is rolled back.
    """
    if not entries and not copies:
        raise ValueError(f"{fn}(): the saved adapter holds no tensors; save it again.")
    check_entries(fn, model, entries)
    modules = dict(named_modules(model))
    _check_copies(fn, modules, copies)
    if entries:
        _apply(fn, model, modules, entries, name)
    with torch.no_grad():
        for c in copies:
            module = modules[c.module]
            (module._buffers.get(c.tensor) if c.tensor in module._buffers else module._parameters[c.tensor]
             ).copy_(c.value)


def _apply(fn: str, model: nn.Module, modules: dict[str, nn.Module], entries: Sequence[Entry], name: str) -> None:
    keys = {e.key for e in entries}
    existing = _holding(model, name)
    if existing:
        _update(fn, entries, name, existing, keys)
        return
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.module, e.r, e.alpha, e.rslora, e.dora, e.dropout, e.init, e.dtype, e.transpose,
                           e.experts, e.factored, e.kind,
                           _options_key(e.options),
                           e.type if e.kind != "lora" else None), []).append(e)
    calls: dict[tuple, set[str]] = {}  # (settings, tensors) -> modules, one inject call each
    for (module, *settings), group in groups.items():
        calls.setdefault((*settings, tuple(e.tensor for e in group)), set()).add(module)
    lora_only = all(e.kind == "lora" and e.init not in WEIGHT_INITS and not e.dora for e in entries)
    unfilled = OVERWRITTEN.set(lora_only)  # every factor is written below: no random init to throw away
    try:
        for (r, alpha, rslora, dora, dropout, init, dtype, transpose, experts, factored, kind, options, _,
             tensors), paths in calls.items():
            own = find_rule(modules[next(iter(paths))])  # which bias goes with each tensor (IA³)
            rule = Rule(tuple(re.escape(t) for t in tensors), transpose=transpose, experts=experts,
                        factored=factored, bias=None if own is None else own.bias)
            if kind != "lora":
                inject(model, lambda q, m, paths=paths: q in paths, kind=kind, r=r, alpha=alpha, adapter=name,
                       rules={nn.Module: rule}, dtype=dtype, **dict(options))
                continue
            inject(model, lambda q, m, paths=paths: q in paths, r=r, alpha=alpha, adapter=name,
                   dropout=dropout, init=init, rules={nn.Module: rule},
                   dtype=dtype, rslora=rslora, dora=dora)
        OVERWRITTEN.reset(unfilled)
        unfilled = None
        seen: set[int] = set()  # storages already given to a factor: a second one gets a copy
        with torch.no_grad():
            for e in entries:
                lora = find_lora(modules[e.module], e.tensor)
                if e.dora_axis != "out":
                    set_axis(lora, name, e.dora_axis)
                _fill(lora, name, e, assign=seen if lora_only else None)
                lora.adapter(name).targets = e.targets
    except BaseException:
        if unfilled is not None:
            OVERWRITTEN.reset(unfilled)
        if any(name in site.lora.adapters for site in loras(model)):
            remove(model, adapter=name, merge=False)
        raise


def _options_key(options: dict) -> tuple:
    """A kind's options as a hashable key, a list as the tuple it is when read back from JSON."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def _fill(lora: LoRA, name: str, e: Entry, assign: set[int] | None = None) -> None:
    """Copy the saved tensors of ``e`` into adapter ``name`` of ``lora``, in place; with ``assign``
    (fresh factors, never read yet: the storages given so far), a saved tensor of the same dtype
    and device whose storage no factor has yet becomes the factor's storage instead of a copy."""
    mine = lora.tensors(name)
    for k, t in e.tensors.items():
        if mine[k].shape != t.shape:
            raise ValueError(f"load_adapter(): `{e.key}.{k}` has shape {tuple(t.shape)} in the saved adapter but "
                             f"{tuple(mine[k].shape)} in the model. The file is corrupt; save the adapter again.")
        ptr = t.untyped_storage().data_ptr()
        if hasattr(mine[k], "device_mesh"):  # a DTensor (FSDP2's shard): this rank's part of the full tensor
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(mine[k].device, mine[k].dtype), mine[k].device_mesh, mine[k].placements,
                                  src_data_rank=None)  # every rank holds the full tensor: no communication
            mine[k].copy_(t)
        elif (assign is not None and ptr not in assign and (t.dtype, t.device) == (mine[k].dtype, mine[k].device)
                and t.is_contiguous() and not t.requires_grad):
            assign.add(ptr)
            mine[k].data = t
        else:
            mine[k].copy_(t)
    lora.set_scaling(name)


def _holding(model: nn.Module, name: str) -> dict[str, LoRA]:
    """The LoRA of each tensor that already carries adapter ``name``, by the tensor's path."""
    return {site.where: site.lora for site in loras(model) if name in site.lora.adapters}


def check_swap(fn: str, model: nn.Module, entries: Sequence[Entry], name: str) -> None:
    """Raise unless :func:`apply` of ``entries`` into the model's existing adapter ``name`` (a
    slot) would pass its checks; change nothing."""
    check_entries(fn, model, entries)
    existing = _holding(model, name)
    _ready(fn, entries, name, existing, {e.key for e in entries})


def _update(fn: str, entries: Sequence[Entry], name: str, existing: dict[str, LoRA], keys: set[str]):
    ready = _ready(fn, entries, name, existing, keys)
    with torch.no_grad():
        for lora, e in ready:
            _fill(lora, name, e)
            record = lora.adapter(name)
            if e.kind != "lora":
                record.targets = e.targets
                lora.set_scaling(name, alpha=e.alpha)  # LoHa's and LoKr's alpha / r: the file's
                continue
            record.dropout, record.targets = e.dropout, e.targets
            lora.set_scaling(name, alpha=e.alpha, rslora=e.rslora)


def _ready(fn: str, entries: Sequence[Entry], name: str, existing: dict[str, LoRA], keys: set[str]) -> list:
    """``(LoRA, the entry at the slot's rank)`` for each entry swapped into ``existing`` adapter
    ``name``, once every entry is checked; or raise."""
    extra = next((k for k in existing if k not in keys), None)
    if extra is not None:
        raise ValueError(f"{fn}(): the model's adapter {name!r} also covers `{extra}`, which the saved "
                         f"adapter lacks. Load it under another name with `adapter=`, or remove "
                         f"{name!r} first.")
    ready = []  # (LoRA, the entry at the slot's rank), once every entry is checked
    for e in entries:
        lora = existing.get(e.key)
        if lora is None:
            raise ValueError(f"{fn}(): the saved adapter covers `{e.key}`, where the model's adapter "
                             f"{name!r} is absent. Load it under another name with `adapter=`, or "
                             f"remove {name!r} first.")
        mine = lora.tensors(name)
        have = lora.adapter(name).kind
        if have != e.kind:
            raise ValueError(f"{fn}(): `{e.key}` is of kind {e.kind!r} in the saved adapter but {have!r} in the "
                             f"model's adapter {name!r}; a slot holds one kind. Nothing was loaded. Load it "
                             "under another name with `adapter=`.")
        if e.kind != "lora":
            same = e.r == lora.adapter(name).r and _options_key(e.options) == _options_key(lora.adapter(name).options)
            if not same or any(
                    mine.get(k) is None or mine[k].shape != t.shape for k, t in e.extra.items()) or set(mine) != set(
                    e.extra):
                raise ValueError(f"{fn}(): `{e.key}` of kind {e.kind!r} has r={e.r} and options {e.options} in the "
                                 f"saved adapter, which do not fit the model's adapter {name!r} (r="
                                 f"{lora.adapter(name).r}, {lora.adapter(name).options}). Nothing was loaded. Load "
                                 "it under another name with `adapter=`.")
            ready.append((lora, e))
            continue
        if set(mine) != {*FACTORS, *e.extra}:
            raise ValueError(f"{fn}(): `{e.key}` holds {sorted({*FACTORS, *e.extra})} in the saved adapter (dora="
                             f"{e.dora}, init={e.init!r}) but {sorted(mine)} in the model's adapter {name!r}. "
                             "Load it under another name with `adapter=`.")
        slot = lora.adapter(name).r
        if e.r > slot or (e.r < slot and e.extra.keys() - {"lora_magnitude"}):
            why = (f"r={e.r} in the saved adapter, more than the slot's r={slot}" if e.r > slot else
                   f"r={e.r} < the slot's r={slot}, and its {sorted(e.extra)} cannot be padded")
            raise ValueError(f"{fn}(): `{e.key}` has {why}. Nothing was loaded. Inject the slot with r at "
                             "least the largest rank you will swap in, or load it under another name with "
                             "`adapter=`.")
        at_slot = e if e.r == slot else replace(  # zero-padded to the slot's rank, with its own scaling
            e, A=_padded(e.A, slot, -2), B=_padded(e.B, slot, -1), r=slot,
            alpha=lora_scaling(e.r, e.alpha, e.rslora) * (math.sqrt(slot) if e.rslora else slot))
        for f, saved in (("lora_A", at_slot.A), ("lora_B", at_slot.B), *e.extra.items()):
            have = mine[f]
            if have.shape != saved.shape:
                raise ValueError(f"{fn}(): `{e.key}.{f}` has shape {tuple(saved.shape)} in the saved "
                                 f"adapter but {tuple(have.shape)} in the model's adapter {name!r} "
                                 f"(r={e.r} vs r={slot}). Load it under another name.")
        ready.append((lora, at_slot))
    return ready


def _padded(t: Tensor, r: int, dim: int) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to size ``r``."""
    short = r - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


