"""Taking adapters off one adapted tensor, for ``remove``: what to do there (:class:`Removal`),
decided and checked before anything is written; merging into the stored tensors (``W0``, a
quantized weight requantized, or the originals of a parametrization that comes before ours); and
detaching our parametrization (:func:`detach`, which ``inject``'s roll-back uses too), which gives
the module its class, hooks and tied users back."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _quant as quant
from ._chain import forward_to, inverse, kept, originals
from ._hooks import unhook
from ._module_class import disown_class
from ._sites import Site, module_loras
from ._tied import untie
from ._view import compute_dtype
from .kind import find_kind
from .lora import LoRA, unlink_bias


# -- what to do, decided first ------------------------------------------------------------------
@dataclass
class Removal:
    """What ``remove`` does on one site, decided before anything is written."""

    site: Site
    names: list[str]  # the adapters it takes off
    merged: list[str]  # those it folds into the stored tensor first
    scheme: object  # the stored tensor's quantization scheme (see lora_inject._quant), or None
    rewrite: bool  # the stored tensor is quantized and is replaced (merged into, or written dense)
    build: Callable[[Tensor], Tensor] | None  # requantizes a rewritten tensor; None: written dense


def removal(site: Site, names: set[str] | None, merge: bool, dequantize: bool) -> Removal | None:
    """What ``remove`` would do on ``site`` (None: nothing), once it is checked that it can.

    Raises:
        ValueError, RuntimeError: as :func:`~lora_inject.surgery.remove` says; nothing has been written.
    """
    lora, where = site.lora, site.where
    mine = [n for n in lora.adapters if names is None or n in names]
    if not mine:
        return None
    merge_now = [n for n in mine if n in lora.active] if merge else []
    staying = [n for n in lora.active if n not in mine]
    if merge_now and staying and any(lora.adapter(n).dora for n in merge_now + staying):
        raise ValueError(
            f"remove(): merging {merge_now} into `{where}` while {staying} stay "
            "active would change the outputs: a DoRA adapter's norm is taken over W0, which the merge "
            f"rewrites. The model is unchanged; remove them together (adapter={merge_now + staying}), "
            "turn the others off first with li.activate(), or use merge=False.")
    if merge_now and staying:
        order = list(lora.records)
        late = [n for n in merge_now if order.index(n) > min(order.index(m) for m in staying)]
        turns = [n for n in merge_now + staying if lora.adapter(n).kind != "lora"
                 and not find_kind(lora.adapter(n).kind).additive]
        if late and turns:
            raise ValueError(
                f"remove(): merging {late} into `{where}` while {staying} stay active would change the "
                f"outputs: {turns} change(s) the weight by more than a sum (kind "
                f"{lora.adapter(turns[0]).kind!r}), and the adapters apply in the order they were injected, "
                f"so {late} cannot go under the earlier {staying} into W0. The model is unchanged; remove them "
                "together, turn the others off first with li.activate(), or use merge=False.")
    if merge_now:
        _merge_into_originals(site, merge_now, write=False)
    plist = site.plist
    scheme = quant.scheme(plist.original) if list(plist).index(lora) == 0 else None
    # A quantized W0 is rewritten when merged into, or written dense once its last adapter goes.
    rewrite = scheme is not None and bool(merge_now or dequantize and len(mine) == len(lora.adapters))
    build = None
    if rewrite and not dequantize:
        try:
            build = quant.requantizer(plist.original)
        except ValueError as e:
            raise ValueError(f"remove(): cannot merge into `{where}`: {e} The model is unchanged; pass "
                             "dequantize=True for a dense merged weight, or use merge=False.") from None
    return Removal(site, mine, merge_now, scheme, rewrite, build)


def take_off(plan: Removal, dequantize: bool, rounding: list) -> None:
    """Do what ``plan`` says: merge, drop the adapters, and detach a LoRA left with none."""
    site, merge_now = plan.site, plan.merged
    module, lora = site.module, site.lora
    plist = site.plist
    if plan.rewrite:
        with torch.no_grad():
            target = lora.merged(plist.original, merge_now) if merge_now else quant.dense(plist.original)
        plist.original = _quantized_as(target, plan.build, site.where, rounding)
    elif merge_now:
        _merge_into_originals(site, merge_now, write=True)
    bias = lora.__dict__.get("bias_link")
    if bias is not None and merge_now:  # IA³ scaled the bias with the weight: fold that in too
        with torch.no_grad():
            b = module.parametrizations[bias].original
            b.copy_(lora.bias_of(b, merge_now))
    for name in plan.names:
        lora.drop(name)
    if bias is not None and not any(find_kind(a.kind).biased(a.options) for a in lora.records.values()
                                    if a.kind != "lora"):
        unlink_bias(module, lora)
    if not lora.adapters:
        detach(site)
        scheme = plan.scheme
        if scheme is not None and scheme.own_forward and dequantize and not parametrize.is_parametrized(module):
            module.__class__ = nn.Linear  # its weight is dense now: the plain layer's forward


def _quantized_as(target: Tensor, build, where: str, rounding: list) -> nn.Parameter:
    """``target`` as a weight's new stored tensor: dense (``build`` None), or requantized by
    ``build`` (see :func:`lora_inject._quant.requantizer`), its rounding recorded in ``rounding``."""
    if build is None:
        return nn.Parameter(target, requires_grad=False)
    new = build(target)
    scale = float(target.abs().max()) or 1.0
    rounding.append((float((quant.dense(new).float() - target.float()).abs().max()) / scale, where))
    return new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=False)


# -- merging into the stored tensors ------------------------------------------------------------
def _merge_into_originals(site: Site, names: list[str], *, write: bool) -> None:
    """Fold ``names`` of the site's LoRA into the originals of its tensor.

    With ``write=False`` only check that it can be done: a finite result, and, when other
    parametrizations come before ours, that they can represent it.
    """
    lora, where, plist = site.lora, site.where, site.plist
    index = list(plist).index(lora)
    non_finite = ValueError(
        f"remove(): merging adapter(s) {names} into `{where}` gives non-finite values "
        "(NaN or inf in lora_A/lora_B or in the weight, or overflow in the weight's dtype). "
        "The model is unchanged; fix the factors, or remove with merge=False."
    )
    with torch.no_grad():
        if index == 0 and quant.scheme(plist.original) is not None:  # checked here, written by remove()
            if not torch.isfinite(lora.merged(plist.original, names)).all():
                raise non_finite
            return
        if index == 0:  # ours comes first: the originals are W0 itself
            if write:
                _merge_into_w0(lora, plist.original, names)
            elif not _merge_is_finite(lora, plist.original, names):
                raise non_finite
            return
        stored = originals(plist)
        target = lora.merged(site.received, names)
        if target.device.type != "meta" and not torch.isfinite(target).all():
            raise non_finite
        # A right_inverse may set its own tensors (orthogonal's `base`): a check must not keep them.
        with nullcontext() if write else kept(list(plist)[:index]):
            new = inverse(list(plist)[:index], target)
            new = [new] if isinstance(new, Tensor) else list(new)
            check = forward_to(plist, new, index)
        tol = 1e-3 if target.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if check.shape != target.shape or not torch.allclose(check, target, rtol=tol, atol=tol):
            raise RuntimeError(
                f"remove(): cannot merge into `{where}`: the parametrization "
                f"{type(plist[index - 1]).__name__} registered before LoRA cannot represent "
                "W + ΔW, so merging is ill-defined. The model is unchanged; use merge=False, "
                "or remove that parametrization first."
            )
        if write:
            for o, n in zip(stored, new):
                o.copy_(n)


def _merge_into_w0(lora: LoRA, W: Tensor, names: list[str]) -> None:
    """Write the weight ``W`` takes with ``lora``'s adapters ``names`` into ``W`` in place: with
    ``addmm_`` where ``W`` is already in the compute dtype and every adapter is a plain LoRA, else
    through :meth:`LoRA.merged` (a float32 sum, cast back)."""
    ct = compute_dtype(W.dtype, lora.factor_dtype())
    records = lora.records
    if (W.dtype != ct or not W.is_contiguous() or any(records[n].dora for n in names)
            or not lora.only_lora(names)):
        W.copy_(lora.merged(W, names))
        return
    view = lora.view
    rows, cols = (view.in_features, view.out_features) if view.transpose else (view.out_features, view.in_features)
    M = W.view(*view.lead, rows, cols)
    for name in names:
        A, B = (t.to(ct) for t in lora.factor_pair(name))
        L, R = view.stored_factors(A, B)  # stored update = s * L @ R
        (M.baddbmm_ if view.experts else M.addmm_)(L, R, alpha=records[name].scaling)


def _merge_is_finite(lora: LoRA, W: Tensor, names: list[str]) -> bool:
    """Whether ``lora.merged(W, names)`` is finite, from a cheap bound where it suffices."""
    if W.is_meta:
        return True
    records = lora.records
    if any(records[n].dora for n in names) or not lora.only_lora(names):
        return bool(torch.isfinite(lora.merged(W, names)).all())
    factors = [t for n in names for t in lora.factor_pair(n)]
    if not all(bool(torch.isfinite(t).all()) for t in factors):
        return False
    if W.numel():
        lo, hi = W.aminmax()
        bound = max(abs(float(lo)), abs(float(hi)))
        for n in names:
            A, B = lora.factor_pair(n)
            a, b = (float(t.abs().max()) if t.numel() else 0.0 for t in (A, B))
            bound += abs(records[n].scaling) * A.shape[-2] * a * b
        if bound < torch.finfo(W.dtype).max / 2:  # NaN compares False, and falls through
            return True
    return bool(torch.isfinite(lora.merged(W, names)).all())


# -- detaching ours -----------------------------------------------------------------------------
def detach(site: Site) -> None:
    """Take the site's LoRA off its tensor, leaving the originals' values as they are (and letting
    them train again where inject froze them)."""
    module, tensor_name, lora = site.module, site.tensor_name, site.lora
    thaw = site.originals if lora.froze else []
    unlink_bias(module, lora)
    plist = module.parametrizations[tensor_name]
    if len(plist) == 1:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        if lora.non_persistent:
            module._non_persistent_buffers_set.add(tensor_name)
    else:
        del plist[list(plist).index(lora)]
    order = getattr(lora, "param_order", None)
    if order is not None and tensor_name in module._parameters:
        params = module._parameters
        kept = {k: params[k] for k in order if k in params}
        kept.update({k: v for k, v in params.items() if k not in kept})
        params.clear()
        params.update(kept)
    untie(lora, site.stored)  # its tied users store the very same tensor again
    for t in thaw:
        if isinstance(t, nn.Parameter):
            t.requires_grad_(True)
    if not module_loras(module):
        unhook(module)
        if parametrize.is_parametrized(module):  # by others, whose class it keeps
            disown_class(module)
