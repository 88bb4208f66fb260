"""Adapters on disk, many more than fit in memory, served from a fixed number of resident slots."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from .io import _ours as ours
from .io._entries import Entry, apply, check_swap
from .per_sample import per_sample
from .surgery import inject

__all__ = ["AdapterStore"]


class AdapterStore:
    r"""Serve thousands of adapters saved on disk from ``slots`` adapters resident on ``model``.

    The store injects ``slots`` adapters named ``slot_0``, ``slot_1``, ... on ``targets`` with
    rank ``r`` (the largest rank it will hold: a smaller one is zero-padded into the slot, with
    its own scaling, as :func:`~lora_inject.load_adapter` swaps it in place). :meth:`serve` takes
    one adapter name per sample (or None), makes each resident, loading it from disk into a free
    slot or into the least recently used one, and runs the block inside
    :func:`~lora_inject.per_sample` with each sample's slot. A slot keeps its Parameters, so a
    compiled model holding them recompiles nothing when a slot is loaded.

    Loads read files in a background thread: :meth:`prefetch` the names of the next batch
    while the current one runs its forward, and its files are read (and, on an accelerator,
    pinned in CPU memory) meanwhile; only the copy into a slot happens between forwards, in the
    thread that calls :meth:`serve`. A slot that an open :meth:`serve` block uses is never evicted,
    so threads may serve at once.

    Every adapter must be saved by :func:`~lora_inject.save_adapter` (lora_inject's format) from
    the same model, on exactly the slots' tensors, with a rank at most ``r``.

    Args:
        model (nn.Module): the base model, in eval mode for serving.
        adapters (mapping of str to path, or a path): each adapter's directory by its name, or a
            directory whose subdirectories are the adapters, named after them.
        slots (int): how many adapters stay resident.
        targets: which tensors the slots adapt, as :func:`~lora_inject.inject` takes them.
        r (int): the slots' rank: the largest rank of the stored adapters.
        workers (int): background threads that read files. Default: 1.

    Raises:
        TypeError: if ``adapters`` is neither a mapping nor a path.
        ValueError: if ``slots`` or ``workers`` is not a positive int, ``r`` is not a positive
            int, or ``adapters`` is empty or a path that is not a directory.

    Example::

        >>> store = li.AdapterStore(model, "adapters/", slots=16, targets=["q_proj", "v_proj"], r=16)
        >>> with torch.no_grad(), store.serve(["user_17", "user_4", None]):
        ...     out = model(input_ids=ids)         # a batch of 3, each with its own adapter
        >>> store.hit_rate                          # the share of requests served from a slot
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | os.PathLike] | str | os.PathLike, *,
                 slots: int, targets, r: int, workers: int = 1) -> None:
        for arg, v in (("slots", slots), ("r", r), ("workers", workers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AdapterStore(): `{arg}` must be a positive int, got {v!r}.")
        if isinstance(adapters, (str, os.PathLike)):
            root = os.fspath(adapters)
            if not os.path.isdir(root):
                raise ValueError(f"AdapterStore(): `adapters` must be a directory of adapter directories or a "
                                 f"mapping of names to directories, got {root!r}, which is not a directory.")
            paths = {d: os.path.join(root, d) for d in sorted(os.listdir(root))
                     if os.path.isfile(os.path.join(root, d, ours.CONFIG))}
        elif isinstance(adapters, Mapping):
            paths = {str(k): os.fspath(v) for k, v in adapters.items()}
        else:
            raise TypeError(f"AdapterStore(): `adapters` must be a mapping of names to directories or a "
                            f"directory, got {type(adapters).__name__}.")
        if not paths:
            raise ValueError("AdapterStore(): `adapters` holds no adapter; save each with save_adapter().")
        self.model, self.paths, self.r = model, paths, r
        self.slot_names = [f"slot_{i}" for i in range(slots)]
        for name in self.slot_names:  # B = 0: each slot starts as the identity
            inject(model, targets, r=r, alpha=r, adapter=name)
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._resident: OrderedDict[str, str] = OrderedDict()  # adapter -> its slot, least recent first
        self._free = list(self.slot_names)
        self._uses = dict.fromkeys(self.slot_names, 0)  # open serve() blocks using each slot
        self._reads: OrderedDict[str, Future] = OrderedDict()  # prefetched, oldest first
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora_inject-store")
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    # -- what it says -------------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        """The share of requests (samples naming an adapter) whose adapter was resident before
        their batch; a batch refused counts none."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def resident(self) -> dict[str, str]:
        """Each resident adapter's slot, least recently used first (a copy)."""
        with self._lock:
            return dict(self._resident)

    # -- serving --------------------------------------------------------------------------------------
    def prefetch(self, names: Sequence[str | None]) -> None:
        """Start reading the files of the adapters in ``names`` that are not resident, in the
        background; :meth:`serve` then only copies them into slots. At most as many reads as
        there are slots are held: the oldest unused one is dropped first. A read holds the files
        as they were when it ran.

        Raises:
            TypeError: if ``names`` is not a sequence of str or None.
            KeyError: if a name is not in the store.
            RuntimeError: if the store is closed.
        """
        names = _names("prefetch", names)
        with self._lock:
            if self._closed:
                raise RuntimeError("AdapterStore.prefetch(): the store is closed; make a new AdapterStore.")
            for name in dict.fromkeys(names):
                if name is not None and name not in self._resident and name not in self._reads:
                    self._reads[name] = self._pool.submit(self._read, self._path(name))
                    while len(self._reads) > len(self.slot_names):
                        self._reads.popitem(last=False)[1].cancel()

    def slots_for(self, names: Sequence[str | None]) -> list[str | None]:
        """Make every adapter in ``names`` resident, and return each one's slot (None stays None).

        An adapter that cannot be loaded (its files unreadable, or not fitting the slots) is
        refused before any slot changes: the resident adapters stay as they were.

        Raises:
            TypeError: if ``names`` is not a sequence of str or None.
            KeyError: if a name is not in the store.
            ValueError: if ``names`` holds more distinct adapters than there are slots, or an
                adapter does not fit the slots (saved on other tensors, of another kind, or of a
                rank above ``r``); its files, if they cannot be read.
            RuntimeError: if every slot that could take a new adapter is in use by an open
                :meth:`serve` block.
        """
        names = _names("slots_for", names)
        wanted = [n for n in dict.fromkeys(names) if n is not None]
        if len(wanted) > len(self.slot_names):
            raise ValueError(f"AdapterStore.slots_for(): the batch names {len(wanted)} distinct adapters, "
                             f"more than the {len(self.slot_names)} slots. Split the batch, or make a store "
                             "with more slots.")
        with self._lock:
            for name in wanted:
                self._path(name)
            resident = [n for n in names if n is not None and n in self._resident]
            keep = {self._resident[n] for n in resident}
            loads = {}  # every new adapter read and checked before any slot changes
            for name in wanted:
                if name not in self._resident:
                    read = self._reads.pop(name, None)
                    loads[name] = read.result() if read is not None else self._read(self._path(name))
                    self._check(name, loads[name])
            for name, slot, old in self._plan(list(loads), keep):
                apply("AdapterStore", self.model, loads[name], slot)
                if old is None:
                    self._free.remove(slot)
                else:
                    del self._resident[old]
                self._resident[name] = slot
            for name in names:  # the most recently used: the last request's
                if name is not None:
                    self._resident.move_to_end(name)
            self.hits += len(resident)
            self.misses += sum(n is not None for n in names) - len(resident)
            return [None if n is None else self._resident[n] for n in names]

    @contextmanager
    def serve(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Run the block with each sample ``i`` on adapter ``names[i]`` (None: the base model),
        loaded as needed (see :meth:`slots_for`), inside :func:`~lora_inject.per_sample`. Its
        slots stay resident until the block exits.

        Yields:
            the model.

        Raises:
            the errors of :meth:`slots_for` and :func:`~lora_inject.per_sample`.
        """
        with self._lock:
            slots = self.slots_for(names)
            used = {s for s in slots if s is not None}
            for s in used:
                self._uses[s] += 1
        try:
            with per_sample(self.model, slots):
                yield self.model
        finally:
            with self._lock:
                for s in used:
                    self._uses[s] -= 1

    def close(self) -> None:
        """Stop the background reads (the model keeps its slots)."""
        with self._lock:
            self._closed = True
            self._reads.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- inside -----------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        try:
            return self.paths[name]
        except KeyError:
            raise KeyError(f"AdapterStore: no adapter named {name!r} in the store of {len(self.paths)}; "
                           "add its directory to `adapters`.") from None

    def _check(self, name: str, entries: list[Entry]) -> None:
        """Raise unless adapter ``name`` (its ``entries``) fits the slots, which all have one shape."""
        try:
            check_swap("AdapterStore", self.model, entries, self.slot_names[0])
        except (ValueError, RuntimeError) as e:
            raise type(e)(
                f"AdapterStore: adapter {name!r} (from {self.paths[name]!r}) does not fit the store's slots: "
                f"every adapter must be saved by save_adapter() from the same model, of kind 'lora', on "
                f"exactly the slots' tensors, with r at most {self.r}. No slot was changed. What the "
                f"check found: {e}") from e

    def _plan(self, names: list[str], keep: set[str]) -> list[tuple[str, str, str | None]]:
        """``(adapter, slot, evicted adapter or None)`` for each of ``names`` in turn: a free slot,
        else the least recently used one that neither this batch (``keep``, which grows) nor an
        open serve() block uses. Nothing changes here: the caller loads by the plan.

        Raises:
            RuntimeError: if no slot can take one of ``names``.
        """
        free, plan = list(self._free), []
        evictable = [(old, slot) for old, slot in self._resident.items() if slot not in keep and not self._uses[slot]]
        for name in names:
            if free:
                plan.append((name, free.pop(0), None))
            elif evictable:
                old, slot = evictable.pop(0)
                plan.append((name, slot, old))
            else:
                raise RuntimeError(f"AdapterStore: no slot can take {name!r}: all {len(self.slot_names)} are in use "
                                   "by open serve() blocks or by this batch. Make a store with more slots.")
        return plan

    def _read(self, path: str) -> list[Entry]:
        """The saved adapter's tensors, read from disk (pinned in CPU memory for an accelerator)."""
        _, entries = ours.from_ours("AdapterStore", path)
        if self._device.type != "cpu":
            pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
            entries = [dataclasses.replace(e, A=pin(e.A), B=pin(e.B), extra={k: pin(v) for k, v in e.extra.items()})
                       for e in entries]
        return entries


def _names(fn: str, names) -> Sequence[str | None]:
    """``names`` if it is a sequence of str or None (not a str itself)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(
            n is None or isinstance(n, str) for n in names):
        raise TypeError(f"AdapterStore.{fn}(): `names` must be a sequence of adapter names (str) or None, one "
                        f"per sample, got {names!r}. For one sample, pass [name].")
    return names
