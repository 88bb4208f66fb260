"""Adapter state: which adapters are active, which parameters train, their state dict, and
``init_lora`` (the factors' values after a model built on the meta device is materialised)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from . import _call
from .inits import INITS, RANDOM_INITS, WEIGHT_INITS, init_factors
from .lookup import adapter_names, find_lora, lora_input, loras, named_modules, qualified
from .lora import LoRA

__all__ = [
    "activate",
    "adapter_parameters",
    "adapter_state_dict",
    "cached",
    "disabled",
    "init_lora",
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
    for qualname, _, tensor_name, lora in loras(model):
        yield qualified(qualname, tensor_name), lora


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
    for *_, lora in entries:
        lead = (lora.shape[0],) if lora.experts else ()
        for name in lora.adapters:
            r = lora.adapter(name).r
            if lora.adapter(name).kind != "lora":  # its tensors by name, at least
                flat = flat or any(name not in lora._modules[t]._parameters and name not in
                                   lora._modules[t]._buffers for t in lora.adapter(name).tensor_names)
                continue
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


adapter_parameters = lora_parameters  # the same helpers, named for adapters of every kind
adapter_state_dict = lora_state_dict
mark_only_adapters_as_trainable = mark_only_lora_as_trainable


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
    entries = list(loras(model))
    names = [adapters] if isinstance(adapters, str) else adapters
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"activate(): `adapters` must be a str or a sequence of str, got {adapters!r}. "
            "Pass [] to turn every adapter off."
        )
    adapter_names("activate", entries, names)
    for *_, lora in entries:
        lora.active = [n for n in dict.fromkeys(names) if n in lora.adapters]
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
    with _call.entered([lora for *_, lora in loras(model)], off=True):
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
    with _call.entered([lora for *_, lora in loras(model)], cache=True):
        yield model


def init_lora(model: M, adapter: str | Sequence[str] | None = None, *, init: str | None = None) -> M:
    r"""Initialise the LoRA tensors of ``model`` in place, as :func:`~lora_inject.inject` does.

    :func:`~lora_inject.inject` on a model built under ``torch.device("meta")`` allocates
    nothing: its factors are meta tensors too, without values. After
    ``model.to_empty(device=...)`` they hold uninitialised memory; this fills them from each
    adapter's ``init``: ``"default"`` (``A`` Kaiming-uniform, ``B`` zero) or ``"gaussian"``
    (``A ~ N(0, 1/r)``, ``B`` zero), so that the outputs are the base model's; ``"pissa"`` and
    ``"olora"`` (from ``W0``, with their frozen copies); and DoRA's magnitudes (from ``W0``).
    ``W0`` itself is not touched. Load the base weights first, with
    ``model.load_state_dict(base, strict=False)`` (keys saved before injection, such as
    ``p.weight``, load into ``W0``): the inits that read ``W0`` read them.

    Args:
        model (nn.Module): the model to change in place.
        adapter (str or sequence of str, optional): the adapters to initialise. Default: all.
        init (str, optional): ``"default"`` or ``"gaussian"`` for every selected adapter,
            instead of its own. Default: ``None``, each adapter's own ``init``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``adapter`` is not a str, a sequence of str or None.
        ValueError: if an adapter name is not in the model; ``init`` is not one of
            ``"default"``, ``"gaussian"`` or None; ``init`` is given for an adapter made with
            ``"pissa"``/``"olora"`` (its frozen copies belong to that init); an adapter's own
            init is unknown (``init=None``); or an adapter holds tensors this does not know.
        RuntimeError: if a factor, or a weight that an init reads, is still on the meta
            device; materialise the model first with ``model.to_empty(device=...)``.

    Nothing changes if the call raises.

    Example::

        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(config)              # no memory allocated
        >>> inject(model, "q_proj|v_proj", r=16)              # still none
        >>> model.to_empty(device="cpu")
        >>> model.load_state_dict(base_state_dict, strict=False)   # missing keys: the factors
        >>> init_lora(model)
    """
    if init is not None and init not in RANDOM_INITS:
        raise ValueError(f"init_lora(): `init` must be one of {RANDOM_INITS} or None, got {init!r}.")
    entries = list(loras(model))
    names = adapter_names("init_lora", entries, adapter)
    todo = []
    for qualname, module, tensor_name, lora in entries:
        where = qualified(qualname, tensor_name)
        for name in lora.adapters:
            if names is not None and name not in names:
                continue
            if lora.adapter(name).kind != "lora":
                raise ValueError(
                    f"init_lora(): adapter {name!r} on `{where}` is of kind {lora.adapter(name).kind!r}; "
                    "init_lora fills LoRA factors only. Inject that adapter after materialising the model, "
                    "or load its tensors with load_adapter().")
            own = lora.adapter(name).init
            if own not in INITS or (init is not None and own in WEIGHT_INITS):
                fix = (f"Pass `init=` one of {RANDOM_INITS}." if own not in INITS else
                       f"Leave `init=None` to redo {own!r}, or inject the adapter again.")
                raise ValueError(f"init_lora(): adapter {name!r} on `{where}` was made with "
                                 f"init={own!r}, which init_lora cannot replace or redo here. {fix}")
            unknown = [k for k, d in lora.named_children() if k not in lora.adapter(name).tensor_names
                       and (name in d._parameters or name in d._buffers)]
            if unknown:
                raise ValueError(
                    f"init_lora(): adapter {name!r} on `{where}` also holds {unknown}, which "
                    "init_lora does not know how to fill. Inject it again after materialising the model."
                )
            reads_w0 = own in WEIGHT_INITS or lora.adapter(name).dora
            weight = lora_input(module, tensor_name, lora) if reads_w0 else None
            if any(t.is_meta for t in lora.tensors(name).values()) or (weight is not None and weight.is_meta):
                raise RuntimeError(
                    f"init_lora(): adapter {name!r} on `{where}` is on the meta device (its factors, "
                    "or the weight its init reads), so there is nothing to fill or read. Materialise "
                    "the model first with model.to_empty(device=...), load the base weights, then "
                    "call init_lora."
                )
            todo.append((lora, name, init or own, weight))
    for lora, name, how, weight in todo:
        init_factors(lora.lora_A[name], lora.lora_B[name], how)
        lora.refresh_scaling(name)  # to_empty() left its tensor copy unset
        if weight is not None:
            lora.init_from_weight(name, weight)
    return model
