"""Which adapters are active: ``activate``, ``disabled`` (none, inside a block) and ``cached``
(each adapted weight merged once, inside a block)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from . import _call
from ._sites import adapter_names, loras

__all__ = [
    "activate",
    "cached",
    "disabled",
]

M = TypeVar("M", bound=nn.Module)


def activate(model: M, adapters: str | Sequence[str] | Mapping[str, float]) -> M:
    """Make exactly ``adapters`` active on every tensor that carries them; others go inactive.

    Given a mapping ``{name: strength}``, each adapter moves its tensors that share of the way
    from the weight before it, ``W``, to the weight it makes at full strength, ``W1``: ``W +
    strength * (W1 - W)`` (``Adapter.strength``, 1.0 until set; a str or a sequence keeps the
    strengths as they are). For an additive kind (LoRA, LoHa, LoKr, VeRA) that multiplies its
    update; for a multiplicative one (OFT, IA³, and IA³'s bias with it) it is a step towards its
    weight, which runs on the merged weight. An additive kind's strength lives in the adapter's
    scaling buffer, so changing it recompiles nothing under ``torch.compile``; a multiplicative
    kind's is read as a number: a compiled graph compiles again the first time it changes.
    ``remove(merge=True)`` merges at the strengths set.

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
    """Turn every adapter off for the forwards of this call inside the ``with`` block.

    It belongs to the call, not to the model: another thread or asyncio task running the same
    model meanwhile keeps its adapters (the state is a :class:`~contextvars.ContextVar`), and
    :func:`activate`'s setting is untouched. It is safe under exceptions and nests; the
    innermost of ``disabled`` and :func:`~lora_inject.per_sample` decides. Calls inside the
    block are kept: an adapter removed inside is gone, one injected inside on a tensor that
    was adapted already is off until the block exits (active after it, as ``inject`` leaves it),
    and a tensor adapted for the first time inside keeps its own state. Under ``torch.compile``
    the graph reads the call's state as data (see :func:`~lora_inject.per_sample`).

    Example::

        >>> with disabled(model):
        ...     base_out = model(x)
    """
    with _call.entered([site.lora for site in loras(model)], off=True):
        yield model


@contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """Reuse each adapted weight, merged, across no-grad forwards of this call inside the ``with`` block.

    Unmerged inference normally recomputes the LoRA branch (fast path) or the merged weight
    (merged path) on every forward. Inside this block, under ``torch.no_grad()`` or
    ``torch.inference_mode()``, each adapted tensor is merged once and then reused until ``W0``,
    a factor or the set of adapters in use changes (it watches their storage and version
    counters, so an optimizer step, ``load_state_dict``, ``activate`` or :func:`disabled` all
    rebuild it). Forwards with gradients, compiled code and :func:`per_sample` do not use it.
    Like :func:`disabled` it belongs to the call: the cache is this call's, and other threads'
    forwards meanwhile do not use it.

    Memory: one weight-sized tensor per adapted tensor, held until the block exits.

    Example::

        >>> with torch.no_grad(), cached(model):
        ...     for batch in loader:
        ...         model(batch)          # as fast as the base model after the first batch
    """
    with _call.entered([site.lora for site in loras(model)], cache=True):
        yield model
