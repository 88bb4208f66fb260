"""Adapter state: which adapters are active, which parameters train, and their state dict."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from .lookup import _adapter_names, _loras, find_lora, named_modules, qualified
from .lora import LoRA

__all__ = [
    "activate",
    "cached",
    "disabled",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "named_loras",
]

M = TypeVar("M", bound=nn.Module)
BIAS_MODES = ("none", "all", "lora_only")


def named_loras(model: nn.Module) -> Iterator[tuple[str, LoRA]]:
    """Yield each adapted tensor's qualified name (``"layer.weight"``) and its :class:`LoRA`.

    Example::

        >>> for name, lora in named_loras(model):
        ...     print(name, lora.adapters, lora.active)
    """
    for qualname, _, tensor_name, lora in _loras(model):
        yield qualified(qualname, tensor_name), lora


def lora_parameters(model: nn.Module, adapter: str | Sequence[str] | None = None) -> Iterator[nn.Parameter]:
    """Yield the trainable LoRA tensors of ``model`` (the factors, and DoRA's magnitudes): all of
    them, or those of the named adapter(s).

    Raises:
        TypeError: if ``adapter`` is not a str, a sequence of str or None.
        ValueError: if an adapter name is not in the model.
    """
    entries = list(_loras(model))
    names = _adapter_names("lora_parameters", entries, adapter)  # raises now, not on first next()
    return iter([
        p for *_, lora in entries for name in lora.adapters if names is None or name in names
        for p in lora.tensors(name).values() if isinstance(p, nn.Parameter)
    ])


def lora_state_dict(model: nn.Module, adapter: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Return the LoRA tensors of ``model.state_dict()``, under the same keys.

    ``model.load_state_dict(lora_state_dict(model), strict=False)`` restores them.

    Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the factors are sharded DTensors; they
    are gathered into full tensors, which is a collective: call this on every rank.

    Raises:
        TypeError: if ``adapter`` is not a str, a sequence of str or None.
        ValueError: if an adapter name is not in the model.
        RuntimeError: if the model is sharded with FSDP1 (``FullyShardedDataParallel``), whose
            flat parameters do not keep the factors' shapes; shard with FSDP2's ``fully_shard``.
    """
    entries = list(_loras(model))
    names = _adapter_names("lora_state_dict", entries, adapter)
    refuse_flat_params("lora_state_dict", model, entries)
    keys = set()
    for prefix, module in model.named_modules(remove_duplicate=False):  # as state_dict(): every path
        if isinstance(module, LoRA):
            for name in module.adapters:
                if names is None or name in names:
                    keys |= {f"{prefix}.{attr}.{name}" for attr in module.tensors(name)}
    return {k: full_tensor(v) for k, v in model.state_dict().items() if k in keys}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor gathered from its shards if it is a DTensor (a collective)."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def refuse_flat_params(fn: str, model: nn.Module, entries) -> None:
    """Raise if FSDP1 has flattened the LoRA factors of ``model`` (``entries`` from ``_loras``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP1 module can exist
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    flat = fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules())
    for *_, lora in entries:
        lead = (lora.shape[0],) if lora.experts else ()
        for name in lora.adapters:
            r = lora.config[name]["r"]
            flat = flat or name not in lora.lora_A._parameters or (
                tuple(lora.lora_A[name].shape) != (*lead, r, lora.in_features)
                or tuple(lora.lora_B[name].shape) != (*lead, lora.out_features, r))
    if flat:
        raise RuntimeError(
            f"{fn}(): the model's LoRA factors are flattened, as FSDP1 (FullyShardedDataParallel) "
            "does, so they cannot be read back in their shapes. Shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard on each block and on the root); see the README's "
            "\"Distributed training\"."
        )


def mark_only_lora_as_trainable(model: M, bias: str = "none") -> M:
    """Set ``requires_grad`` on the LoRA factors only, and on biases as ``bias`` says.

    Args:
        model (nn.Module): the model to change in place.
        bias (str): ``"none"``: no bias trains; ``"all"``: every parameter named ``bias``
            trains; ``"lora_only"``: the biases of modules that carry LoRA train.

    Returns:
        ``model``.

    Raises:
        ValueError: if ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``.
    """
    if bias not in BIAS_MODES:
        raise ValueError(
            f"mark_only_lora_as_trainable(): `bias` must be one of {BIAS_MODES}, got {bias!r}."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    if bias != "none":
        for _, module in named_modules(model):
            if isinstance(module, LoRA):
                continue
            adapted = any(find_lora(module, t) for t in getattr(module, "parametrizations", {}) or {})
            b = module._parameters.get("bias")
            if b is not None and (bias == "all" or adapted):
                b.requires_grad_(True)
    return model


def activate(model: M, adapters: str | Sequence[str]) -> M:
    """Make exactly ``adapters`` active on every tensor that carries them; others go inactive.

    Args:
        model (nn.Module): the model to change in place.
        adapters (str or sequence of str): the adapter name(s); ``[]`` turns all off.

    Returns:
        ``model``.

    Raises:
        TypeError: if ``adapters`` is not a str or a sequence of str.
        ValueError: if a name is not in the model.
    """
    entries = list(_loras(model))
    names = [adapters] if isinstance(adapters, str) else adapters
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"activate(): `adapters` must be a str or a sequence of str, got {adapters!r}. "
            "Pass [] to turn every adapter off."
        )
    _adapter_names("activate", entries, names)
    for *_, lora in entries:
        lora.active = [n for n in dict.fromkeys(names) if n in lora.adapters]
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every adapter off inside the ``with`` block; restore each one's state on exit.

    It is safe under exceptions and nests.

    Example::

        >>> with disabled(model):
        ...     base_out = model(x)
    """
    saved = [(lora, list(lora.active)) for *_, lora in _loras(model)]
    for lora, _ in saved:
        lora.active = []
    try:
        yield model
    finally:
        for lora, active in saved:
            lora.active = active


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
    loras = [lora for *_, lora in _loras(model)]
    saved = [lora.cache for lora in loras]
    for lora in loras:
        if lora.cache is None:
            lora.cache = ()
    try:
        yield model
    finally:
        for lora, cache in zip(loras, saved):
            lora.cache = cache
