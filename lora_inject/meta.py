"""Models built on the meta device: ``init_lora`` gives the adapters' factors their values once
the model is materialised, as :func:`~lora_inject.inject` would have."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from ._inits import INITS, RANDOM_INITS, WEIGHT_INITS, init_factors, init_from_weight
from ._sites import adapter_names, loras

__all__ = [
    "init_lora",
]

M = TypeVar("M", bound=nn.Module)


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
    for site in entries:
        lora, where = site.lora, site.where
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
            weight = site.received if reads_w0 else None
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
        lora.set_scaling(name)  # to_empty() left its tensor copy unset
        if weight is not None:
            init_from_weight(lora, name, weight)
    return model
