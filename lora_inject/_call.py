r"""The state a call sets for its own forwards: per-sample rows, adapters off, a merged-weight cache.

:func:`lora_inject.per_sample`, :func:`lora_inject.disabled` and :func:`lora_inject.cached` set
it for the forwards inside their block, and only for those: it is held in a
:class:`~contextvars.ContextVar`, so that threads and asyncio tasks that share one model never see
each other's. A thread starts with an empty context (CPython gives a new thread none of its
parent's unless it is copied in, as ``asyncio.to_thread`` does), so each request opens its own
block. :func:`lora_inject.activate` is a setting of the model, for every call.

In eager mode each :class:`~lora_inject.lora.LoRA` reads the state at its forward (:func:`names`).
A compiled graph cannot read a context variable, so it reads the state as data: while any call
has a ``per_sample`` or ``disabled`` block open on a LoRA, that LoRA's ``serving`` flag is set (a
graph compiles once for it, and once without), and the graph asks the custom ops
:func:`lora_inject._rows.assignment` and :func:`lora_inject._rows.enabled` at run time for the
calling context's rows. The graph is
then the same for every assignment: a new mix of adapters in a batch recompiles nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple


class Call(NamedTuple):
    """What the blocks open in one context set, by ``id()`` of each :class:`LoRA` they cover."""

    rows: dict  # id -> each sample's adapter name or None (per_sample)
    off: frozenset  # ids whose adapters are off (disabled)
    cache: dict  # id -> a one-item list: the cached (key, merged weight), or None (cached)


EMPTY = Call({}, frozenset(), {})
CURRENT: ContextVar[Call | None] = ContextVar("lora_inject_call", default=None)
LOCK = threading.Lock()  # the serving counts: every thread's blocks add to them


@contextmanager
def entered(loras: Iterable, *, rows: tuple | None = None, off: bool = False, cache: bool = False) -> Iterator[None]:
    """Inside the block, and in this context only: each of ``loras`` runs one adapter per sample
    (``rows``), or none (``off``); the innermost of ``per_sample``/``disabled`` decides. With
    ``cache``, each keeps its merged weight for the block (an outer block's cache is kept)."""
    loras = list(loras)
    keys = frozenset(id(lo) for lo in loras)
    call = CURRENT.get() or EMPTY
    if rows is not None:
        call = call._replace(rows={**call.rows, **dict.fromkeys(keys, rows)}, off=call.off - keys)
    if off:
        call = call._replace(rows={k: v for k, v in call.rows.items() if k not in keys}, off=call.off | keys)
    if cache:
        call = call._replace(cache={**{k: [None] for k in keys}, **call.cache})
    gated = loras if rows is not None or off else []
    count(gated, 1)
    token = CURRENT.set(call)
    try:
        yield
    finally:
        CURRENT.reset(token)
        count(gated, -1)


def count(loras: list, step: int) -> None:
    """Add ``step`` to each LoRA's count of open blocks; ``serving`` is whether any is open."""
    with LOCK:
        for lo in loras:
            n = lo.__dict__["opens"] + step
            lo.__dict__.update(opens=n, serving=n > 0)


def names(lora) -> tuple[tuple | None, list[str]]:
    """Eager mode: ``(rows, names)`` for ``lora`` in this call: its per-sample rows and the
    adapters they name, ``(None, [])`` where it is off, else ``(None, lora.active)``."""
    call = CURRENT.get()
    if call is None:
        return None, lora.active
    key = id(lora)
    rows = call.rows.get(key)
    if rows is not None:
        return rows, [n for n in dict.fromkeys(rows) if n is not None and n in lora.records]
    return None, [] if key in call.off else lora.active


def cache_cell(lora) -> list | None:
    """The cell holding ``lora``'s merged weight inside this call's :func:`lora_inject.cached`, or None."""
    call = CURRENT.get()
    return None if call is None else call.cache.get(id(lora))
