"""Lookups: the modules a pattern selects, and the LoRA parametrizations inside a model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .lora import LoRA


def qualified(prefix: str, name: str) -> str:
    """``"prefix.name"``, or ``name`` under the root module (empty prefix)."""
    return f"{prefix}.{name}" if prefix else name


def matcher(fn: str, arg: str, spec: object) -> Callable[[str, nn.Module], bool]:
    """Turn a regex str, compiled pattern, list of names or ``f(name, module)`` into one predicate.

    A list matches as peft's ``target_modules`` does: a name that is the module's whole
    qualified name, or its last dotted parts (``"q_proj"`` reaches ``model.layers.0.self_attn.q_proj``).

    Raises:
        ValueError: if a regex is invalid.
        TypeError: if ``spec`` is of another kind, or a list holds anything but str (or nothing).
    """
    if isinstance(spec, str):
        try:
            spec = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{fn}(): `{arg}` is not a valid regex: {spec!r} ({e}).") from None
    if isinstance(spec, (list, tuple)):  # names, matched as peft matches `target_modules`
        if not spec or not all(isinstance(t, str) for t in spec):
            raise TypeError(f"{fn}(): `{arg}` as a list must hold module names (str), such as "
                            f"['q_proj', 'v_proj'], got {spec!r}.")
        names = tuple(spec)
        return lambda name, module: any(name == t or name.endswith("." + t) for t in names)
    if isinstance(spec, re.Pattern):
        pattern = spec
        return lambda name, module: pattern.search(name) is not None
    if callable(spec):
        return spec  # type: ignore[return-value]
    raise TypeError(
        f"{fn}(): `{arg}` must be a regex str, a compiled re.Pattern or a callable "
        f"(name, module) -> bool, or a list of module names, got {type(spec).__name__}."
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


def parametrized(module: nn.Module) -> dict:
    """``module.parametrizations`` as a dict (tensor name -> ParametrizationList), or ``{}``."""
    plists = module._modules.get("parametrizations")  # no getattr: a miss would raise inside
    return dict(plists._modules) if isinstance(plists, nn.ModuleDict) else {}


def find_lora(module: nn.Module, tensor_name: str) -> LoRA | None:
    """Return our parametrization on ``module.<tensor_name>``, or None."""
    plist = parametrized(module).get(tensor_name)
    return next((p for p in plist if isinstance(p, LoRA)), None) if plist is not None else None


def source(module: nn.Module, tensor_name: str) -> Tensor:
    """The stored tensor under ``tensor_name``: the parameter itself, or the first original."""
    plist = parametrized(module).get(tensor_name)
    if plist is None:
        return getattr(module, tensor_name)
    return plist.original if plist.is_tensor else plist.original0


def originals(plist) -> list[Tensor]:
    """The tensors a ParametrizationList stores: ``original``, or ``original0``, ``original1``..."""
    return [plist.original] if plist.is_tensor else [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def forward_to(plist, originals: list[Tensor], stop: int) -> Tensor:
    """Run ``originals`` through the parametrizations of ``plist`` before index ``stop`` (>= 1)."""
    out = plist[0](*originals)
    for p in list(plist)[1:stop]:
        out = p(out)
    return out


def inverse(parametrizations, value: Tensor):
    """Map ``value`` back through each parametrization's ``right_inverse``, last first (identity
    where there is none): what to store so that they give ``value``."""
    for p in reversed(list(parametrizations)):
        value = p.right_inverse(value) if hasattr(p, "right_inverse") else value
    return value


def lora_input(module: nn.Module, tensor_name: str, lora: LoRA) -> Tensor:
    """The tensor that ``lora`` receives: the original, through the parametrizations before it."""
    plist = module.parametrizations[tensor_name]
    index = list(plist).index(lora)
    if index == 0:
        return plist.original if plist.is_tensor else plist.original0
    with torch.no_grad(), kept(list(plist)[:index]):  # spectral_norm's power iteration, say
        return forward_to(plist, originals(plist), index)


@contextmanager
def kept(modules) -> Iterator[None]:
    """Put back, on exit, every parameter and buffer of ``modules`` (and their submodules) as it
    was on entry: which tensors they are, and their values. Reading a parametrization's value, or
    running its right_inverse, can change its state; a read or a check must not."""
    saved = [(d, dict(d), {k: v.clone() for k, v in d.items() if v is not None})
             for p in modules for q in p.modules() for d in (q._parameters, q._buffers)]
    try:
        yield
    finally:
        with torch.no_grad():
            for d, tensors, values in saved:
                d.clear()
                d.update(tensors)
                for k, v in values.items():
                    tensors[k].copy_(v)


@dataclass(eq=False)
class Site:
    """One adapted tensor of a model: the module's path, the module, the tensor's name there, and
    our parametrization on it (``None`` while ``inject`` has yet to attach one). What the tensor is
    stored as is read afresh each time (:attr:`stored`, :attr:`originals`): assigning
    ``module.<tensor_name>`` can change it."""

    path: str
    module: nn.Module
    tensor_name: str
    lora: LoRA | None

    @property
    def where(self) -> str:
        """The tensor's qualified name, ``"path.tensor_name"``."""
        return qualified(self.path, self.tensor_name)

    @property
    def plist(self):
        """The tensor's ParametrizationList, or None if it has none."""
        return parametrized(self.module).get(self.tensor_name)

    @property
    def stored(self) -> Tensor:
        """The stored tensor: the tensor itself, or its parametrizations' first original (``W0``)."""
        return source(self.module, self.tensor_name)

    @property
    def originals(self) -> list[Tensor]:
        """Every tensor it is stored as: the tensor itself, or its parametrizations' originals."""
        plist = self.plist
        return [getattr(self.module, self.tensor_name)] if plist is None else originals(plist)

    @property
    def received(self) -> Tensor:
        """The tensor that :attr:`lora` receives: the original, through the parametrizations before it."""
        return lora_input(self.module, self.tensor_name, self.lora)


def loras(model: nn.Module) -> Iterator[Site]:
    """Each of our parametrizations in ``model``, as a :class:`Site`, in module order."""
    for qualname, module in named_modules(model):
        for tensor_name, plist in parametrized(module).items():
            for p in plist:
                if isinstance(p, LoRA):
                    yield Site(qualname, module, tensor_name, p)


def adapter_names(fn: str, entries, adapter) -> set[str] | None:
    if adapter is None:
        return None
    names = [adapter] if isinstance(adapter, str) else adapter
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{fn}(): `adapter` must be a str, a sequence of str or None, got {adapter!r}.")
    present = {n for site in entries for n in site.lora.adapters}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(
            f"{fn}(): no adapter named {missing[0]!r} in the model; it has {sorted(present)}."
        )
    return set(names)


def module_loras(module: nn.Module) -> list[LoRA]:
    return [p for plist in parametrized(module).values() for p in plist if isinstance(p, LoRA)]
