"""Optimizer parameter groups for LoRA+ (peft's ``create_loraplus_optimizer``), for any optimizer.

LoRA+ (Hayou et al., 2024) trains ``B`` faster than ``A``. :func:`loraplus_param_groups` sorts
the trainable parameters of a model as peft 0.21 sorts them, into four groups in peft's order:

========================  ===================================  ==========================
group                     which parameters                     lr, weight decay
========================  ===================================  ==========================
A                         every other trainable tensor         ``lr``, ``loraplus_weight_decay``
embedding                 the adapter tensors of an Embedding  ``loraplus_lr_embedding``, same
B                         ``lora_B``, and 1-D tensors          ``lr * loraplus_lr_ratio``, same
B, no decay               those of B named ``bias`` or inside  ``lr * loraplus_lr_ratio``, 0
                          a ``LayerNorm``
========================  ===================================  ==========================

peft decides by the name (``lora_B`` in it) and the number of dimensions (1-D) of each tensor as
peft holds it; here each adapter tensor is sorted as its peft counterpart would be:

* LoRA: ``lora_B`` is B; ``lora_A`` is A; DoRA's magnitude is 1-D in peft (B) except on a conv,
  where peft holds it as ``(1, out, 1, ..)`` (A). On an ``Embedding`` both factors are in the
  embedding group, and DoRA's magnitude is B, as in peft (whose check of the layer misses it).
* VeRA: both trained vectors, ``vera_lambda_b`` and ``vera_lambda_d``, are 1-D, so both are B.
* LoHa, LoKr, OFT and IA³ have no tensor that peft's rule makes B (every one is 2-D or more and
  none is named ``lora_B``): LoRA+ would train them at ``lr`` alone, so they are refused.
* any other kind (one registered with :func:`~lora_inject.register_kind`): peft's rule on its
  tensors' names and dimensions, refused as above where none of them is B.

A trainable tensor outside the adapters (a bias, a norm, a head) follows peft's rule on its name
in the model: 1-D is B, named ``bias`` or inside a ``LayerNorm`` without weight decay.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import type_before_parametrizations

from .lora import LoRA

__all__ = ["loraplus_param_groups"]


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0, *,
                          loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    r"""Return LoRA+'s parameter groups for ``model``'s trainable parameters, as peft's
    ``create_loraplus_optimizer`` makes them, to pass to any ``torch.optim`` optimizer.

    The groups, in peft's order, are A (``lr``), the adapter tensors of embeddings
    (``loraplus_lr_embedding``), B (``lr * loraplus_lr_ratio``) and B without weight decay; see
    :mod:`lora_inject.param_groups` for which tensor goes where, kind by kind. Each group is a dict
    with ``params``, ``lr`` and ``weight_decay``; a group may be empty, as in peft.

    Args:
        model (nn.Module): a model carrying adapters; only parameters with ``requires_grad`` count.
        lr (float): the learning rate of A (and of every tensor that is not B).
        loraplus_lr_ratio (float): B's learning rate over A's. Default: 16.0.
        loraplus_weight_decay (float): the weight decay of every group but the last. Default: 0.0.
        loraplus_lr_embedding (float): the learning rate of the adapter tensors on an
            ``Embedding``. Default: 1e-6.

    Returns:
        list of dict: the four parameter groups.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if a rate or the weight decay is not a finite real number (rates
            positive, the decay at least 0), or a trainable adapter is of a kind in which no
            tensor is B under peft's rule (LoHa, LoKr, OFT, IA³).

    Example::

        >>> inject(model, ["q_proj", "v_proj"], r=8)
        >>> opt = torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4, loraplus_lr_ratio=16))
    """
    fn = "loraplus_param_groups"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(): `model` must be an nn.Module, got {type(model).__name__}.")
    for name, value, least in (("lr", lr, None), ("loraplus_lr_ratio", loraplus_lr_ratio, None),
                               ("loraplus_lr_embedding", loraplus_lr_embedding, None),
                               ("loraplus_weight_decay", loraplus_weight_decay, 0.0)):
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not real or (value < least if least is not None else value <= 0):
            bound = "at least 0" if least is not None else "positive"
            raise ValueError(f"{fn}(): `{name}` must be a finite real number, {bound}, got {value!r}.")
    sorts = _adapter_sorts(fn, model)
    no_decay = _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        where = sorts.get(id(p))
        if where is None:  # not an adapter tensor: peft's rule on its name in the model
            where = "B" if "lora_B" in name or p.ndim == 1 else "A"
        if where == "B" and (name in no_decay or "bias" in name):
            where = "B_no_decay"
        groups[where].append(p)
    return [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def _adapter_sorts(fn: str, model: nn.Module) -> dict[int, str]:
    """``id(tensor)`` to ``"A"``, ``"B"`` or ``"embedding"`` for each trainable adapter tensor, as
    peft would sort its counterpart; raise for a kind in which none is B."""
    out: dict[int, str] = {}
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        embedding = issubclass(type_before_parametrizations(module), nn.Embedding)
        for plist in module.parametrizations.values():
            for lora in plist:
                if not isinstance(lora, LoRA):
                    continue
                view = lora.view
                conv = len(view.shape) > 2 and not view.experts and not view.transpose
                for adapter in lora.adapters:
                    kind = lora.adapter(adapter).kind
                    trained = {k: t for k, t in lora.tensors(adapter).items() if t.requires_grad}
                    sorts = {}
                    for k, t in trained.items():
                        ndim = len(view.shape) if k == "lora_magnitude" and conv else t.ndim  # peft's (1, out, 1, ..)
                        # peft's DoRA magnitude sits one level below its Embedding layer, out of the rule
                        sorts[k] = "embedding" if embedding and k != "lora_magnitude" else \
                            "B" if "lora_B" in k or ndim == 1 else "A"
                    if trained and "B" not in sorts.values() and not embedding:
                        raise ValueError(
                            f"{fn}(): adapter {adapter!r} is of kind {kind!r}, in which no tensor is LoRA+'s B "
                            f"under peft's rule ({sorted(trained)}: none is named lora_B or 1-D), so LoRA+ "
                            f"would train it at `lr` alone. Use plain parameter groups for kind {kind!r} "
                            "(li.adapter_parameters(model)), or freeze that adapter.")
                    out.update({id(trained[k]): s for k, s in sorts.items()})
    return out


def _no_decay(model: nn.Module) -> set[str]:
    """The names of the parameters inside an ``nn.LayerNorm``: transformers'
    ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` leaves them out of weight decay."""
    return {f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) for name, _ in m.named_parameters()}
