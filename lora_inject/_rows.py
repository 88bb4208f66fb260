r"""The per-sample rows: which rows of a batch each adapter acts on inside :func:`lora_inject.per_sample`.

A :class:`~lora_inject.factored.FactoredWeight` made inside ``per_sample()`` holds ``rows``: each
sample's adapter name, or None. Each term of its factored forms then runs on its own samples' rows
only: :func:`select` finds them (a slice where they are contiguous, else their indices),
:func:`gather` takes them and :func:`scatter` adds that term's part back into the op's output.
Where the rows cannot be taken apart (bags by offsets, an unbatched conv input), :func:`keep`
zeroes the rows of the other samples instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SELECTED: dict[tuple, Tensor | slice] = {}  # (rows, name, rows per sample, device) -> indices


def select(rows: tuple[str | None, ...] | None, name: str, t: Tensor) -> Tensor | slice | None:
    """Inside per_sample(): the rows along dim 0 of ``t`` of the samples that use ``name``
    (each adapter's branch then runs on its own rows only): a slice where they are
    contiguous, else their indices; None outside (``rows`` is None)."""
    if rows is None:
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


def per_row(rows: tuple[str | None, ...], t: Tensor) -> int:
    """How many rows of ``t`` (dim 0) each sample has: 1, or T where a 2-D input holds each
    sample's T rows in turn (transformers' Conv1D flattens ``(batch, seq, in)``)."""
    n = t.shape[0]
    if n != len(rows) and not (t.dim() == 2 and n % len(rows) == 0):
        raise RuntimeError(f"per_sample(): a batch has {n} samples along dim 0 of the layer's input, but "
                           f"{len(rows)} adapters were given, one per sample. Pass one per sample.")
    return n // len(rows)


def mask(rows: tuple[str | None, ...], name: str, t: Tensor) -> Tensor:
    """1 for the rows of ``t`` (dim 0) whose sample uses ``name``, else 0; shaped to broadcast."""
    per = per_row(rows, t)
    m = torch.tensor([a == name for a in rows], dtype=t.dtype, device=t.device)
    return m.repeat_interleave(per).view(t.shape[0], *[1] * (t.dim() - 1))


def keep(rows: tuple[str | None, ...] | None, name: str, h: Tensor) -> Tensor:
    """Inside per_sample(): ``h`` with the rows (dim 0) of samples that use another adapter zeroed;
    ``h`` itself outside (``rows`` is None)."""
    return h if rows is None else h * mask(rows, name, h)


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
