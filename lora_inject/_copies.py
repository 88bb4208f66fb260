"""The sites an adapter trains whole besides its targets: peft's ``modules_to_save`` (every parameter
of the named modules, kind ``"full"``) and ``trainable_token_indices`` (rows of the embeddings,
kind ``"tokens"``), found in a model as peft finds them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from ._chain import parametrized
from ._selection import named_modules
from .kind import integer
from .rule import Rule, find_rule


def saved_modules(fn: str, model: nn.Module, names: object) -> list[str]:
    """The paths of the modules that ``names`` selects as peft's ``modules_to_save`` does (a path
    that ends with one of the names), the outermost of each nest (its copy holds its children).

    Raises:
        TypeError: if ``names`` is not a list of str.
        ValueError: if a name selects no module.
    """
    if isinstance(names, str) or not isinstance(names, Sequence) or not names or not all(
            isinstance(n, str) and n for n in names):
        raise TypeError(f"{fn}(): `modules_to_save` must be a list of module names (str), such as "
                        f"['classifier'], got {names!r}.")
    paths = [q for q, _ in named_modules(model) if q]
    chosen = []
    for name in names:
        hit = [q for q in paths if q.endswith(name)]
        if not hit:
            near = [q for q in paths if q.rsplit(".", 1)[-1] in name or name in q][:5]
            raise ValueError(f"{fn}(): `modules_to_save` names {name!r}, which ends no module's name (peft "
                             f"matches `name.endswith(...)`); modules near it: {near}. Check the names with "
                             "[n for n, _ in model.named_modules()].")
        chosen += hit
    chosen = list(dict.fromkeys(chosen))
    return [q for q in chosen if not any(q.startswith(f"{o}.") for o in chosen)]


def within(paths: Sequence[str]):
    """``f(name, module)``: whether the module is one of ``paths`` or inside one."""
    return lambda name, module: any(name == p or name.startswith(f"{p}.") for p in paths)


def full_groups(model: nn.Module, paths: Sequence[str]) -> list[tuple[set[str], Rule]]:
    """The ``inject(kind="full")`` calls that cover every floating parameter of the modules at
    ``paths`` and their submodules: ``(module paths, rule)`` per set of tensor names, each rule
    keeping the layout (``transpose``) of the module's own rule where it names the tensor."""
    groups: dict[tuple, set[str]] = {}
    inside = within(paths)
    for qualname, module in named_modules(model):
        if not inside(qualname, module):
            continue
        names = [n for n, t in module._parameters.items() if t is not None and t.is_floating_point()]
        names += [n for n in parametrized(module) if n not in names]
        if not names:
            continue
        own = find_rule(module)
        layout = (own.transpose, own.experts, own.factored) if own is not None and all(
            own.adapts(n) for n in names) else (False, False, False)
        groups.setdefault((tuple(names), layout), set()).add(qualname)
    return [(set(q), Rule(tuple(re.escape(n) for n in names), transpose=t, experts=e, factored=f))
            for (names, (t, e, f)), q in groups.items()]


def token_sites(fn: str, model: nn.Module, spec: object) -> list[tuple[str, tuple[int, ...], Rule]]:
    """``(module path, token ids, rule)`` for each module that peft's ``trainable_token_indices``
    ``spec`` selects: a list of ids for the input embeddings (``model.get_input_embeddings()``),
    or a dict from module names (matched as ``modules_to_save``) to lists of ids.

    Raises:
        TypeError: if ``spec`` is neither, or the model has no ``get_input_embeddings`` for a list.
        ValueError: if a name selects no module.
    """
    def ids(v) -> tuple[int, ...]:
        if isinstance(v, (list, tuple)) and v and all(integer(i) and i >= 0 for i in v) and len(set(v)) == len(v):
            return tuple(v)
        raise TypeError(f"{fn}(): `trainable_token_indices` must hold non-empty lists of distinct token ids "
                        f"(ints >= 0), got {v!r}.")

    modules = dict(named_modules(model))
    if isinstance(spec, Mapping):
        out = []
        for name, v in spec.items():
            if not isinstance(name, str):
                raise TypeError(f"{fn}(): `trainable_token_indices` as a dict maps module names (str) to token ids, "
                                f"got the key {name!r}.")
            out += [(q, ids(v)) for q in saved_modules(fn, model, [name])]
    else:
        get = getattr(model, "get_input_embeddings", None)
        if not callable(get):
            raise TypeError(f"{fn}(): `trainable_token_indices` as a list applies to the input embeddings, but "
                            f"{type(model).__name__} has no get_input_embeddings(). Pass a dict such as "
                            "{'embed_tokens': [0, 5]} naming the module.")
        emb = get()
        path = next((q for q, m in modules.items() if m is emb), None)
        if path is None:
            raise ValueError(f"{fn}(): `trainable_token_indices`: the input embeddings of {type(model).__name__} "
                             "are not one of its modules. Pass a dict naming the module.")
        out = [(path, ids(spec))]
    sites = []
    for q, idx in out:
        own = find_rule(modules[q])
        t = own.transpose if own is not None and own.adapts("weight") else False
        f = own.factored if own is not None and own.adapts("weight") else False
        sites.append((q, idx, Rule(("weight",), transpose=t, factored=f)))
    return sites
