"""The adapters' tensors: which are trainable parameters, the state dict that holds them, and
the names of the adapted tensors."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn

from ._chain import find_lora
from ._selection import named_modules
from ._sites import adapter_names, loras
from .lora import LoRA

__all__ = [
    "adapter_parameters",
    "adapter_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_adapters_as_trainable",
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
    for site in loras(model):
        yield site.where, site.lora


def lora_parameters(model: nn.Module, adapter: str | Sequence[str] | None = None) -> Iterator[nn.Parameter]:
    """Yield the trainable adapter tensors of ``model`` (the factors, and DoRA's magnitudes; every
    trained tensor of another kind, such as LoHa's or IA³'s, but not VeRA's frozen projections):
    all of them, or those of the named adapter(s).

    Raises:
        TypeError: if ``adapter`` is not a str, a sequence of str or None.
        ValueError: if an adapter name is not in the model.
    """
    entries = list(loras(model))
    names = adapter_names("lora_parameters", entries, adapter)  # raises now, not on first next()
    return iter([
        p for site in entries for name in site.lora.adapters if names is None or name in names
        for p in site.lora.tensors(name).values() if isinstance(p, nn.Parameter)
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
    entries = list(loras(model))
    names = adapter_names("lora_state_dict", entries, adapter)
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
    """Raise if FSDP1 has flattened the LoRA factors of ``model`` (``entries`` from ``loras``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP1 module can exist
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    flat = fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules())
    for lora in (site.lora for site in entries):
        view = lora.view
        for name in lora.adapters:
            r = lora.adapter(name).r
            if lora.adapter(name).kind != "lora":  # its tensors by name, at least
                flat = flat or any(name not in lora._modules[t]._parameters and name not in
                                   lora._modules[t]._buffers for t in lora.adapter(name).tensor_names)
                continue
            flat = flat or name not in lora.lora_A._parameters or (
                tuple(lora.lora_A[name].shape) != view.factor_shapes(r)[0]
                or tuple(lora.lora_B[name].shape) != view.factor_shapes(r)[1])
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


adapter_parameters = lora_parameters  # the same helpers, named for adapters of every kind
adapter_state_dict = lora_state_dict
mark_only_adapters_as_trainable = mark_only_lora_as_trainable
