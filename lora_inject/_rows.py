r"""The per-sample rows: which rows of a batch each adapter acts on inside :func:`lora_inject.per_sample`.

A :class:`~lora_inject._factored.FactoredWeight` made inside ``per_sample()`` holds ``rows``: each
sample's adapter name, or None. Each term of its factored forms then runs on its own samples' rows
only: :func:`select` finds them (a slice where they are contiguous, else their indices),
:func:`gather` takes them and :func:`scatter` adds that term's part back into the op's output.
Where the rows cannot be taken apart (bags by offsets, an unbatched conv input), :func:`keep`
zeroes the rows of the other samples instead.

Linear layers (``F.linear``, ``addmm``, ``matmul``) of plain LoRA adapters instead run
:func:`gathered`: every adapter of the tensor stacked once (:func:`stacked`, kept until one
changes) and each sample's factors gathered by index, in a fixed number of ops however many
adapters the batch mixes.

In a compiled graph the rows are data (see :mod:`lora_inject._call`): ``rows`` is then a
:class:`Slots`, the same for every assignment, and the custom op :func:`assignment` gives each
row's adapter at run time. Linear layers (``F.linear``, ``addmm``, ``matmul``) run
:func:`served`: every adapter's factors stacked, padded to the largest rank, gathered per row and
applied with two ``bmm`` (the gathered matmul of S-LoRA and Punica); the other ops run each
term on the whole batch, zeroed by :func:`keep` on the rows of the other samples.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._call import CURRENT, EMPTY

_SELECTED: dict[tuple, Tensor | slice] = {}  # (rows, name, rows per sample, device) -> indices


class Slots(NamedTuple):
    """The rows of a compiled graph's weight while a call may set them (see ``LoRA._served``):
    its terms are the ``first`` active adapters' (on the rows where the call leaves them on),
    then one for each LoRA adapter of the tensor, ``names``, for the rows that choose it."""

    key: int  # id() of the LoRA: how the calling context names it
    names: tuple[str, ...]
    first: int
    dora: str = ""  # the tensor's DoRA adapters, comma-separated: no row may choose one (see refuse_dora)

    @staticmethod
    def term(j: int) -> str:
        """The name of the term for ``names[j]``: not an identifier, so no adapter's."""
        return f"#{j}"


@torch.library.custom_op("lora_inject::assignment", mutates_args=())
def assignment(x: Tensor, key: int, names: str, dora: str, flat: bool) -> tuple[Tensor, Tensor]:
    """For each row (dim 0) of ``x``, the input of the LoRA ``key``, in the calling context:
    ``(slot, active)``, the index among ``names`` (comma-separated) of the row's own adapter
    (their number: none), and whether the LoRA's active adapters apply to it (outside
    per_sample and disabled). ``flat``: ``x`` may hold each sample's rows in turn (see
    :func:`per_row`); else dim 0 is the batch. A row may not choose one of ``dora`` (see
    :func:`refuse_dora`)."""
    slots = names.split(",") if names else []
    call = CURRENT.get() or EMPTY
    rows, n = call.rows.get(key), x.shape[0]
    if rows is None:
        slot = torch.full((n,), len(slots), dtype=torch.long, device=x.device)
        return slot, torch.full((n,), key not in call.off, dtype=torch.bool, device=x.device)
    refuse_dora(rows, dora)
    index = {name: j for j, name in enumerate(slots)}
    slot = torch.tensor([index.get(name, len(slots)) for name in rows], dtype=torch.long, device=x.device)
    return slot.repeat_interleave(per_row(rows, x, flat)), torch.zeros(n, dtype=torch.bool, device=x.device)


@assignment.register_fake
def _(x, key, names, dora, flat):
    return x.new_empty(x.shape[0], dtype=torch.long), x.new_empty(x.shape[0], dtype=torch.bool)


@torch.library.custom_op("lora_inject::enabled", mutates_args=())
def enabled(like: Tensor, key: int, dora: str, whole: str) -> Tensor:
    """Whether the active adapters of the LoRA ``key`` apply in the calling context (a 0-d bool
    on ``like``'s device): outside ``disabled`` and ``per_sample``. No sample may choose one of
    ``dora`` (see :func:`refuse_dora`), nor one of ``whole``: the adapters of a weight that an op
    with no factored form takes whole, one weight for the batch (see :func:`one_weight`)."""
    call = CURRENT.get() or EMPTY
    rows = call.rows.get(key)
    if rows is not None:
        refuse_dora(rows, dora)
        if whole and set(whole.split(",")).intersection(rows):
            raise one_weight(like.shape)
    return torch.tensor(key not in call.off and rows is None, device=like.device)


