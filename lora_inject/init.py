"""Initialise LoRA factors in place, such as after ``to_empty`` on a model built on the meta device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from .lora import init_factors
from .surgery import _adapter_names, _loras

__all__ = ["init_lora"]

M = TypeVar("M", bound=nn.Module)
RANDOM_INITS = ("default", "gaussian")  # the inits that do not read W0
FACTORS = ("lora_A", "lora_B")


def init_lora(model: M, adapter: str | Sequence[str] | None = None, *, init: str | None = None) -> M:
    r"""Initialise the LoRA factors of ``model`` in place, so that every update ``B @ A`` is zero.

    :func:`~lora_inject.inject` on a model built under ``torch.device("meta")`` allocates
    nothing: its factors are meta tensors too, without values. After
    ``model.to_empty(device=...)`` they hold uninitialised memory; this fills them as ``inject``
    does: ``A`` from the adapter's ``init`` (``"default"``: Kaiming-uniform, ``"gaussian"``:
    ``N(0, 1/r)``) and ``B`` with zeros, so the model's outputs are the base model's. ``W0`` is
    not touched: load the base weights with ``model.load_state_dict(base, strict=False)``
    (the keys saved before injection, such as ``p.weight``, load into ``W0``).

    Args:
        model (nn.Module): the model to change in place.
        adapter (str or sequence of str, optional): the adapters to initialise. Default: all.
        init (str, optional): ``"default"`` or ``"gaussian"`` for every adapter. Default: ``None``,
            each adapter's own ``init``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``adapter`` is not a str, a sequence of str or None.
        ValueError: if an adapter name is not in the model, ``init`` is not valid,
            ``init=None`` and an adapter's own init reads the weight (or is unknown), or an
            adapter holds tensors other than its two factors, which this does not fill.
        RuntimeError: if a factor is still on the meta device; materialise the model first
            with ``model.to_empty(device=...)``.

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
    entries = list(_loras(model))
    names = _adapter_names("init_lora", entries, adapter)
    todo = []
    for qualname, _, tensor_name, lora in entries:
        where = f"{qualname}.{tensor_name}" if qualname else tensor_name
        for name in lora.adapters:
            if names is not None and name not in names:
                continue
            how = init or lora.config[name]["init"]
            if how not in RANDOM_INITS:
                raise ValueError(
                    f"init_lora(): adapter {name!r} on `{where}` was made with init={how!r}, which "
                    f"init_lora cannot redo. Pass `init=` one of {RANDOM_INITS}."
                )
            others = [k for k, d in lora.named_children() if k not in FACTORS
                      and (name in d._parameters or name in d._buffers)]
            if others:
                raise ValueError(
                    f"init_lora(): adapter {name!r} on `{where}` also holds {others}, which "
                    "init_lora does not fill. Inject it again after materialising the model."
                )
            A, B = lora.lora_A[name], lora.lora_B[name]
            if A.is_meta or B.is_meta:
                raise RuntimeError(
                    f"init_lora(): the factors of adapter {name!r} on `{where}` are on the meta "
                    "device, so they have no memory to fill. Materialise the model first with "
                    "model.to_empty(device=...), then call init_lora."
                )
            todo.append((A, B, how))
    for A, B, how in todo:
        init_factors(A, B, how)
    return model
