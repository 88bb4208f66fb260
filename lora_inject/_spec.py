"""What ``inject`` was asked for: its arguments checked, and gathered in one record (:class:`Spec`)
that makes each site's :class:`~lora_inject.lora.Adapter` record, with a kind's options resolved
and its module selectors (IA³'s ``feedforward``) ready to match each site."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._inits import INITS, START_INITS
from ._selection import matcher
from ._sites import Site
from ._view import View
from .kind import Kind, find_kind
from .lora import Adapter, check_adapter_name
from .rule import Rule


@dataclass
class Spec:
    """What ``inject`` adds on each site, from its checked arguments."""

    kind: Kind | None  # None: LoRA itself
    r: int | None
    alpha: float | None
    targets: str | None  # the selector as the records keep it: a regex's pattern, or None
    dropout: float = 0.0
    init: str = "default"  # as the records keep it: LoftQ's start is recorded as "default"
    rslora: bool = False
    dora: bool = False
    options: dict = field(default_factory=dict)  # another kind's options, resolved
    selectors: dict = field(default_factory=dict)  # its options that select modules: name -> predicate
    shared: dict = field(default_factory=dict)  # its tensors that every site shares (VeRA's projections)

    def record(self, site: Site) -> Adapter:
        """The :class:`Adapter` record of the new adapter on ``site``."""
        if self.kind is None:
            return Adapter(r=self.r, alpha=self.alpha, dropout=self.dropout, init=self.init, rslora=self.rslora,
                           dora=self.dora, targets=self.targets)
        options = {**self.options, **{k: bool(f(site.path, site.module)) for k, f in self.selectors.items()}}
        return Adapter(r=self.r, alpha=self.alpha, targets=self.targets, kind=self.kind.name, options=options)

    def share(self, view: View) -> dict[str, Tensor] | None:
        """The part of the shared tensors that a site seen as ``view`` holds, or None."""
        if not self.shared:
            return None
        kind = self.kind
        return kind.share(self.shared, view, self.r, self.options) if kind.share is not None else dict(self.shared)


def checked(model, targets, kind, *, r, alpha, adapter, dropout, init, rules, dtype, rslora, dora, dense,
             options) -> Spec:
    """``inject``'s arguments, checked, as a :class:`Spec`."""
    if not isinstance(kind, str):
        raise TypeError(f"inject(): `kind` must be a str such as 'lora' or 'loha', got {type(kind).__name__}.")
    if (dense is None) != (init != "loftq") or (init == "loftq" and (dora or kind != "lora")):
        raise ValueError(f"inject(): `dense` goes with init='loftq' on a plain LoRA (kind='lora', dora=False), got "
                         f"init={init!r}, dense={'None' if dense is None else type(dense).__name__}, kind={kind!r}, "
                         f"dora={dora}.")
    spec = targets if isinstance(targets, str) else getattr(targets, "pattern", None)
    if kind != "lora":
        return _checked_kind(model, find_kind(kind), spec, r=r, alpha=alpha, adapter=adapter, dropout=dropout,
                             init=init, rules=rules, dtype=dtype, rslora=rslora, dora=dora, options=options)
    if options:
        raise TypeError(f"inject(): unexpected keyword argument(s) {sorted(options)}; kind='lora' takes none "
                        "besides inject's own. Options such as these belong to another `kind=`.")
    r = 8 if r is None else r
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
    check_dtype(dtype)
    if not isinstance(rslora, bool):
        raise TypeError(f"inject(): `rslora` must be a bool, got {type(rslora).__name__}.")
    if not isinstance(dora, bool):
        raise TypeError(f"inject(): `dora` must be a bool, got {type(dora).__name__}.")
    check_rules(rules)
    if init in ("pissa", "loftq") and alpha <= 0:
        raise ValueError(f"inject(): init={init!r} splits singular values by the scaling, so `alpha` "
                         f"must be positive, got {alpha}.")
    check_model(model)
    return Spec(None, r, alpha, spec, dropout=dropout, init="default" if init in START_INITS else init,
                 rslora=rslora, dora=dora)


def _checked_kind(model, kind: Kind, spec, *, r, alpha, adapter, dropout, init, rules, dtype, rslora, dora,
                  options) -> Spec:
    """``inject``'s arguments for a kind other than LoRA, checked, with the kind's options resolved."""
    name = kind.name
    lora_only = [f"{k}={v!r}" for k, v, default in (("dora", dora, False), ("init", init, "default"),
                                                     ("rslora", rslora, False), ("dropout", dropout, 0.0))
                 if v != default]
    if lora_only:
        raise ValueError(f"inject(kind={name!r}): {', '.join(lora_only)} belong(s) to LoRA, not to {name!r}. "
                         f"Leave them out, or inject kind='lora'.")
    if alpha is not None and kind.default_alpha is None:
        raise ValueError(f"inject(kind={name!r}): {name!r} has no `alpha` (its update has no scaling "
                         f"numerator), got alpha={alpha!r}. Leave `alpha` out.")
    if r is not None and kind.default_r is None:
        raise ValueError(f"inject(kind={name!r}): {name!r} has no rank `r`, got r={r!r}. Leave `r` out.")
    if isinstance(r, bool) or (r is not None and not isinstance(r, int)):
        raise TypeError(f"inject(kind={name!r}): `r` must be an int, got {r!r}.")
    check_adapter_name("inject", adapter)
    check_dtype(dtype)
    check_rules(rules)
    check_model(model)
    selectors = {}
    for opt in kind.options:  # a selector of modules, resolved per site
        if opt.selector and opt.name in options and not isinstance(options[opt.name], bool):
            selectors[opt.name] = matcher(f"inject(kind={name!r})", opt.name, options.pop(opt.name))
    r, alpha, resolved = kind.resolve(r, alpha, **options)
    if kind.name == "oft" and resolved.get("module_dropout"):
        warnings.warn(f"inject(kind='oft'): module_dropout={resolved['module_dropout']!r} has no effect: peft 0.21's "
                      "OFT layers make its dropout layer but never apply it, and lora_inject does peft's math. "
                      "Leave it out (0.0) to silence this.", UserWarning, stacklevel=3)
    return Spec(kind, r, alpha, spec, options=resolved, selectors=selectors)


def check_dtype(dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"inject(): `dtype` must be a floating torch.dtype or None, got {dtype!r}.")


def check_rules(rules) -> None:
    if rules is not None and not (isinstance(rules, Mapping) and all(isinstance(v, Rule) for v in rules.values())):
        raise TypeError(f"inject(): `rules` must be None or a mapping from module types to lora_inject.Rule, "
                        f"such as lora_inject.default_rules(), got {type(rules).__name__}.")


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject(): `model` must be an nn.Module, got {type(model).__name__}.")