@enabled.register_fake
def _(like, key, dora, whole):
    return like.new_empty((), dtype=torch.bool)


# It reads the calling context, not its inputs alone, and its tensor input may be a constant of
# the graph (a frozen W0, inductor's freezing): an effect keeps it from being folded at compile time.
if hasattr(enabled, "register_effect"):
    enabled.register_effect(torch.library.EffectType.ORDERED)


def refuse_dora(rows: tuple[str | None, ...], dora: str) -> None:
    """A compiled graph's refusal of a per-sample row that chooses a DoRA adapter (one of
    ``dora``, comma-separated), whose rescaling of ``W0``'s output it does not apply per row,
    at run time: which adapter a row chooses is data there.

    Raises:
        RuntimeError: if one of ``rows`` is in ``dora``.
    """
    if dora:
        chosen = set(dora.split(",")).intersection(rows)
        if chosen:
            raise RuntimeError(
                f"per_sample(): adapter {min(chosen)!r} is DoRA, which a compiled model cannot apply per sample "
                "(its rescaling of the base output is per adapter). Run the model eagerly inside per_sample(), "
                "where DoRA adapters can differ per sample, or merge it first with li.remove(model, merge=True).")


def one_weight(shape) -> RuntimeError:
    """The refusal of per-sample adapters on a weight that an op with no factored form takes
    whole (one weight for the batch), eagerly and at a compiled graph's run time alike."""
    return RuntimeError(
        f"per_sample(): an adapted weight of shape {tuple(shape)} reached an op that has no factored form, "
        "so it would be one weight for the whole batch and its samples could not differ. Run one forward "
        "per adapter with li.activate() instead.")


def select(rows: tuple[str | None, ...] | None, name: str, t: Tensor) -> Tensor | slice | None:
    """Inside per_sample(): the rows along dim 0 of ``t`` of the samples that use ``name``
    (each adapter's branch then runs on its own rows only): a slice where they are
    contiguous, else their indices; None outside (``rows`` is None)."""
    if rows is None or type(rows) is Slots:
        return None
    per = per_row(rows, t)
    key = (rows, name, per, t.device)
    idx = None if torch.compiler.is_compiling() else _SELECTED.get(key)
    if idx is None:
        picked = [i * per + j for i, a in enumerate(rows) if a == name for j in range(per)]
        contiguous = picked == list(range(picked[0], picked[0] + len(picked))) if picked else False
        idx = slice(picked[0], picked[-1] + 1) if contiguous else torch.tensor(
            picked, dtype=torch.long, device=t.device)
        if not torch.compiler.is_compiling():
            if len(_SELECTED) > 64:
                _SELECTED.clear()
            _SELECTED[key] = idx
    return idx


def per_row(rows: tuple[str | None, ...], t: Tensor, flat: bool = True) -> int:
    """How many rows of ``t`` (dim 0) each sample has: 1, or T where a 2-D input holds each
    sample's T rows in turn (``flat``: transformers' Conv1D flattens ``(batch, seq, in)`` before
    its ``addmm``; ``F.linear`` takes the batch as it is, so its dim 0 is the batch)."""
    n = t.shape[0]
    if n != len(rows) and not (flat and t.dim() == 2 and n % len(rows) == 0):
        raise ValueError(f"per_sample(): {len(rows)} adapter names were given, one per sample, but an adapted "
                         f"layer's op received {n} along dim 0 of its input of shape {tuple(t.shape)}. Pass one "
                         "name per sample; the batch is read from dim 0 of each adapted layer's input, never "
                         "guessed from a flattened shape.")
    return n // len(rows)


def mask(rows: tuple[str | None, ...] | Slots, name: str, t: Tensor) -> Tensor:
    """1 for the rows of ``t`` (dim 0) whose sample uses ``name``, else 0; shaped to broadcast."""
    if type(rows) is Slots:
        slot, active = assignment(t, rows.key, ",".join(rows.names), rows.dora, True)
        m = (slot == int(name[1:])) if name.startswith("#") else active
        return m.to(t.dtype).view(t.shape[0], *[1] * (t.dim() - 1))
    per = per_row(rows, t)
    m = torch.tensor([a == name for a in rows], dtype=t.dtype, device=t.device)
    return m.repeat_interleave(per).view(t.shape[0], *[1] * (t.dim() - 1))


