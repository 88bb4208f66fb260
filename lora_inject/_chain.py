"""One tensor's chain of parametrizations: which of them is ours, what the chain stores
(``original``, ``original0``...), running part of it forward or back, and reading it without
changing its state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .lora import LoRA


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
