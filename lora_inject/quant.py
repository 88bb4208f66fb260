"""Quantized base weights: how each backend's weight is read, dequantized and requantized.

A quantized ``W0`` stays as its backend stored it. LoRA needs four things of it, each given by
its :class:`Scheme`, found by the weight's class name along its MRO (so that neither torchao
nor bitsandbytes is imported unless a model holds their weights):

* its logical shape and dtype (bitsandbytes packs 4-bit weights as ``(n/2, 1)`` bytes);
* its value as a dense float tensor, built without gradient: for DoRA's norm, for the merged
  weight of ops with no factored form, for ``remove(merge=True)``;
* a new quantized tensor in the same scheme (type, block sizes, quantization type) from a dense
  one, for ``remove(merge=True)``;
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
from torch import Tensor

__all__: list[str] = []


@dataclass(frozen=True)
class Scheme:
    """What LoRA needs of one kind of quantized weight (see the module's docstring)."""

    name: str
    shape: Callable[[Tensor], torch.Size]
    dtype: Callable[[Tensor], torch.dtype]
    dequantize: Callable[[Tensor], Tensor]
    requantize: Callable[[Tensor, Tensor], Tensor]  # (like, dense) -> like's scheme
    own_forward: bool = False


def _torchao_int8(like: Tensor, dense: Tensor) -> Tensor:
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow, PerTensor

    block = tuple(like.block_size)
    if block == tuple(like.shape):
        granularity = PerTensor()
    elif block == (1, like.shape[-1]):
        granularity = PerRow()
    else:
        raise ValueError(f"remove(): cannot requantize an Int8Tensor with block_size={block}; "
                         "use remove(..., dequantize=True) for a dense weight.")
    return Int8Tensor.from_hp(dense.to(like.dtype), granularity, act_quant_kwargs=like.act_quant_kwargs)


def _torchao_intx(like: Tensor, dense: Tensor) -> Tensor:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return IntxUnpackedToInt8Tensor.from_hp(dense.to(like.dtype), tuple(like.block_size), like.target_dtype,
                                            activation_quantization=like.activation_quantization)


def _torchao_nf4(like: Tensor, dense: Tensor) -> Tensor:
    return type(like).from_tensor(dense.to(like.dtype), like.block_size, like.scaler_block_size)


def _bnb_4bit(like: Tensor, dense: Tensor) -> Tensor:
    import bitsandbytes as bnb

    _, qs = _bnb_4bit_state(like)
    new = bnb.nn.Params4bit(dense.to(qs.dtype), requires_grad=False, blocksize=qs.blocksize,
                            compress_statistics=like.compress_statistics, quant_type=like.quant_type,
                            quant_storage=like.quant_storage, module=like.module)
    return new.to(like.device)  # bitsandbytes quantizes as it moves


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
    cb = w.CB if w.CB is not None else w.data
    return cb.float() * (w.SCB.float().unsqueeze(1) / 127)


def _bnb_int8(like: Tensor, dense: Tensor) -> Tensor:
    import bitsandbytes as bnb

    return bnb.nn.Int8Params(dense.float(), requires_grad=False, has_fp16_weights=False).to(like.device)


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
           own_forward=True),
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


def requantize(like: Tensor, value: Tensor) -> Tensor:
    """``value`` quantized in the scheme of ``like``."""
    with torch.no_grad():
        return scheme(like).requantize(like, value)
