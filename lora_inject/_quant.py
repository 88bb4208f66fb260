"""Quantized base weights: how each backend's weight is read, dequantized and requantized.

A quantized ``W0`` stays as its backend stored it. LoRA needs four things of it, each given by
its :class:`Scheme`, found by the weight's class name along its MRO (so that neither torchao
nor bitsandbytes is imported unless a model holds their weights):

* its logical shape and dtype (bitsandbytes packs 4-bit weights as ``(n/2, 1)`` bytes);
* its value as a dense float tensor, built without gradient: for DoRA's norm, for the merged
  weight of ops with no factored form, for ``remove(merge=True)``;
* a new quantized tensor in the same scheme (type, block sizes, quantization type, mapping and
  zero points) from a dense one, for ``remove(merge=True)``: :func:`requantizer` decides how, or
  refuses, before anything is written, and the function it returns builds the tensor;
* for a weight whose module may keep part of its state (bitsandbytes' ``Linear8bitLt`` moves its
  weight's scales to ``module.state`` in its first forward), how to put that state back on the
  weight (:func:`adopt`), so that the weight alone can be read;
* whether the module's own forward must run on it (bitsandbytes' layers read their weight's
  quantization state directly), rather than ``F.linear`` on the weight (torchao's tensors
  dispatch it themselves).

Schemes: torchao's ``Int8Tensor`` (``Int8WeightOnlyConfig``), ``IntxUnpackedToInt8Tensor``
(``IntxWeightOnlyConfig``) and ``NF4Tensor``; bitsandbytes' ``Params4bit`` (``Linear4bit``,
nf4 and fp4) and ``Int8Params`` (``Linear8bitLt``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Scheme:
    """What LoRA needs of one kind of quantized weight (see the module's docstring)."""

    name: str
    shape: Callable[[Tensor], torch.Size]
    dtype: Callable[[Tensor], torch.dtype]
    dequantize: Callable[[Tensor], Tensor]
    # like -> (dense -> a tensor in like's scheme); raises ValueError if like's scheme cannot be rebuilt
    requantizer: Callable[[Tensor], Callable[[Tensor], Tensor]]
    own_forward: bool = False
    adopt: Callable[[nn.Module, Tensor], None] | None = None  # (module, its weight): state back on the weight


def _torchao_int8(like: Tensor) -> Callable[[Tensor], Tensor]:
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow, PerTensor

    block = tuple(like.block_size)
    if block == tuple(like.shape):
        granularity = PerTensor()
    elif block == (1, like.shape[-1]):
        granularity = PerRow()
    else:
        raise ValueError(f"an Int8Tensor with block_size={block} (per-group) cannot be requantized: only "
                         f"per-tensor {tuple(like.shape)} and per-row {(1, like.shape[-1])} blocks can.")
    return lambda dense: Int8Tensor.from_hp(dense.to(like.dtype), granularity, act_quant_kwargs=like.act_quant_kwargs)


def _torchao_intx(like: Tensor) -> Callable[[Tensor], Tensor]:
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType
    from torchao.quantization.quant_api import _adjust_scale_dtype_in_intx_unpacked_tensor

    # The tensor keeps no mapping type: zero points say it. Symmetric mappings store them all zero.
    mapping = MappingType.ASYMMETRIC if bool(like.zero_point.any()) else MappingType.SYMMETRIC
    block, target, scale_dtype = tuple(like.block_size), like.target_dtype, like.scale.dtype

    def build(dense: Tensor) -> Tensor:
        hp = dense.to(like.dtype)
        new = IntxUnpackedToInt8Tensor.from_hp(hp, block, target, mapping_type=mapping,
                                               activation_quantization=like.activation_quantization)
        if new.scale.dtype != scale_dtype:  # IntxWeightOnlyConfig(scale_dtype=...), as torchao applies it
            _adjust_scale_dtype_in_intx_unpacked_tensor(new, hp, scale_dtype)
        return new

    return build


def _torchao_nf4(like: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda dense: type(like).from_tensor(dense.to(like.dtype), like.block_size, like.scaler_block_size)


def _bnb_4bit(like: Tensor) -> Callable[[Tensor], Tensor]:
    import bitsandbytes as bnb

    _, qs = _bnb_4bit_state(like)

    def build(dense: Tensor) -> Tensor:
        new = bnb.nn.Params4bit(dense.to(qs.dtype), requires_grad=False, blocksize=qs.blocksize,
                                compress_statistics=like.compress_statistics, quant_type=like.quant_type,
                                quant_storage=like.quant_storage, module=like.module)
        return new.to(like.device)  # bitsandbytes quantizes as it moves

    return build


def _bnb_4bit_state(w: Tensor):
    """``(data, quant_state)`` of a 4-bit weight in bitsandbytes' own layout. In eval mode on a
    CPU with AVX512-BF16, ``Linear4bit`` repacks its weight for its inference kernel; this reads
    the packed form back (on a copy of the state) without changing the weight."""
    qs = w.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        return w.data, qs
    import bitsandbytes.functional as bf

    return bf._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(qs))


def _bnb_4bit_dense(w: Tensor) -> Tensor:
    import bitsandbytes.functional as bf

    data, qs = _bnb_4bit_state(w)
    return bf.dequantize_4bit(data, qs).to(qs.dtype)


def _bnb_int8_dense(w: Tensor) -> Tensor:
    if w.SCB is None:
        raise RuntimeError("an Int8Params weight without its scales (SCB): its Linear8bitLt keeps them in "
                           "`module.state` after a forward; lora_inject._quant.adopt(module, weight) puts them back.")
    cb = w.CB if w.CB is not None else w.data
    return cb.float() * (w.SCB.float().unsqueeze(1) / 127)


def _bnb_int8_adopt(module: nn.Module, w: Tensor) -> None:
    """``Linear8bitLt``'s first forward moves its weight's ``CB``/``SCB`` to ``module.state``
    (``init_8bit_state``) and clears them on the weight: put them back, the layout bitsandbytes
    has after ``.to(device)``, which its next forward reads as well."""
    state = getattr(module, "state", None)
    if w.SCB is None and getattr(state, "SCB", None) is not None:
        w.CB = state.CB if state.CB is not None else w.data
        w.SCB = state.SCB


def _bnb_int8(like: Tensor) -> Callable[[Tensor], Tensor]:
    import bitsandbytes as bnb

    return lambda dense: bnb.nn.Int8Params(dense.float(), requires_grad=False,
                                           has_fp16_weights=False).to(like.device)


def _logical(t: Tensor) -> torch.Size:
    return t.shape


def _own_dtype(t: Tensor) -> torch.dtype:
    return t.dtype


def _dequantized(t: Tensor) -> Tensor:
    return t.dequantize()


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("torchao.quantization.Int8Tensor", _logical, _own_dtype,
           _dequantized, _torchao_int8),
    Scheme("torchao.quantization.IntxUnpackedToInt8Tensor", _logical, _own_dtype, _dequantized, _torchao_intx),
    Scheme("torchao.quantization.quantize_.workflows.nf4.nf4_tensor.NF4Tensor", _logical, _own_dtype,
           lambda t: t.get_original_weight(), _torchao_nf4),
    Scheme("bitsandbytes.nn.modules.Params4bit", lambda t: t.quant_state.shape, lambda t: _bnb_4bit_state(t)[1].dtype,
           _bnb_4bit_dense, _bnb_4bit, own_forward=True),
    Scheme("bitsandbytes.nn.modules.Int8Params", _logical, lambda t: torch.float32, _bnb_int8_dense, _bnb_int8,
           own_forward=True, adopt=_bnb_int8_adopt),
)}


