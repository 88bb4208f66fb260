"""Which adapters are active: ``activate``, ``disabled`` (none, inside a block) and ``cached``
(each adapted weight merged once, inside a block)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from ._sites import adapter_names, loras

__all__ = [
    "activate",
    "cached",
    "disabled",
]

M = TypeVar("M", bound=nn.Module)


def activate(model: M, adapters: str | Sequence[str] | Mapping[str, float]) -> M:
    """Make exactly ``adapters`` active on every tensor that carries them; others go inactive.

    Given a mapping ``{name: strength}``, each adapter's update is also multiplied by its
    strength (``Adapter.strength``, 1.0 until set; a str or a sequence keeps the strengths as
    they are). A strength lives in the adapter's scaling buffer, so changing it recompiles
    nothing under ``torch.compile``; ``remove(merge=True)`` merges at the strengths set.

    Args:
        model (nn.Module): the model to change in place.
        adapters (str, sequence of str, or mapping of str to float): the adapter name(s), or
            each name and its strength; ``[]`` turns all off.

    Returns:
        ``model``.

    Raises:
        TypeError: if ``adapters`` is not a str, a sequence of str or a mapping of str to a real
            number.
        ValueError: if a name is not in the model, or a strength is not finite.

    Example::

        >>> activate(pipe.unet, {"style": 0.8, "detail": 1.0})
    """
    entries = list(loras(model))
    strengths = None
    if isinstance(adapters, Mapping):
        strengths = dict(adapters)
        bad = next((v for v in strengths.values() if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None or not all(isinstance(n, str) for n in strengths):
            raise TypeError(f"activate(): `adapters` as a mapping must map each adapter name (a str) to its "
                            f"strength (a float), got {adapters!r}.")
        if not all(math.isfinite(v) for v in strengths.values()):
            raise ValueError(f"activate(): each strength must be finite, got {strengths}.")
        adapters = list(strengths)
    names = [adapters] if isinstance(adapters, str) else adapters
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"activate(): `adapters` must be a str or a sequence of str, got {adapters!r}. "
            "Pass [] to turn every adapter off."
        )
    adapter_names("activate", entries, names)
    for lora in (site.lora for site in entries):
        lora.active = [n for n in dict.fromkeys(names) if n in lora.adapters]
        for n in (strengths or {}).keys() & set(lora.adapters):
            lora.set_scaling(n, strength=float(strengths[n]))
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every adapter off inside the ``with`` block; restore each one's state on exit.

    It is safe under exceptions and nests. Calls inside the block are kept: on exit an adapter
    removed inside is gone (not restored), an adapter injected inside keeps the state it has at
    exit (active, as ``inject`` leaves it, unless turned off), and a tensor adapted for the first
    time inside keeps its own state.

    Example::

        >>> with disabled(model):
        ...     base_out = model(x)
    """
    entry = {}
    for lora in (site.lora for site in loras(model)):
        entry[id(lora)] = (lora.active, set(lora.adapters))
        lora.active = []
    try:
        yield model
    finally:
        for lora in (site.lora for site in loras(model)):
            saved = entry.get(id(lora))
            if saved is not None:
                active, known = saved
                added = [n for n in lora.active if n not in known]  # injected inside the block
                lora.active = [n for n in active if n in lora.records] + added


@contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """Reuse each adapted weight, merged, across no-grad forwards inside the ``with`` block.

    Unmerged inference normally recomputes the LoRA branch (fast path) or the merged weight
    (merged path) on every forward. Inside this block, under ``torch.no_grad()`` or
    ``torch.inference_mode()``, each adapted tensor is merged once and then reused until ``W0``,
    a factor or the set of active adapters changes (it watches their storage and version
    counters, so an optimizer step, ``load_state_dict``, ``activate`` or :func:`disabled` all
    rebuild it). Forwards with gradients, compiled code and :func:`per_sample` do not use it.

    Memory: one weight-sized tensor per adapted tensor, held until the block exits.

    Example::

        >>> with torch.no_grad(), cached(model):
        ...     for batch in loader:
        ...         model(batch)          # as fast as the base model after the first batch
    """
    found = [site.lora for site in loras(model)]
    saved = [lora.cache for lora in found]
    for lora in found:
        if lora.cache is None:
            lora.cache = ()
    try:
        yield model
    finally:
        for lora, cache in zip(found, saved):
            lora.cache = cache
