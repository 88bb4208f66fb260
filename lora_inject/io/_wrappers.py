"""Wrappers around a model: ``torch.compile``'s ``OptimizedModule``, DDP, a user's module that holds
the model as its one child. A wrapper adds a prefix to every path (``_orig_mod.``, ``module.``),
and an adapter's paths must not depend on it.

The two directions differ on purpose:

* a save writes paths relative to the model inside the wrappers that are known to add a prefix
  and nothing else: a child held as ``_orig_mod`` (compile) or ``module`` (DDP, DataParallel,
  DeepSpeed, accelerate) by a module with no tensors of its own. Any other single child is a
  real name of the user's model (``Net.body``), kept, as peft keeps it;
* a load finds where the saved paths sit in the model: at the model itself, or under any chain of
  single children of tensor-free modules (so a plain model's adapter loads into a compiled or
  wrapped one), or with the saved paths' common leading names dropped (so an adapter saved through
  a wrapper of another name loads into the bare model). The first placement under which every
  saved tensor exists, with its module type and shape, wins, the model itself first; a real name
  is never dropped where the paths fit as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from .._selection import named_modules

_PREFIX_ONLY = ("_orig_mod", "module")  # the child names of wrappers that only add a prefix


def _only_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, child)`` if ``module`` holds one child and no tensor of its own, else None."""
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    own = any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
    if len(children) != 1 or own or "parametrizations" in module._modules:
        return None
    return children[0]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside compile's, DDP's and any other ``_orig_mod``/``module`` wrapper."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        child = _only_child(model)
        if child is None or child[0] not in _PREFIX_ONLY or not child[1]._modules:
            break  # a wrapped single layer keeps its name: its tensors need a module path
        model = child[1]
    return model


def _chain(model: nn.Module) -> list[nn.Module]:
    """The model, then each only child of a tensor-free module, down to the first that is not."""
    chain = [model]
    while (child := _only_child(chain[-1])) is not None and all(child[1] is not m for m in chain):
        chain.append(child[1])
    return chain


def placed(model: nn.Module, paths: Iterable[str],
           fits: Callable[[nn.Module | None, str], bool]) -> tuple[nn.Module, str]:
    """``(root, prefix)``: the module of ``model``'s wrapper chain and the leading names of
    ``paths`` to drop under which ``fits(module, path)`` holds for every saved path, ``module``
    being the root's module at the path without the prefix (None where there is none);
    ``(unwrapped(model), "")`` where none does (the caller's checks then say what is wrong).
    """
    paths = list(dict.fromkeys(paths))
    parts = [p.split(".") if p else [] for p in paths]
    common = 0
    while parts and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1  # drop a shared leading name, never the whole of a path
    chain = _chain(model)
    for drop in range(common + 1):
        prefix = "".join(f"{n}." for n in parts[0][:drop]) if parts else ""
        for root in chain:
            modules = dict(named_modules(root))
            if all(fits(modules.get(p[len(prefix):]), p) for p in paths):
                return root, prefix
    return unwrapped(model), ""
