"""The hooks ``inject`` registers on an adapted module, and ``remove`` takes off again: the
state-dict hooks that keep ``W0`` under its base key and load base checkpoints, and the
per-forward memo of merged weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._chain import inverse, parametrized
from ._sites import module_loras
from .lora import Bias, LoRA


def _open_memo(module: nn.Module, args) -> None:
    for lora in module_loras(module):
        lora.memo_depth += 1


def _close_memo(module: nn.Module, args, output) -> None:
    for lora in module_loras(module):
        lora.memo_depth = max(lora.memo_depth - 1, 0)
        if not lora.memo_depth:
            lora.memo = None
    # RNNs keep the weights their forward read in `_flat_weights`: with LoRA these are computed
    # tensors, which would hold this step's graph and make deepcopy fail. Keep them detached (one
    # made under a torch.func transform stays as it is: a later forward in the transform may reuse
    # it; a copy leaves it out, see lora_inject._module_class.own_class).
    flat = module.__dict__.get("_flat_weights")
    if flat is not None:
        module.__dict__["_flat_weights"] = [
            w.detach() if isinstance(w, Tensor) and w.grad_fn is not None else w for w in flat]


def _load_base_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Let a checkpoint saved before injection (``p.weight``) load into the injected model."""
    module.__dict__["lora_inject_prefix"] = prefix  # for _missing_base_keys, after the load
    for tensor_name, plist in parametrized(module).items():
        key = prefix + tensor_name
        inner = f"{prefix}parametrizations.{tensor_name}."
        if key not in state_dict or not any(isinstance(p, (LoRA, Bias)) for p in plist):
            continue
        if any(k.startswith(inner + "original") for k in state_dict):
            continue
        value = state_dict.pop(key)
        with torch.no_grad():
            value = inverse(plist, value)
        if isinstance(value, Tensor):
            state_dict[inner + "original"] = value
        else:
            for i, v in enumerate(value):
                state_dict[f"{inner}original{i}"] = v


def _base_key_pairs(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """``(p.parametrizations.<t>.original, p.<t>)`` for each tensor whose only parametrization is LoRA."""
    return [(f"{prefix}parametrizations.{t}.original", prefix + t) for t, plist in parametrized(module).items()
            if len(plist) == 1 and isinstance(plist[0], (LoRA, Bias))]


def _base_keys(module, state_dict, prefix, local_metadata) -> None:
    """Save ``W0`` under the key the module had before injection (``p.weight``), not
    ``p.parametrizations.weight.original``, where LoRA is the tensor's only parametrization; the
    factors keep keys of their own. A plain model then loads the base from it, and
    :func:`_load_base_keys` maps the key back for an adapted one."""
    for key, base in _base_key_pairs(module, prefix):
        if key in state_dict:
            state_dict[base] = state_dict.pop(key)


def _missing_base_keys(module, incompatible) -> None:
    """Report a missing ``W0`` under the key the state dict has for it (see :func:`_base_keys`)."""
    prefix = module.__dict__.pop("lora_inject_prefix", None)
    if prefix is None:
        return
    missing = incompatible.missing_keys
    for key, base in _base_key_pairs(module, prefix):
        if key in missing:
            missing[missing.index(key)] = base


def hook(module: nn.Module) -> None:
    """Hook the adapted module: base checkpoints load into it, and while its forward runs, the
    merged-path weights are built once (RNNs and MultiheadAttention read them several times)."""
    found = {getattr(h, "hook", h) for hooks, key in _find_hooks(module) for h in [hooks[key]]}
    if _load_base_keys not in found:
        module.register_load_state_dict_pre_hook(_load_base_keys)
    if _base_keys not in found:
        module.register_state_dict_post_hook(_base_keys)
        module.register_load_state_dict_post_hook(_missing_base_keys)
    if _open_memo not in found and not all(lora.factored for lora in module_loras(module)):
        module.register_forward_pre_hook(_open_memo)
        module.register_forward_hook(_close_memo, always_call=True)


def _find_hooks(module: nn.Module) -> list[tuple[dict, int]]:
    found = []
    for hooks in (module._load_state_dict_pre_hooks, module._state_dict_hooks, module._load_state_dict_post_hooks,
                  module._forward_pre_hooks, module._forward_hooks):
        for key, h in hooks.items():
            if getattr(h, "hook", h) in (_load_base_keys, _base_keys, _missing_base_keys, _open_memo, _close_memo):
                found.append((hooks, key))
    return found


def unhook(module: nn.Module) -> None:
    for hooks, key in _find_hooks(module):
        del hooks[key]
        module._forward_hooks_always_called.pop(key, None)