def keep(rows: tuple[str | None, ...] | None, name: str, h: Tensor) -> Tensor:
    """Inside per_sample(): ``h`` with the rows (dim 0) of samples that use another adapter zeroed;
    ``h`` itself outside (``rows`` is None)."""
    return h if rows is None else h * mask(rows, name, h)


def served(x: Tensor, weight, out: Tensor, transposed: bool) -> Tensor:
    """``out + x @ ΔW.T`` (``transposed``, as in F.linear) or ``out + x @ ΔW`` for a compiled
    weight whose rows are :class:`Slots`: the active terms on the rows they apply to, then each
    row's own adapter by :func:`gathered_matmul` over the stacked factors (built in the graph)."""
    rows = weight._rows
    slot, active = assignment(x, rows.key, ",".join(rows.names), rows.dora, not transposed)
    firsts, seconds = [], []
    for i, (L, R, s, p, _) in enumerate(weight._factors()):
        first, second = (R.t(), L.t()) if transposed else (L, R)  # x @ first @ second: (in, r), (r, out)
        if i >= rows.first:
            firsts.append(first)
            seconds.append(second * s)
            continue
        h = x.to(first.dtype)
        h = (F.dropout(h, p) if p else h) @ first  # (.., r)
        h = h * active.view(-1, *[1] * (h.dim() - 1)).to(h.dtype)
        out = out + ((h @ second) * s).to(out.dtype)
    if not firsts:
        return out
    return gathered_matmul(x, out, *stack(firsts, seconds), slot)


