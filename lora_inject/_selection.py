"""Selection by name: a module's qualified name, the selectors ``inject`` takes (a regex, a list of
names, a callable), and the walk over a model's named modules that they are matched against."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from torch import nn
from torch.nn.utils import parametrize


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