# bitsandbytes' quantized layers, and the plain layer each stands for: an adapter of one loads onto the other
LAYERS = {"Linear4bit": "Linear", "LinearNF4": "Linear", "LinearFP4": "Linear", "Linear8bitLt": "Linear"}


def same_layer(saved: str, now: str) -> bool:
    """Whether an adapter saved from a layer of type ``saved`` fits one of type ``now``: the same
    type, or one a quantized form of the other."""
    return saved == now or LAYERS.get(saved, saved) == LAYERS.get(now, now)


def scheme(t: object) -> Scheme | None:
    """The scheme of a quantized weight, or None for any other tensor (plain, FSDP's DTensor...)."""
    cls = type(t)
    if cls is Tensor or cls is torch.nn.Parameter:
        return None
    for c in cls.__mro__:
        found = SCHEMES.get(f"{c.__module__}.{c.__qualname__}")
        if found is not None:
            return found
    return None


def shape(t: Tensor) -> torch.Size:
    """The shape ``t`` stands for: its own, or a quantized weight's logical one."""
    s = scheme(t)
    return t.shape if s is None else torch.Size(s.shape(t))


def dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t`` stands for: its own, or a quantized weight's logical one."""
    s = scheme(t)
    return t.dtype if s is None else s.dtype(t)


def dense(t: Tensor) -> Tensor:
    """``t`` itself, or a quantized weight's value as a dense tensor of its logical dtype, without gradient."""
    s = scheme(t)
    if s is None:
        return t
    with torch.no_grad():
        return s.dequantize(t).to(s.dtype(t)).reshape(s.shape(t))


def requantizer(like: Tensor) -> Callable[[Tensor], Tensor]:
    """How to quantize a dense tensor in the scheme of ``like`` (type, block sizes, quantization
    type, mapping, scale dtype), decided without quantizing anything.

    Raises:
        ValueError: if ``like``'s scheme cannot be rebuilt; the message says which and why.
    """
    build = scheme(like).requantizer(like)

    def quantized(value: Tensor) -> Tensor:
        with torch.no_grad():
            return build(value)

    return quantized


def requantize(like: Tensor, value: Tensor) -> Tensor:
    """``value`` quantized in the scheme of ``like``."""
    return requantizer(like)(value)


def adopt(module: nn.Module, t: Tensor) -> None:
    """Put back on the quantized weight ``t`` of ``module`` whatever state the module took from it
    (see :class:`Scheme`), so that ``t`` alone can be read; nothing for any other tensor."""
    s = scheme(t)
    if s is not None and s.adopt is not None:
        s.adopt(module, t)