def stack(firsts: list[Tensor], seconds: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Each adapter's ``(in, r)`` and ``(r, out)`` factors (the scaling in the second), stacked and
    zero-padded to the largest rank, with one slot of zeros after them (for rows with no adapter):
    ``(slots + 1, r, in)`` (the first factors transposed, ``in`` contiguous, as ``bmm`` reduces
    over it fastest) and ``(slots + 1, r, out)``."""
    r = max(f.shape[-1] for f in firsts)
    first = torch.stack([F.pad(f.t(), (0, 0, 0, r - f.shape[-1])) for f in firsts]
                        + [firsts[0].new_zeros(r, firsts[0].shape[0])])
    second = torch.stack([F.pad(g, (0, 0, 0, r - g.shape[0])) for g in seconds]
                         + [seconds[0].new_zeros(r, seconds[0].shape[1])])
    return first, second


def gathered_matmul(x: Tensor, out: Tensor, first: Tensor, second: Tensor, slot: Tensor) -> Tensor:
    """``out`` plus, for each row ``i`` of ``x`` (dim 0), ``x[i] @ first[slot[i]].T @ second[slot[i]]``:
    the factors gathered per row and applied with two ``bmm`` (the gathered matmul of S-LoRA
    and Punica), in place where nothing is differentiated."""
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(first.dtype), first.index_select(0, slot).mT)  # (n, t, r)
    second = second.index_select(0, slot)  # (n, r, out)
    if in_place(out, h) and out.dtype == h.dtype and out.is_contiguous():
        out.view(n, -1, out.shape[-1]).baddbmm_(h, second)
        return out
    return out + torch.bmm(h, second).reshape_as(out).to(out.dtype)


def gathered(x: Tensor, weight, out: Tensor, transposed: bool) -> Tensor | None:
    """Eager mode inside per_sample(): ``out`` plus each row's own adapter, from every LoRA
    adapter of the weight's tensor stacked once and kept until one of them changes
    (:func:`stacked`), by :func:`gathered_matmul`: a fixed number of ops however many adapters
    the batch mixes. None where it does not apply (DoRA, a weight not made by a LoRA, or a
    gradient to reach the factors): the terms then run one by one on their own rows."""
    lora, rows = weight._owner, weight._rows
    if lora is None or weight._has_dora():
        return None
    if torch.is_grad_enabled() and any(t.A.requires_grad or t.B.requires_grad for t in weight._terms):
        return None  # the stack is built without a gradient: the terms' own rows carry one
    names, first, second = stacked(lora, transposed, _used(rows))
    key = (rows, names, x.shape[0], x.device)
    slot = _SLOTS.get(key)
    if slot is None:
        index = {name: j for j, name in enumerate(names)}
        slot = torch.tensor([index.get(a, len(names)) for a in rows], dtype=torch.long, device=x.device)
        slot = slot.repeat_interleave(per_row(rows, x))
        if len(_SLOTS) > 64:
            _SLOTS.clear()
        _SLOTS[key] = slot
    return gathered_matmul(x, out, first, second, slot)


_SLOTS: dict[tuple, Tensor] = {}  # (rows, names, rows of x, device) -> each row's slot
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA -> (key, first, second, stamps)


def _used(rows: tuple[str | None, ...]) -> tuple[str, ...]:
    """The adapters ``rows`` names, each once."""
    return tuple(n for n in dict.fromkeys(rows) if n is not None)


def stacked(lora, transposed: bool, used=()) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """The names of ``lora``'s plain LoRA adapters and their factors stacked by :func:`stack`,
    kept for the LoRA (not in it: a copy or a pickle of the model leaves it out) and built again
    when one that this call ``used`` has changed since: its tensors, their storage or version
    counter, or its scaling (a hot swap, an optimizer step, ``load_state_dict``). An adapter the
    call does not use is not looked at: its slot is not read, and it is checked when a call uses
    it."""
    names = lora.stackable()
    held = _STACKS.get(lora)
    if held is not None and held[0] == (names, transposed):
        stamps = held[3]
        for n in used:
            if n in stamps and not _same(stamps[n], _stamp(lora, n)):
                break
        else:
            return names, held[1], held[2]
    stamps = {n: _stamp(lora, n) for n in names}  # before stacking: a write that comes between stacks again
    with torch.no_grad():
        firsts, seconds = [], []
        for n in names:
            L, R = lora.view.stored_factors(*lora.factor_pair(n))
            first, second = (R.t(), L.t()) if transposed else (L, R)
            firsts.append(first)
            seconds.append(second * lora.records[n].scaling)
        first, second = stack(firsts, seconds)
    _STACKS[lora] = ((names, transposed), first, second, stamps)
    return names, first, second


def _stamp(lora, name: str) -> tuple:
    """What adapter ``name``'s slot of the stack was built from: its scaling, then each tensor
    with its storage and version counter."""
    return (lora.records[name].scaling, *((t, t.data_ptr(), t._version) for t in lora.tensors(name).values()))


def _same(a: tuple, b: tuple) -> bool:
    """Whether two stamps agree, the tensors by identity (``==`` on tensors compares values)."""
    return len(a) == len(b) and a[0] == b[0] and all(
        x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a[1:], b[1:]))


def gather(t: Tensor, idx: Tensor | slice) -> Tensor:
    """The rows ``idx`` of ``t`` (dim 0): a view for a slice."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def some(idx: Tensor | slice) -> bool:
    """Whether ``idx`` (from :func:`select`) names any row."""
    return idx.stop > idx.start if isinstance(idx, slice) else bool(idx.numel())


def scatter(out: Tensor, idx: Tensor | slice, extra: Tensor, s) -> Tensor:
    """``out`` with ``s * extra`` added to its rows ``idx`` (dim 0), in ``out``'s dtype: in place
    where nothing is differentiated (``out`` is always a fresh result of the op), so that
    each adapter's rows cost no copy of the whole output."""
    if isinstance(s, Tensor):
        extra, s = extra * s, 1
    extra = extra.to(out.dtype)
    if isinstance(idx, slice):
        if in_place(out, extra):
            out[idx].add_(extra, alpha=s)
            return out
        pad = [0, 0] * (out.dim() - 1) + [idx.start, out.shape[0] - idx.stop]
        return out + F.pad(extra * s if s != 1 else extra, pad)
    return (out.index_add_ if in_place(out, extra) else out.index_add)(0, idx, extra, alpha=s)


def in_place(out: Tensor, extra: Tensor) -> bool:
    """Whether ``out`` (a fresh result of the op) may be written in place: nothing differentiated, eager."""
    return not (torch.is_grad_enabled() and (out.requires_grad or extra.requires_grad)) \
        and not torch.compiler.is_compiling()
