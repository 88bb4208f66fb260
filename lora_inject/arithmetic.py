"""Adapter arithmetic: a weighted sum of adapters as a new adapter, exact or truncated by SVD."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from ._sites import adapter_names, loras
from ._view import compute_dtype
from .lora import Adapter, LoRA, check_adapter_name

__all__ = ["combine"]

M = TypeVar("M", bound=nn.Module)


def combine(model: M, weights: Mapping[str, float], into: str, *, rank: int | None = None) -> M:
    r"""Add adapter ``into``, in place, whose update is ``sum_i weights[i] * ΔW_i`` on every tensor.

    Each adapted tensor that carries at least one of the named adapters gets the new adapter,
    with the scaling 1 (``alpha = r``):

    * ``rank=None``: exact, by concatenating the factors along ``r``:
      ``A = [A_1; A_2; ..]`` and ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ..]``, so ``r = r_1 + r_2 + ..``
      (an adapter made with ``init="pissa"``/``"olora"`` counts ``2 r``: its update is
      ``s (B A - B0 A0)``);
    * ``rank=k``: the best rank-``k`` approximation of that sum (truncated SVD, computed from the
      factors without building the weight-sized matrix), split evenly as
      ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``; ``r = k`` everywhere, zero-padded where the
      sum has a lower rank.

    Each tensor's relative approximation error ``||ΔW_k - ΔW||_F / ||ΔW||_F`` (0.0 when exact or
    when ``ΔW`` is zero) is recorded in its record, ``lora.adapter(into).error``, for example::

        {name: lora.adapter(into).error for name, lora in li.named_loras(model) if into in lora.adapters}

    The new adapter is added inactive, as peft's ``add_weighted_adapter`` does: turn it on with
    ``li.activate(model, into)``. It works for every layer type, expert weights included. The
    factors are computed in float32 (float64 for float64 factors) and stored in the dtype of the
    first adapter in ``weights``. DoRA adapters are not linear in their factors and are refused.
    The call is atomic: if it raises, the model is unchanged.

    Args:
        model (nn.Module): the model to change in place.
        weights (mapping of str to float): adapter name to its coefficient, such as
            ``{"a": 1.0, "b": -0.5}``.
        into (str): the new adapter's name.
        rank (int, optional): truncate to this rank by SVD. Default: ``None`` (exact).

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``weights`` is not a mapping of str to real numbers, ``into`` is not a str,
            or ``rank`` is not an int or None.
        ValueError: if ``weights`` is empty, names an adapter not in the model, holds a
            non-finite coefficient or a DoRA adapter, ``into`` is not a valid name or already
            exists, or ``rank`` is not positive.

    Example::

        >>> li.combine(model, {"task_a": 1.0, "task_b": 1.0}, into="both")
        >>> li.combine(model, {"task_a": 1.0, "task_b": -0.5}, into="small", rank=4)
        >>> li.activate(model, "small")
    """
    fn = "combine"
    if not isinstance(weights, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in weights.items()):
        raise TypeError(f"{fn}(): `weights` must map adapter names to numbers, such as {{'a': 1.0, 'b': -0.5}}, "
                        f"got {weights!r}.")
    if not weights:
        raise ValueError(f"{fn}(): `weights` must name at least one adapter, got {{}}.")
    bad = next((k for k, v in weights.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"{fn}(): `weights` must be finite, got {weights[bad]!r} for {bad!r}.")
    check_adapter_name(fn, into)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"{fn}(): `rank` must be a positive int or None, got {rank!r}.")
    if rank is not None and rank <= 0:
        raise ValueError(f"{fn}(): `rank` must be a positive int or None, got {rank}.")
    entries = list(loras(model))
    adapter_names(fn, entries, list(weights))
    plans = []
    for site in entries:
        lora, where = site.lora, site.where
        if into in lora.adapters:
            raise ValueError(f"{fn}(): the adapter {into!r} already exists on `{where}`. Pass another `into`, "
                             f"or remove it first with remove(model, adapter={into!r}).")
        names = [n for n in weights if n in lora.adapters]
        dora = next((n for n in names if lora.adapter(n).dora), None)
        if dora is not None:
            raise ValueError(f"{fn}(): adapter {dora!r} on `{where}` is DoRA, whose weight is not linear in its "
                             "factors, so it has no weighted sum. Combine plain adapters only.")
        other = next((n for n in names if lora.adapter(n).kind != "lora"), None)
        if other is not None:
            raise ValueError(f"{fn}(): adapter {other!r} on `{where}` is of kind {lora.adapter(other).kind!r}, "
                             "whose update is not a low-rank product B @ A, so a weighted sum of it has no "
                             "LoRA factors. Combine kind='lora' adapters only.")
        if names:
            plans.append((lora, names))
    done = []
    try:
        for lora, names in plans:
            A, B, error = _combined(lora, {n: weights[n] for n in names}, rank)
            r = A.shape[-2]
            first = lora.lora_A[names[0]]
            lora.add(into, Adapter(r=r, alpha=float(r)), dtype=first.dtype, device=first.device)
            done.append(lora)
            lora.active.remove(into)
            with torch.no_grad():
                lora.lora_A[into].copy_(A)
                lora.lora_B[into].copy_(B)
            record = lora.adapter(into)
            record.error, record.combined = error, {n: float(weights[n]) for n in names}
    except BaseException:
        for lora in done:
            lora.drop(into)
        raise
    return model


def _combined(lora: LoRA, weights: dict[str, float], rank: int | None) -> tuple[Tensor, Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A = sum_i w_i s_i B_i A_i`` (or its rank-``rank`` part)."""
    dtype = compute_dtype(lora.factor_dtype())
    As, Bs = [], []
    with torch.no_grad():
        for name, w in weights.items():
            A, B = lora.factor_pair(name)  # (.., r, in), (.., out, r): update s * B @ A
            As.append(A.to(dtype))
            Bs.append(B.to(dtype) * (w * lora.adapter(name).scaling))
        A, B = torch.cat(As, dim=-2), torch.cat(Bs, dim=-1)
        if rank is None:
            return A, B, 0.0
        # B @ A = Qb (Rb Ra^T) Qa^T with Qb (.., out, k), Qa (.., in, k): the SVD of the small core
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.mT)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
        keep = min(rank, S.shape[-1])
        root = S[..., :keep].sqrt()
        B_k = (Qb @ U[..., :keep]) * root.unsqueeze(-2)  # (.., out, keep)
        A_k = root.unsqueeze(-1) * (Vh[..., :keep, :] @ Qa.mT)  # (.., keep, in)
        if keep < rank:
            A_k = torch.cat([A_k, A_k.new_zeros(*A_k.shape[:-2], rank - keep, A_k.shape[-1])], dim=-2)
            B_k = torch.cat([B_k, B_k.new_zeros(*B_k.shape[:-1], rank - keep)], dim=-1)
        total, lost = S.square().sum(), S[..., keep:].square().sum()
        error = float((lost / total).sqrt()) if total > 0 else 0.0
    return A_k, B_k, error
