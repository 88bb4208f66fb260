"""The adapted sites of a model: one :class:`Site` record per tensor that carries our
parametrization, the walk that yields them, and the adapter names they hold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ._chain import lora_input, originals, parametrized, source
from ._selection import named_modules, qualified
from .lora import LoRA


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
