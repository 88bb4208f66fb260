"""peft's adapter format, both ways: our adapters to ``adapter_model.safetensors`` +
``adapter_config.json``, and those files back to our adapters.

Keys carry the prefix ``base_model.model.`` and the module path, without the adapter name:

==========================  ======================================  ==========================
layer                       keys                                    shapes
==========================  ======================================  ==========================
Linear, transformers Conv1D ``p.lora_A.weight``, ``p.lora_B.weight``  ``(r, in)``, ``(out, r)``
Conv1d/2d/3d, groups=1      ``p.lora_A.weight``, ``p.lora_B.weight``  ``(r, in, *k)``, ``(out, r, 1..)``
Embedding(n, d)             ``p.lora_embedding_A``, ``..._B``        ``(r, n)``, ``(d, r)``
DoRA (``use_dora``)         also ``p.lora_magnitude_vector``         ``(out,)``; Conv ``(1, out, 1..)``
MultiheadAttention          ``p.lora_A.weight`` (in_proj), and      ``(r, E)``, ``(3E, r)``
                            ``p.base_layer.out_proj.lora_A.weight``
expert Parameter ``q``      ``p[.base_layer]*.lora_A.weight``       ``(E*r, in)``, ``(out, r*E)``
(``target_parameters``)     (one ``base_layer`` per later param)
full copies                 ``p.bias``/``p.base_layer.bias``; a     the tensor's own
                            ``modules_to_save`` module's tensors
trainable tokens            ``p.token_adapter.trainable_tokens_     ``(n, dim)``
                            delta``
==========================  ======================================  ==========================

A ``modules_to_save`` module's tensors are kind ``"full"`` here, ``trainable_token_indices`` kind
``"tokens"``. A tied embedding and head (one tensor, :mod:`lora_inject._tied`) hold one adapter;
peft holds one per module, so it is written at each, and read back as one where they agree.

peft scales by ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``), with per-module
overrides in ``rank_pattern``/``alpha_pattern`` (regexes, matched as ``(.*\\.)?(key)$``).
``fan_in_fan_out`` follows the layer type in peft (True for Conv1D, False for Linear), as our rules do.
An adapter made with ``init="pissa"``/``"olora"`` is written as the plain LoRA of rank ``2r`` that
gives the same weight from the original ``W0`` (``A' = [A; A0]``, ``B' = [B, -B0]``, the same
scaling), as peft's own conversion of such adapters does.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .._chain import find_lora, parametrized, source
from .._kinds.lokr import peft_factor
from .._kinds.oft import block_size
from .._selection import named_modules
from .._tied import tensor_users, users_of
from .._view import View, compute_dtype
from ..kind import find_kind, kernel
from ..lora import LoRA, lora_scaling
from ..rule import find_rule, own_tensor_names, type_name
from ._entries import Copy, Entry, tensor_shape
from ._files import dtype_name, is_integer, read_json, read_pickled, read_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"  # peft's save_pretrained(safe_serialization=False)
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
             ".lora_magnitude_vector": "m", ".lora_B.bias": "b"}
_BIASED = ("linear", "conv", "conv1d")  # the layers where peft's lora_B has a bias (lora_bias=True)
_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights alone
_UNSUPPORTED = {
    "layer_replication": "`layer_replication`", "megatron_config": "Megatron layers",
    "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
}
_KNOWN = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias", "init_lora_weights", "layers_pattern",
    "megatron_core", "loftq_config", "modules_to_save", "target_parameters", "layers_to_transform",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "target_modules_to_tie", "use_dora", "lora_bias",
    "trainable_token_indices", *_UNSUPPORTED,
}
_TOKENS_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "peft_version", "target_modules", "token_indices", "init_weights"}
TOKENS = ".token_adapter.trainable_tokens_delta"  # trainable_token_indices: the rows' values, below the module
COMPANIONS = ("lora", "full", "tokens")  # the kinds a LORA adapter holds: LoRA, modules_to_save, tokens
EMBEDDING_NAMES = ("embed_tokens",)  # the input embeddings peft ties its head to (EMBEDDING_LAYER_NAMES)


def peft_kind(module: nn.Module, parent: nn.Module | None) -> tuple[str | None, str]:
    """Return ``(kind, why_not)``: the peft layer for ``module``, or None and the reason."""
    cls = type_before_parametrizations(module)
    if issubclass(cls, nn.Embedding):
        if module.max_norm is not None:
            return None, "an Embedding with max_norm (peft renormalises only its base weight)"
        return "embedding", ""
    if issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return None, f"a {cls.__name__} with groups={module.groups} (peft's grouped LoRA is not a weight update)"
        if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            return None, f"a {cls.__name__} with dilation or padding_mode (peft's LoRA branch ignores both)"
        return "conv", ""
    if issubclass(cls, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return None, ("a MultiheadAttention with separate q/k/v weights (peft's LoRA on MHA adapts the packed "
                          "in_proj_weight only)")
        return "mha", ""
    if issubclass(cls, nn.Linear) and isinstance(parent, nn.MultiheadAttention):
        return "mha_out", ""
    if issubclass(cls, nn.Linear):
        return "linear", ""
    if any(f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D" for c in cls.__mro__):
        return "conv1d", ""
    return None, f"a {cls.__name__} (peft's LoRA covers Linear, Conv1D, Embedding, MultiheadAttention and Conv " \
                 "with groups=1)"


_LORA_KINDS = ("linear", "conv", "embedding", "conv1d")
_MHA_OUT = ("a MultiheadAttention's out_proj targeted on its own: MultiheadAttention reads out_proj.weight "
            "without calling out_proj, so peft's LoRA there has no effect (peft merges out_proj's LoRA only when "
            "the MultiheadAttention itself is targeted)")


def _parents(modules: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    return {n: modules.get(n.rpartition(".")[0]) if n else None for n in modules}


def _param_names(module: nn.Module) -> list[str]:
    """The module's own parameters in registration order (a parametrized one by its name)."""
    names = [n for n, t in module._parameters.items() if t is not None]
    return names + [n for n in parametrized(module) if n not in names]


def _is_transposed(module: nn.Module) -> bool:
    """transformers' expert modules store ``(E, in, out)`` where they say ``is_transposed``."""
    return bool(getattr(module, "is_transposed", False))


def _unwrap(path: str) -> tuple[str, int]:
    """peft's path of a wrapped module to ``(our module path, how many trailing base_layer)``.

    peft nests one ``ParamWrapper`` per targeted parameter (``experts.base_layer.lora_A``) and
    keeps MultiheadAttention's out_proj under its ``base_layer`` (``mha.base_layer.out_proj``);
    with ``bias="all"`` the bias of a ``modules_to_save`` module is saved inside its wrapper
    (``classifier.modules_to_save.bias``).
    """
    parts = path.split(".")
    depth = 0
    while parts and parts[-1] == "base_layer":
        parts.pop()
        depth += 1
    # modules_to_save: peft's trained copy and the original sit inside a wrapper of the module
    return ".".join(p for p in parts if p not in ("base_layer", "modules_to_save", "original_module")), depth


# -- ours -> peft ----------------------------------------------------------------------------
def _export_kind(fn: str, e: Entry, module: nn.Module, parent: nn.Module | None, dora: bool) -> str:
    """How entry ``e`` is written in peft's format: a LoRA kind, ``"mha"``, ``"mha_out"``,
    ``"param"`` (``target_parameters``) or ``"full"`` (a full copy), or raise.

    A LoRA stays a LoRA where peft has one, so that its factors come back as they were; an update
    of full rank goes whole where peft has none, or where peft's one ``use_dora`` (``dora``)
    would differ from the entry's.
    """
    kind, why = peft_kind(module, parent)
    if e.kind == "full":  # a module saved whole, or a bias alone (peft's `bias`)
        return "full"
    if e.kind == "tokens":
        if kind not in ("embedding", "linear") or e.tensor != "weight":
            raise ValueError(f"{fn}(): `{e.key}` has trainable tokens, but peft's trainable_token_indices "
                             f"covers the weight of an Embedding or a Linear head, not {why or 'this tensor'}. "
                             "Save with format='lora_inject'.")
        return "tokens"
    view = View(tuple(e.shape), e.transpose, e.experts)
    if e.module and not e.experts and not e.dora and e.r >= min(view.out_features, view.in_features) and (
            dora or kind not in _LORA_KINDS or e.tensor != "weight"):
        return "full"  # a full-rank update is a full copy: bias="all"/"lora_only", or modules_to_save
    if not e.module:
        kind, why = None, "the model itself (peft adapts submodules only)"
    elif (kind in _LORA_KINDS and e.tensor == "weight" and not e.experts
          and e.transpose == (kind in ("embedding", "conv1d"))):
        return kind
    elif kind == "mha" and e.tensor == "in_proj_weight" and not e.transpose and not e.dora:
        return "mha"
    elif kind == "mha_out" and e.tensor == "weight" and not e.transpose and not e.dora:
        return "mha_out"
    elif (e.experts and len(e.shape) == 3 and e.tensor in _param_names(module)
          and e.transpose == _is_transposed(module) and not e.dora):
        return "param"
    why = why if kind is None else f"a custom rule on {e.type} (tensor {e.tensor!r}, transpose={e.transpose})"
    raise ValueError(f"{fn}(): `{e.key}` has no equivalent in peft's format: it is {why}. Save "
                     "with format='lora_inject', or remove the adapter from that module first.")


def _merged(module: nn.Module, e: Entry) -> Tensor:
    """``W0 + s * B @ A`` of entry ``e`` alone (a full copy: the copy), in the base's dtype."""
    base = source(module, e.tensor).detach()
    if e.kind == "full":
        return e.extra["full"].to(base.dtype)
    view = View(tuple(e.shape), e.transpose, e.experts)
    dtype = compute_dtype(base.dtype, e.A.dtype)
    delta = lora_scaling(e.r, e.alpha, e.rslora) * (e.B.to(dtype) @ e.A.to(dtype))
    return (base.to(dtype) + view.stored(delta)).to(base.dtype)


def to_peft(fn: str, model: nn.Module, entries: list[Entry], lora_bias: bool = False) -> tuple[dict, dict[str, Tensor]]:
    """Translate our entries to peft's config and tensors, or raise if one has no equivalent.

    With ``lora_bias``, the update of each LoRA layer's bias is written as peft's ``lora_B.bias``
    (``b = delta / s``, zeros where the bias has no update) instead of a copy of the whole bias.
    """
    entries = [_from_w0(e) for e in entries]
    entries, tie = _untied(fn, model, entries)
    modules = dict(named_modules(model))
    parents = _parents(modules)
    dora = any(e.dora for e in entries)
    kinds = {e.key: _export_kind(fn, e, modules[e.module], parents[e.module], dora) for e in entries}
    at: dict[int, list[str]] = {}  # every path of each module, as peft walks them
    for name, m in model.named_modules(remove_duplicate=False):
        at.setdefault(id(m), []).append(name)
    for e in entries:
        where = at.get(id(modules[e.module]), [])
        if len(where) > 1:
            raise ValueError(f"{fn}(): {e.type} `{e.module}` sits at {len(where)} paths in the model ({where}); "
                             "peft would apply the adapter at one of them only, so "
                             "it would not give this model's outputs. Save with format='lora_inject', or untie "
                             "the module.")
    lora = [e for e in entries if kinds[e.key] not in ("full", "tokens")]
    full = [e for e in entries if kinds[e.key] == "full"]
    tokens = [e for e in entries if kinds[e.key] == "tokens"]
    wrapped = {e.module for e in lora if kinds[e.key] in _LORA_KINDS}
    # modules_to_save (a bias alone is peft's `bias`): the outermost module of each, whose copy holds
    # its submodules' tensors too, as peft wraps and saves it (a MultiheadAttention with its out_proj)
    copies = {e.module for e in full if e.tensor != "bias"}
    copies = {c for c in copies if not any(c.startswith(f"{o}.") for o in copies)}

    def copied(path: str) -> bool:
        return any(path == c or path.startswith(f"{c}.") for c in copies)

    clash = next((e for e in lora if copied(e.module)), None)
    if clash is not None:
        raise ValueError(f"{fn}(): `{clash.module}` would be both a full copy (modules_to_save) and a LoRA "
                         "layer in peft's format, which peft cannot hold. Save with format='lora_inject'.")
    if lora_bias:
        odd = next((e for e in lora if kinds[e.key] not in _BIASED or e.dora), None)
        if odd is not None:
            why = "DoRA" if odd.dora else f"a {odd.type} ({kinds[odd.key]})"
            raise ValueError(f"{fn}(): `lora_bias=True` gives every LoRA layer a bias on lora_B, which peft has on "
                             f"Linear, Conv1D and Conv layers without DoRA only, but `{odd.key}` is {why}. Save "
                             "with lora_bias=False (the bias is then written whole).")
    scalings = {e.module: lora_scaling(e.r, e.alpha, e.rslora) for e in lora}
    own_bias = {e.module: e for e in full if lora_bias and e.tensor == "bias" and e.module in wrapped
                and not copied(e.module)}  # written as lora_B.bias
    zero = next((m for m in own_bias if scalings[m] == 0), None)
    if zero is not None:
        raise ValueError(f"{fn}(): `{zero}` has a bias update but a LoRA scaling of 0, so no lora_B.bias gives it. "
                         "Save with lora_bias=False.")
    mha: dict[str, dict[str, Entry]] = {}  # MultiheadAttention path -> its in_proj and out_proj entries
    for e in lora:
        if kinds[e.key] in ("mha", "mha_out"):
            owner = e.module if kinds[e.key] == "mha" else e.module.rpartition(".")[0]
            mha.setdefault(owner, {})[kinds[e.key]] = e
    for owner, pair in mha.items():
        if len({(e.r, e.alpha, e.rslora) for e in pair.values()}) > 1:
            raise ValueError(f"{fn}(): peft gives MultiheadAttention `{owner}` one r and alpha for in_proj and "
                             f"out_proj, but this adapter has {[(e.key, e.r, e.alpha) for e in pair.values()]}. "
                             "Save with format='lora_inject'.")
    dropouts = sorted({e.dropout for e in lora if kinds[e.key] in _LORA_KINDS}) or [0.0]
    if len(dropouts) > 1 or dropouts[0] and any(kinds[e.key] == "param" for e in lora):
        raise ValueError(f"{fn}(): peft has one `lora_dropout` per adapter, but this adapter uses {dropouts} "
                         "(and peft's target_parameters take none). Save with format='lora_inject', or set one "
                         "dropout in each LoRA's config.")
    doras = sorted({e.dora for e in lora}) or [False]
    across = [e.key for e in lora if e.dora and e.dora_axis != "out"]
    if across:
        raise ValueError(f"{fn}(): `{across[0]}` is DoRA with the norm per input unit (dora_axis='in', LyCORIS' "
                         "wd_on_out=False); peft's DoRA takes it per output unit only. Save with "
                         "format='lora_inject' or 'kohya'.")
    if len(doras) > 1:
        raise ValueError(f"{fn}(): peft has one `use_dora` per adapter, but this adapter is DoRA on some tensors "
                         "only. Save with format='lora_inject'.")
    rslora = bool(lora) and all(e.rslora for e in lora)
    # peft names each LoRA by a pattern key: the module, the MultiheadAttention, or module.parameter.
    pkey = {e.key: e.key if kinds[e.key] == "param" else
            e.module.rpartition(".")[0] if kinds[e.key] == "mha_out" else e.module for e in lora}
    # peft has one use_rslora: fold any other scaling into alpha, as alpha' / r == alpha / sqrt(r).
    alphas = {pkey[e.key]: e.alpha * math.sqrt(e.r) if e.rslora and not rslora else e.alpha for e in lora}
    ranks = {pkey[e.key]: e.r for e in lora}
    r0 = Counter(ranks.values()).most_common(1)[0][0] if lora else 8
    a0 = Counter(alphas.values()).most_common(1)[0][0] if lora else 8
    biases = {e.module for e in full if e.tensor == "bias" and not copied(e.module) and e.module not in own_bias}
    names = [n for n in modules if n]
    targets = sorted({pkey[e.key] for e in lora if kinds[e.key] != "param"}, key=list(modules).index)
    exact = {p: ("^" if any(n != p and n.endswith("." + p) for n in names) else "") + re.escape(p)
             for p in ranks}
    overmatch = any(n not in targets and any(n.endswith("." + p) for p in targets) for n in names)
    params = [e for e in lora if kinds[e.key] == "param"]
    cls = type_before_parametrizations(model)
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        if hasattr(cls, "from_pretrained") else None,
        "r": r0, "lora_alpha": a0,
        "target_modules": "|".join(f"(?:{re.escape(p)})" for p in targets) if overmatch else targets,
        "target_parameters": [e.key for e in params] or None,
        "rank_pattern": {exact[p]: r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {exact[p]: a for p, a in alphas.items() if a != a0},
        "use_rslora": rslora,
        "fan_in_fan_out": "conv1d" in kinds.values() and "linear" not in kinds.values(),
        "lora_dropout": dropouts[0], "lora_bias": lora_bias, "use_dora": doras[0],
        "bias": "none" if not biases else "lora_only" if biases <= wrapped else "all",
        "modules_to_save": sorted(copies, key=list(modules).index) or None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "trainable_token_indices": {e.module: list(e.options["token_indices"]) for e in tokens} or None,
        "ensure_weight_tying": tie,
    }
    tensors = {PREFIX + e.module + TOKENS: e.extra["trainable_tokens_delta"] for e in tokens}
    for e in lora:
        p, kind = PREFIX + e.module, kinds[e.key]
        if e.dora:  # (out,); for Conv (1, out, 1, ..)
            m = e.extra["lora_magnitude"]
            tensors[p + ".lora_magnitude_vector"] = m.reshape(1, -1, *[1] * (len(e.shape) - 2)) if kind == "conv" else m
        A, B = e.A, e.B
        if kind == "embedding":
            tensors[p + ".lora_embedding_A"], tensors[p + ".lora_embedding_B"] = A, B
            continue
        if kind == "conv":  # (r, in*k) -> (r, in, *k); (out, r) -> (out, r, 1, ..)
            A, B = A.reshape(e.r, *e.shape[1:]), B.reshape(*B.shape, *[1] * (len(e.shape) - 2))
        elif kind == "mha_out":  # peft applies out_proj's update twice (see _lora_entry)
            p, B = f"{PREFIX}{pkey[e.key]}.base_layer.{e.module.rpartition('.')[2]}", B / 2
        elif kind == "param":  # nested ParamWrappers: the first parameter is the innermost
            mine = [q for q in _param_names(modules[e.module]) if f"{e.module}.{q}" in kinds]
            p += ".base_layer" * (len(mine) - 1 - mine.index(e.tensor))
            E, r = e.A.shape[0], e.r  # (E, r, in) -> (E*r, in); (E, out, r) -> (out, r*E), r-major
            A, B = A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E)
        tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"] = A, B
        if lora_bias:  # (out,): the bias gains s * b
            b = own_bias.get(e.module)
            b = (b.B.float() @ b.A.float()).reshape(-1) * (lora_scaling(b.r, b.alpha, b.rslora) / scalings[e.module]
                                                         ) if b is not None else B.new_zeros(B.shape[0])
            tensors[p + ".lora_B.bias"] = b.to(B.dtype)
    for owner, pair in mha.items():  # peft adapts in_proj and out_proj together: the missing one is zero
        e = next(iter(pair.values()))
        mod = modules[owner]
        zeros = {"mha": (f"{PREFIX}{owner}", mod.in_proj_weight.shape),
                 "mha_out": (f"{PREFIX}{owner}.base_layer.out_proj", mod.out_proj.weight.shape)}
        for kind, (p, (out, inn)) in zeros.items():
            if kind not in pair:
                tensors[p + ".lora_A.weight"] = e.A.new_zeros(e.r, inn)
                tensors[p + ".lora_B.weight"] = e.B.new_zeros(out, e.r)
    by_key = {e.key: e for e in full}
    for e in full:
        if copied(e.module) or e.module in own_bias and e.tensor == "bias":
            continue
        tensors[f"{PREFIX}{e.module}{'.base_layer' if e.module in wrapped else ''}.{e.tensor}"] = \
            _merged(modules[e.module], e)
    for name in copies:  # the module's state dict, as peft saves it: updated where the adapter has it
        for sub, module in named_modules(modules[name]):
            path = f"{name}.{sub}" if sub else name
            for q in _state_names(module):
                e = by_key.get(f"{path}.{q}")
                tensors[f"{PREFIX}{path}.{q}"] = _merged(module, e) if e else source(module, q).detach()
    return config, tensors


def _untied(fn: str, model: nn.Module, entries: list[Entry]) -> tuple[list[Entry], bool]:
    """``entries`` with each tied tensor's update also on its other users (see :mod:`lora_inject._tied`),
    as peft needs it to give their outputs: the head's LoRA is the embedding's transposed, a saved
    module is saved at each user. Trainable tokens stay on the input embeddings alone where peft
    ties the head to them itself (a transformers model with ``_tied_weights_keys``). Also whether
    peft ties them itself (``ensure_weight_tying``: an ``embed_tokens`` and its head)."""
    modules = dict(named_modules(model))
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) and getattr(model, "_tied_weights_keys", None) else None
    out, tie = [], False
    for e in entries:
        out.append(e)
        lora = find_lora(modules[e.module], e.tensor)
        users = users_of(lora) if lora is not None else []
        if not users or e.kind == "tokens" and modules[e.module] is embeddings:
            continue
        for u in users:
            rule = find_rule(u.module)
            own = rule is not None and rule.adapts(u.tensor_name)
            transpose = own and rule.transpose and len(e.shape) == 2
            if e.kind == "lora" and transpose != e.transpose:
                if e.dora or len(e.shape) != 2:
                    raise ValueError(f"{fn}(): `{e.key}` is tied to `{u.qualname}.{u.tensor_name}`, which reads it in "
                                     "another layout, and peft cannot give its DoRA there. Save with "
                                     "format='lora_inject'.")
                # the same stored update s * B @ A in the other layout: (B.T, A.T) as (A', B')
                e_u = dataclasses.replace(e, A=e.B.mT.contiguous(), B=e.A.mT.contiguous(), transpose=transpose)
            else:
                e_u = dataclasses.replace(e, transpose=transpose)
            out.append(dataclasses.replace(e_u, module=u.qualname, tensor=u.tensor_name, type=type_name(u.module),
                                           factored=own and rule.is_factored(u.module)))
            tie = tie or (e.kind in ("lora", "full") and embeddings is modules[e.module]
                          and e.module.rpartition(".")[2] in EMBEDDING_NAMES)
    return out, tie


def _state_names(module: nn.Module) -> list[str]:
    """The module's own state-dict tensors: its parameters, then its persistent buffers (integer
    ones such as BatchNorm's ``num_batches_tracked`` included, written exactly)."""
    names = _param_names(module)
    return names + [n for n, t in module._buffers.items()
                    if t is not None and n not in names and n not in module._non_persistent_buffers_set]


def _from_w0(e: Entry) -> Entry:
    """A pissa/olora entry as the plain LoRA of rank 2r with the same update from ``W0``."""
    if "lora_A0" not in e.extra:
        return e
    r = 2 * e.r
    A = torch.cat([e.A, e.extra["lora_A0"]], dim=-2)  # (2r, in)
    B = torch.cat([e.B, -e.extra["lora_B0"]], dim=-1)  # (out, 2r)
    alpha = lora_scaling(e.r, e.alpha, e.rslora) * (math.sqrt(r) if e.rslora else r)
    extra = {k: t for k, t in e.extra.items() if k == "lora_magnitude"}
    return dataclasses.replace(e, A=A, B=B, r=r, alpha=alpha, init="default", extra=extra)


# -- peft -> ours ----------------------------------------------------------------------------
@dataclasses.dataclass
class Saved:
    """peft's adapter as read from its directory: the two files' paths, the config and the tensors."""

    file: str
    weights: str
    config: dict
    tensors: dict[str, Tensor]

    def module_paths(self) -> list[str]:
        """The paths in the user's model of the modules the saved tensors belong to."""
        paths, kind = [], kind_of(self.config)
        for key in self.tensors:
            rest = key.removeprefix(PREFIX)
            if kind is not None:  # a kind's tensors below the module; VeRA's shared ones at the root
                ends = [f".{find_kind(kind).peft_key(n)}" for n in _KIND_TENSORS[kind]]
                end = next((e for e in ends if rest.endswith(e)), None)
                if rest != key and end is not None:
                    paths.append(rest[: -len(end)])
                continue
            if rest.endswith(TOKENS):
                paths.append(rest[: -len(TOKENS)])
                continue
            suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
            paths.append(_unwrap(rest[: -len(suffix)] if suffix else rest.rpartition(".")[0])[0])
        return paths


def read_peft(fn: str, path: str) -> Saved:
    """Read peft's adapter in the directory ``path``, checking its config. The weights are
    ``adapter_model.safetensors``, or else ``adapter_model.bin``, read with
    ``torch.load(weights_only=True)``: tensors only, never an arbitrary object."""
    file, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    config = read_json(fn, file)
    _check_config(fn, file, config)
    if not os.path.exists(weights) and os.path.exists(os.path.join(path, PICKLE)):
        weights = os.path.join(path, PICKLE)
        return Saved(file, weights, config, read_pickled(fn, weights, integers=True))
    tensors, _ = read_safetensors(fn, weights, integers=True)
    return Saved(file, weights, config, tensors)


def from_peft(fn: str, model: nn.Module, saved: Saved) -> tuple[list[Entry], list[Copy]]:
    """Translate peft's adapter ``saved`` into entries and exact copies for ``model``, or raise if it
    cannot be reproduced.

    LoRA factors become LoRA entries. A full tensor (``modules_to_save``, ``bias="all"`` or
    ``"lora_only"``, ``save_embedding_layers``) that equals the base is dropped; a floating one
    that differs becomes the exact update ``W_saved - W0``, as a LoRA of full rank with an identity
    factor; an integer one that differs (a BatchNorm's ``num_batches_tracked``) is a copy.
    """
    if kind_of(saved.config) is not None:
        return kinds_from_peft(fn, model, saved), []
    if saved.config.get("peft_type") == "TRAINABLE_TOKENS":  # peft's tokens alone: `p.trainable_tokens_delta`
        return _tied_once(fn, saved.file, model, _token_entries(fn, model, dict(named_modules(model)), saved),
                          saved.config), []
    file, weights, config, tensors = saved.file, saved.weights, saved.config, saved.tensors
    modules = dict(named_modules(model))
    factors: dict[tuple[str, int], dict[str, tuple[str, Tensor]]] = {}
    full: dict[tuple[str, str], tuple[str, Tensor]] = {}
    entries = _token_entries(fn, model, modules, saved)
    for key, t in sorted(tensors.items()):
        rest = key.removeprefix(PREFIX)
        if rest.endswith(TOKENS):
            continue  # read above
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        where, _, tensor = (rest[: -len(suffix)], "", "") if suffix else rest.rpartition(".")
        module, depth = _unwrap(where)
        if rest == key:
            raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, which is not a key of peft's "
                             f"format (they start with {PREFIX!r}); nothing was loaded.")
        if module not in modules or isinstance(modules[module], LoRA) or (
                suffix is None and tensor not in own_tensor_names(modules[module])):
            what = f"no module `{module}`" if suffix or module not in modules else f"no tensor `{module}.{tensor}`"
            raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, but the model has {what}. "
                             "It was saved from another model.")
        if suffix is not None and is_integer(t.dtype):
            raise TypeError(f"{fn}(): `{key}` in {weights} has dtype {dtype_name(t.dtype)}; LoRA factors must be "
                            "floating point. The file is corrupt.")
        if suffix is None:  # the trained copy of a modules_to_save module wins over its original
            held = full.get((module, tensor))
            if held is None or _copy_rank(key) > _copy_rank(held[0]):
                full[(module, tensor)] = (key, t)
        else:
            factors.setdefault((module, depth), {})[_SUFFIXES[suffix]] = (key, t)
    claims = _claims(fn, file, config, modules)
    if config.get("ensure_weight_tying"):  # peft gives the head tied to a targeted embed_tokens its LoRA too
        users = tensor_users(model)
        for (name, _), (_, tensor, kind, _, _) in list(claims.items()):
            if kind == "embedding" and name.rpartition(".")[2] in EMBEDDING_NAMES:
                for q, m, t in users.get(id(source(modules[name], tensor)), []):
                    if q != name and t == "weight" and peft_kind(m, None)[0] == "linear":
                        claims.setdefault((q, 0), (q, t, "linear", q, PREFIX + q))
    stray = next((g for g in factors if g not in claims), None)
    if stray is not None:
        first = min(k for k, _ in factors[stray].values())
        raise ValueError(f"{fn}(): {weights} holds `{first}`, but `target_modules`/`target_parameters` in {file} "
                         f"do not select `{stray[0]}`, so peft would not load it.")
    lora_entries = [_lora_entry(fn, file, weights, config, modules[c[0]], *c, factors.get(g, {}))
                    for g, c in claims.items()]
    biases = _lora_biases(fn, file, weights, config, modules, claims, factors, lora_entries)
    entries += lora_entries
    adapted = {(e.module, e.tensor) for e in entries}
    whole = config.get("modules_to_save") or []
    copies = []
    for (name, tensor), (key, t) in full.items():
        base = source(modules[name], tensor).detach()
        if is_integer(t.dtype) or is_integer(base.dtype):
            if t.dtype != base.dtype or t.shape != base.shape:
                raise ValueError(f"{fn}(): {weights} holds `{key}` ({dtype_name(t.dtype)}, shape {list(t.shape)}), "
                                 f"a copy of `{name}.{tensor}` ({dtype_name(base.dtype)}, shape "
                                 f"{list(base.shape)}) of another dtype or shape. It was saved from another model.")
            if not torch.equal(t.to(base.device), base):  # a counter: carried exactly, never a LoRA
                copies.append(Copy(name, tensor, t))
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in whole):  # peft trains it whole
            entries.append(_full_entry(fn, weights, name, modules[name], tensor, key, t))
            continue
        e = _update_entry(fn, weights, name, modules[name], tensor, key, t, (name, tensor) in adapted,
                          biases.pop((name, tensor), None))
        if e is not None:
            entries.append(e)
    for (name, tensor), delta in biases.items():  # lora_bias alone: the bias gains s * b
        entries.append(_exact_entry(name, modules[name], tensor, delta))
    return _tied_once(fn, file, model, entries, config), copies


def _full_entry(fn: str, weights: str, name: str, module: nn.Module, tensor: str, key: str, saved: Tensor) -> Entry:
    """A tensor of a ``modules_to_save`` module: kind ``"full"``, the saved copy."""
    base = source(module, tensor).detach()
    if tuple(saved.shape) != tuple(base.shape):
        raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(saved.shape)}, the copy of `{name}.{tensor}` "
                         f"{tuple(base.shape)} in modules_to_save, of another shape (a resized vocabulary?). It was "
                         "saved from another model; nothing was loaded.")
    rule = find_rule(module)
    ours = rule is not None and rule.adapts(tensor)
    return Entry(module=name, tensor=tensor, type=type_name(module), shape=tuple(base.shape), A=None, B=None,
                 r=None, alpha=None, transpose=ours and rule.transpose, experts=ours and rule.experts,
                 factored=bool(ours and rule.is_factored(module)), extra={"full": saved}, kind="full")


def _token_entries(fn: str, model: nn.Module, modules: dict[str, nn.Module], saved: Saved) -> list[Entry]:
    """The trainable tokens of peft's ``trainable_token_indices``, as entries of kind ``"tokens"``."""
    spec = saved.config.get("trainable_token_indices")
    end = TOKENS
    if saved.config.get("peft_type") == "TRAINABLE_TOKENS":  # its target_modules, each with its token_indices
        end, targets = ".trainable_tokens_delta", saved.config["target_modules"]
        spec = {p: saved.config.get("token_indices") for p in modules if p and _matches(targets, p)}
    keys = {k.removeprefix(PREFIX)[: -len(end)]: (k, t) for k, t in saved.tensors.items() if k.endswith(end)}
    if not spec and not keys:
        return []
    if not spec:
        first = min(k for k, _ in keys.values())
        raise ValueError(f"{fn}(): {saved.weights} holds `{first}`, but `trainable_token_indices` in {saved.file} "
                         "is empty, so peft would not load it.")
    if isinstance(spec, dict):
        chosen = {}
        for name, ids in spec.items():
            for path in keys:
                if path.endswith(name):
                    chosen[path] = ids
        if saved.config.get("peft_type") == "TRAINABLE_TOKENS":  # peft wraps the tied head too, and saves it
            chosen.update({p: saved.config.get("token_indices") for p in keys if p not in chosen})
    else:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        chosen = {p: spec for p, m in modules.items() if m is emb}
    entries = []
    for path, (key, t) in keys.items():
        module = modules.get(path)
        if module is None or path not in chosen:
            raise ValueError(f"{fn}(): {saved.weights} holds `{key}`, but the model has no module `{path}` that "
                             f"`trainable_token_indices` in {saved.file} selects. It was saved from another model.")
        ids = tuple(chosen[path])
        shape = tensor_shape(module, "weight")
        if tuple(t.shape) != (len(ids), *shape[1:]):
            raise ValueError(f"{fn}(): `{key}` has shape {tuple(t.shape)}, but {len(ids)} tokens of `{path}.weight` "
                             f"{shape} need {(len(ids), *shape[1:])}. It was saved from another model.")
        rule = find_rule(module)
        ours = rule is not None and rule.adapts("weight")
        entries.append(Entry(module=path, tensor="weight", type=type_name(module), shape=shape, A=None, B=None,
                             r=None, alpha=None, transpose=ours and rule.transpose,
                             factored=bool(ours and rule.is_factored(module)),
                             extra={"trainable_tokens_delta": t}, kind="tokens", options={"token_indices": ids}))
    missing = [p for p in chosen if p not in keys]
    if missing:
        raise ValueError(f"{fn}(): `trainable_token_indices` in {saved.file} selects `{missing[0]}`, but "
                         f"{saved.weights} lacks `{PREFIX}{missing[0]}{TOKENS}`. The file is corrupt.")
    return entries


def _result(e: Entry, base: Tensor) -> Tensor:
    """The stored tensor that entry ``e`` makes of ``base``, in float32: to compare two users' updates."""
    base = base.detach().float()
    if e.kind == "full":
        return e.extra["full"].float()
    if e.kind == "tokens":
        return base.index_copy(0, torch.tensor(e.options["token_indices"]), e.extra["trainable_tokens_delta"].float())
    view = View(tuple(e.shape), e.transpose, e.experts)
    return base + view.stored(lora_scaling(e.r, e.alpha, e.rslora) * (e.B.float() @ e.A.float()))


def _tied_once(fn: str, file: str, model: nn.Module, entries: list[Entry], config: dict) -> list[Entry]:
    """``entries`` with one entry per tied tensor (see :mod:`lora_inject._tied`): peft's adapter for a tied
    embedding and head gives them one update, saved at each (the first is kept), or at the embedding alone
    where peft ties the head itself. Raises where the users would read different tensors."""
    modules = dict(named_modules(model))
    users = tensor_users(model)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) and getattr(model, "_tied_weights_keys", None) else None
    groups: dict[int, list[Entry]] = {}
    order = {name: i for i, name in enumerate(modules)}
    for e in sorted(entries, key=lambda e: order[e.module]):  # a tied tensor at its first user, as inject
        groups.setdefault(id(source(modules[e.module], e.tensor)), []).append(e)
    out = []
    for key, group in groups.items():
        first, sharing = group[0], users.get(key, [])
        if len(sharing) < 2:
            out += group
            continue
        base = source(modules[first.module], first.tensor)
        want = _result(first, base)
        odd = next((e for e in group[1:] if not torch.allclose(_result(e, base), want, rtol=1e-5, atol=1e-6)), None)
        tied_by_peft = modules[first.module] is embeddings and (
            first.kind == "tokens" or config.get("ensure_weight_tying") and first.module.rpartition(".")[2]
            in EMBEDDING_NAMES)
        held = {e.module for e in group}
        unheld = [q for q, _, _ in sharing if q not in held]
        if odd is not None or unheld and not tied_by_peft:
            other = f"`{odd.key}`" if odd is not None else ", ".join(f"`{q}`" for q in unheld)
            raise ValueError(
                f"{fn}(): {file} gives `{first.key}` and {other} different values, but they are one tied tensor "
                "of this model, which lora_inject adapts once for all its users (peft applies it at one of them "
                "only). Load it into an untied model (transformers: tie_word_embeddings=False); nothing was loaded.")
        out.append(first)
    return out


def _lora_biases(fn: str, file: str, weights: str, config: dict, modules: dict[str, nn.Module], claims: dict,
                 factors: dict, entries: list[Entry]) -> dict[tuple[str, str], Tensor]:
    """peft's ``lora_bias``: ``(module path, "bias")`` to the update ``s * lora_B.bias`` that each
    LoRA adds to its layer's output, and so to its bias (where peft's merge adds it)."""
    on = bool(config.get("lora_bias"))
    out = {}
    for (g, (name, tensor, kind, pkey, base)), e in zip(claims.items(), entries):
        got = factors.get(g, {})
        key = f"{base}.lora_B.bias"
        if not on and "b" not in got:
            continue
        if kind not in _BIASED or tensor != "weight":
            raise ValueError(f"{fn}(): {file} has lora_bias=True on `{name}` ({kind}), where peft's lora_B has no "
                             "bias (only Linear, Conv1D and Conv layers); nothing was loaded.")
        if "b" not in got or not on:
            raise ValueError(f"{fn}(): {file} has lora_bias={on}, but {weights} {'holds' if 'b' in got else 'lacks'}"
                             f" `{key}`. It was saved from another adapter.")
        b = got["b"][1]
        module = modules[name]
        if tuple(b.shape) != (e.B.shape[-2],):
            raise ValueError(f"{fn}(): `{key}` has shape {tuple(b.shape)}, but `{name}.weight` of shape {e.shape} "
                             f"needs {(e.B.shape[-2],)}. It was saved from another model.")
        if "bias" not in own_tensor_names(module) or source(module, "bias") is None:
            raise ValueError(f"{fn}(): {weights} holds `{key}`, but `{name}` ({type_name(module)}) has no bias to "
                             "carry it (peft cannot merge it either); nothing was loaded. Load it into a model "
                             "whose layer has a bias.")
        out[(name, "bias")] = lora_scaling(e.r, e.alpha, e.rslora) * b.to(torch.float32)
    return out


def _copy_rank(key: str) -> int:
    """Which of peft's copies of one tensor to read: the trained one of a modules_to_save wrapper
    first, then a plain copy, then the wrapper's original."""
    return 2 if ".modules_to_save." in key else 0 if ".original_module." in key else 1


def _claims(fn: str, file: str, config: dict, modules: dict[str, nn.Module]) -> dict[tuple[str, int], tuple]:
    """What peft would have adapted: ``(module path, base_layer depth)`` to ``(module, tensor, kind,
    pattern key, key prefix)``."""
    parents, claims = _parents(modules), {}
    for name, module in modules.items():
        if not name:
            continue
        if _targeted(config, name):
            kind, why = peft_kind(module, parents[name])
            why = _MHA_OUT if kind == "mha_out" else why
            if kind is None or kind == "mha_out":
                raise ValueError(f"{fn}(): {file} targets `{name}`, which is {why}; lora_inject cannot "
                                 "reproduce peft's outputs there, so nothing was loaded.")
            if kind == "mha":
                claims[(name, 0)] = (name, "in_proj_weight", kind, name, PREFIX + name)
                claims[(f"{name}.out_proj", 0)] = (f"{name}.out_proj", "weight", "linear", name,
                                                   f"{PREFIX}{name}.base_layer.out_proj")
            else:
                claims[(name, 0)] = (name, "weight", kind, name, PREFIX + name)
        wanted = config.get("target_parameters") or []
        mine = [q for q in _param_names(module)
                if f"{name}.{q}" in wanted or any(f"{name}.{q}".endswith(f".{t}") for t in wanted)]
        for i, q in enumerate(mine):
            if (name, len(mine) - 1 - i) in claims:
                raise ValueError(f"{fn}(): {file} targets `{name}` both by `target_modules` and by "
                                 "`target_parameters`; lora_inject cannot tell its factors apart, so nothing "
                                 "was loaded.")
            depth = len(mine) - 1 - i  # peft nests one wrapper per parameter: the first is the innermost
            claims[(name, depth)] = (name, q, "param", f"{name}.{q}", PREFIX + name + ".base_layer" * depth)
    return claims


def _lora_entry(fn: str, file: str, weights: str, config: dict, module: nn.Module, name: str, tensor: str,
                kind: str, pkey: str, base: str, got: dict[str, tuple[str, Tensor]]) -> Entry:
    """The entry of one LoRA that peft saved, checked against the model."""
    r = _pattern(fn, config, "rank_pattern", pkey, config.get("r", 8))
    alpha = _pattern(fn, config, "alpha_pattern", pkey, config.get("lora_alpha", 8))
    shape = tensor_shape(module, tensor)
    emb = kind == "embedding"
    if kind == "param" and len(shape) == 3:
        view = View(shape, transpose=_is_transposed(module), experts=True)
        want = {"A": (shape[0] * r, view.in_features), "B": (view.out_features, r * shape[0])}
    elif kind == "param" and len(shape) != 2:
        raise ValueError(f"{fn}(): {file} targets the parameter `{name}.{tensor}` of shape {shape}; peft's "
                         "target_parameters takes 2-D and 3-D parameters only.")
    else:
        view = View(shape, transpose=kind in ("embedding", "conv1d"))
        want = {"A": (r, *view.factor_shapes(r)[0][1:]) if kind != "conv" else (r, *shape[1:]),
                "B": (view.out_features, r, *[1] * (len(shape) - 2) * (kind == "conv"))}
    keys = [f"{base}.lora_embedding_{x}" if emb else f"{base}.lora_{x}.weight" for x in "AB"]
    if [got.get(x, ("",))[0] for x in "AB"] != keys:
        raise ValueError(f"{fn}(): {file} targets `{name}.{tensor}` ({type_name(module)}), but {weights} lacks "
                         f"`{keys[0]}`/`{keys[1]}`. It was saved from another model.")
    for x in "AB":
        key, t = got[x]
        if tuple(t.shape) != want[x]:
            raise ValueError(f"{fn}(): `{key}` has shape {tuple(t.shape)}, but r={r} on `{name}.{tensor}` "
                             f"of shape {shape} needs {want[x]}. It was saved from another model.")
    A, B = got["A"][1], got["B"][1]
    if kind == "param" and view.experts:  # (E*r, in) -> (E, r, in); (out, r*E), r-major -> (E, out, r)
        E = shape[0]
        A, B = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous()
    else:
        A, B = A.reshape(r, -1), B.reshape(view.out_features, r)
    if base.endswith(".base_layer.out_proj"):
        # peft's MultiheadAttention adds out_proj's update as it merges, then merges out_proj too: the
        # update counts twice, in its forward and in merge_and_unload. Doubling B (exact) gives peft's outputs.
        B = B * 2
    dora, extra = bool(config.get("use_dora")), {}
    if dora or "m" in got:
        key = f"{base}.lora_magnitude_vector"
        if kind not in _LORA_KINDS:
            raise ValueError(f"{fn}(): {file} has use_dora=True on `{name}.{tensor}`, where peft has no DoRA "
                             f"({kind}); nothing was loaded.")
        if "m" not in got or not dora:
            raise ValueError(f"{fn}(): {file} has use_dora={dora}, but {weights} "
                             f"{'holds' if 'm' in got else 'lacks'} DoRA's magnitude `{key}`. It was saved "
                             "from another adapter.")
        t = got["m"][1]
        want_m = (1, view.out_features, *[1] * (len(shape) - 2)) if kind == "conv" else (view.out_features,)
        if tuple(t.shape) != want_m:
            raise ValueError(f"{fn}(): `{key}` has shape {tuple(t.shape)}, but `{name}.weight` of shape "
                             f"{shape} needs {want_m}. It was saved from another model.")
        extra["lora_magnitude"] = t.reshape(view.out_features)
    rule = find_rule(module)
    factored = rule.is_factored(module) if rule is not None and rule.adapts(tensor) else False
    # peft merges MultiheadAttention's LoRA before running it, so its dropout never applies there.
    dropout = float(config.get("lora_dropout", 0.0)) if factored else 0.0
    return Entry(
        module=name, tensor=tensor, type=type_name(module), shape=shape, A=A, B=B, r=r,
        alpha=float(alpha), rslora=bool(config.get("use_rslora", False)), dropout=dropout,
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "default",
        targets=config["target_modules"] if isinstance(config.get("target_modules"), str) else None,
        transpose=view.transpose, experts=view.experts, factored=factored, dora=dora, extra=extra)


def _update_entry(fn: str, weights: str, name: str, module: nn.Module, tensor: str, key: str, saved: Tensor,
                  adapted: bool, more: Tensor | None = None) -> Entry | None:
    """A full saved tensor as the exact update ``saved - W0`` (plus ``more``, a lora_bias's
    ``s * b``); None where it equals the base and there is no more."""
    base = source(module, tensor).detach()
    if tuple(saved.shape) != tuple(base.shape):
        raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(saved.shape)}, a copy of the base tensor "
                         f"`{name}.{tensor}` {tuple(base.shape)} of another shape (a resized vocabulary?). Load "
                         "it into the base model first; nothing was loaded.")
    if torch.equal(saved.to(base.device, base.dtype), base):
        return None if more is None else _exact_entry(name, module, tensor, more)
    if adapted:
        raise ValueError(f"{fn}(): {weights} holds `{key}`, a changed copy of the base tensor `{name}.{tensor}`, "
                         "beside LoRA factors on it. Load the copy into the base model first; nothing was loaded.")
    delta = saved.to(base.device, torch.float32) - base.to(torch.float32)
    return _exact_entry(name, module, tensor, delta if more is None else delta + more.to(delta.device))


def _exact_entry(name: str, module: nn.Module, tensor: str, delta: Tensor) -> Entry:
    """The update ``delta`` (in the tensor's stored layout) of ``module.<tensor>`` exactly: a LoRA
    of full rank with an identity factor."""
    base = source(module, tensor).detach()
    rule = find_rule(module)
    ours = rule is not None and rule.adapts(tensor)
    view = View(tuple(base.shape), transpose=ours and rule.transpose and base.dim() == 2)
    delta = view.rows(delta.to(base.device, torch.float32))
    out, inn = delta.shape
    eye = torch.eye(min(out, inn), dtype=torch.float32, device=base.device)
    A, B = (delta, eye) if out <= inn else (eye, delta)
    r = min(out, inn)
    return Entry(module=name, tensor=tensor, type=type_name(module), shape=tuple(base.shape), A=A, B=B, r=r,
                 alpha=float(r), transpose=view.transpose,
                 factored=rule.is_factored(module) if ours else False)


def _check_config(fn: str, file: str, config: dict) -> None:
    def refuse(what: str) -> ValueError:
        return ValueError(f"{fn}(): {file} uses {what}, which lora_inject cannot reproduce; nothing was "
                          "loaded. Merge the adapter with peft (merge_and_unload()) instead.")

    if kind_of(config) is not None:
        _check_kind_config(fn, file, config, kind_of(config))
        return
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        unknown = next((k for k, v in config.items() if k not in _TOKENS_KNOWN and v not in (None, False, [], {}, "")),
                       None)
        if unknown is not None:
            raise refuse(f"the field {unknown!r} = {config[unknown]!r} with peft_type 'TRAINABLE_TOKENS'")
        if not isinstance(config.get("target_modules"), (str, list)):
            raise refuse(f"target_modules={config.get('target_modules')!r} (a list of names or a regex is needed)")
        return
    if config.get("peft_type") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} (only {['LORA', *_TYPE_KINDS]} translate)")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise refuse(f"{what} = {config[field]!r}")
    if config.get("init_lora_weights", True) not in _INITS:
        raise refuse(f"init_lora_weights={config['init_lora_weights']!r}, which changes the base weights")
    unknown = next((k for k, v in config.items() if k not in _KNOWN and v not in (None, False, [], {}, "")), None)
    if unknown is not None:
        raise refuse(f"the field {unknown!r} = {config[unknown]!r}, unknown to lora_inject")
    targets = config.get("target_modules")
    if targets is None and config.get("target_parameters"):
        targets = []
    if not isinstance(targets, (str, list)) or targets == "all-linear":
        raise refuse(f"target_modules={targets!r} (a list of names or a regex is needed)")
    for field in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field), str):
            try:
                re.compile(config[field])
            except re.error as e:
                raise ValueError(f"{fn}(): `{field}` in {file} is not a valid regex: {e}.") from None


def _matches(spec: str | list | None, name: str) -> bool:
    """peft's rule: a str must fully match; a list entry must equal the name or end it after a dot."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{s}") for s in spec)


def _targeted(config: dict, name: str) -> bool:
    """peft's ``check_target_module_exists``: excluded modules and ``modules_to_save`` never match,
    and with a list of targets ``layers_to_transform`` keeps only the layers it names, except for a
    module whose whole path is in the list (``lm_head``), which peft takes before any layer filter."""
    if _matches(config.get("exclude_modules"), name) or any(
            re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if not _matches(targets, name):
        return False
    layers = config.get("layers_to_transform")
    if isinstance(targets, str) or name in targets or layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or None
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = (re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name) if patterns is None else next(
        (m for m in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns) if m), None))
    if found is None:
        return False
    index = int(found["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _pattern(fn: str, config: dict, field: str, name: str, default):
    """peft's ``get_pattern_key``: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in (config.get(field) or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(f"{fn}(): the key {key!r} of `{field}` is not a valid regex: {e}.") from None
    return default


# -- the other kinds peft has: LoHa, LoKr, OFT, IA³, VeRA -------------------------------------
KIND_TYPES = {"loha": "LOHA", "lokr": "LOKR", "oft": "OFT", "ia3": "IA3", "vera": "VERA"}
_TYPE_KINDS = {t: k for k, t in KIND_TYPES.items()}
# The layers each kind's peft tuner wraps (its layers_mapping / _create_new_module)
_KIND_LAYERS = {"loha": ("Linear", "Conv1d", "Conv2d"), "lokr": ("Linear", "Conv1d", "Conv2d"),
                "oft": ("Linear", "Conv2d"), "ia3": ("Linear", "Conv1D", "Conv2d", "Conv3d"),
                "vera": ("Linear", "Conv1D")}
# The tensors of each kind in peft's files, by our name (the key below the module is its peft_key)
_KIND_TENSORS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
                 "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                 "oft": ("oft_R",), "ia3": ("ia3_l",), "vera": ("vera_lambda_b", "vera_lambda_d")}
_VERA_SHARED = ("vera_A", "vera_B")
# The kind's options that are fields of peft's config of the same name (IA³'s feedforward is per module)
_KIND_FIELDS = {"loha": ("rank_dropout", "module_dropout", "use_effective_conv2d"),
                "lokr": ("rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
                         "decompose_factor", "rank_dropout_scale"),
                "oft": ("use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps", "block_share",
                        "module_dropout"),
                "ia3": (), "vera": ("d_initial", "projection_prng_key", "save_projection")}
_COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
           "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
_KIND_KNOWN = {  # the rest of each config's fields that are read, or have no effect on the outputs
    "loha": {"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights"},
    "lokr": {"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights"},
    "oft": {"r", "oft_block_size", "fan_in_fan_out", "bias", "init_weights"},
    "ia3": {"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"},
    "vera": {"r", "fan_in_fan_out", "bias", "init_weights"},
}
PEFT_VERSION = "0.21.2"  # the peft whose files these are (OFT reads its Cayley-Neumann form from 0.18 on)


def _kind_layer(kind: str, module: nn.Module, parent: nn.Module | None) -> str:
    """Why peft's ``kind`` tuner cannot wrap ``module``, or ``""`` where it can."""
    cls = type_before_parametrizations(module)
    layer = None
    if issubclass(cls, nn.Linear):
        layer = "Linear"
    elif issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = cls.__mro__[[c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for c in cls.__mro__].index(True)].__name__
    elif any(f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D" for c in cls.__mro__):
        layer = "Conv1D"
    if layer is None or layer not in _KIND_LAYERS[kind]:
        return (f"a {cls.__name__}, and peft's {KIND_TYPES[kind]} wraps only "
                f"{', '.join(_KIND_LAYERS[kind])}")
    if layer == "Linear" and isinstance(parent, nn.MultiheadAttention):
        return _MHA_OUT.replace("LoRA", KIND_TYPES[kind])
    if layer.startswith("Conv") and layer != "Conv1D":
        if module.groups != 1:
            return f"a {cls.__name__} with groups={module.groups} (lora_inject writes {kind} on groups=1 only)"
        if module.padding_mode != "zeros":
            return f"a {cls.__name__} with padding_mode={module.padding_mode!r} (peft's update ignores it)"
        if kind == "oft" and any(d != 1 for d in module.dilation):
            return f"a {cls.__name__} with dilation {module.dilation} (peft's OFT refuses it)"
    return ""


def _site(fn: str, kind: str, name: str, module: nn.Module, parent: nn.Module | None) -> View:
    """The view of ``module.weight`` as the rule for its type sees it, or raise where peft's
    ``kind`` cannot adapt it."""
    why = _kind_layer(kind, module, parent)
    rule = find_rule(module)
    if not why and (rule is None or not rule.adapts("weight")):
        why = f"a {type_name(module)} without a rule that adapts its weight"
    if why:
        raise ValueError(f"{fn}(): `{name}` is {why}; peft's format cannot hold kind {kind!r} there.")
    return View(tensor_shape(module, "weight"), rule.transpose, False)


def _lokr_conv1d(fn: str, kind: str, name: str, view: View, names) -> None:
    """Raise for LoKr with a full ``lokr_w2`` on a Conv1d: peft's ``make_kron`` then takes
    ``torch.kron`` of a 2-D and a 3-D tensor and reshapes it, which is not the Kronecker product
    of the update (LyCORIS's) that lora_inject computes, so neither side would give the other's
    outputs."""
    if kind == "lokr" and "lokr_w2" in names and len(kernel(view)) == 1:
        raise ValueError(f"{fn}(): `{name}` is a Conv1d with LoKr's full `lokr_w2`, where peft's update is not "
                         "the Kronecker product of its factors (its make_kron misses the kernel dimension), so "
                         "the outputs would differ. Use r < max(out, in) factors / 2 (low-rank lokr_w2) or "
                         "format='lora_inject'.")


def _peft_split(fn: str, e: Entry, view: View) -> Entry:
    """``e`` with peft's ``decompose_factor`` for its explicit LoKr ``factors``, or raise where peft's
    factorization gives none of that split."""
    if e.options.get("factors") is None:
        return e
    factor = peft_factor(view, e.r, e.options)
    if factor is None:
        raise ValueError(f"{fn}(): `{e.key}` is LoKr with factors={list(e.options['factors'])} (w1 "
                         f"{tuple(e.options['factors'][::2])}, w2 {tuple(e.options['factors'][1::2])}), a split that "
                         "peft's factorization gives for no decompose_factor (LyCORIS's large factors and "
                         "unbalanced_factorization give such splits), so peft could not read it. Save with "
                         "format='kohya' or 'lora_inject'.")
    return replace(e, options={**e.options, "factors": None, "decompose_factor": factor})


def _target_spec(modules: dict[str, nn.Module], targets: list[str]) -> list[str] | str:
    """peft's ``target_modules`` that select exactly ``targets``: the list, or a regex where a list
    entry would also match another module (peft matches an entry at the end of a path)."""
    names = [n for n in modules if n]
    if any(n not in targets and any(n.endswith("." + p) for p in targets) for n in names):
        return "|".join(f"(?:{re.escape(p)})" for p in targets)
    return targets


def kinds_to_peft(fn: str, model: nn.Module, entries: list[Entry]) -> tuple[dict, dict[str, Tensor]]:
    """Translate entries of one kind other than LoRA to peft's config and tensors, or raise where
    peft's format cannot hold them."""
    kinds = sorted({e.kind for e in entries})
    if len(kinds) > 1:
        raise ValueError(f"{fn}(): the adapter mixes the kinds {kinds}; peft's format holds one peft_type per "
                         "adapter. Save with format='lora_inject', or save each kind as its own adapter.")
    kind = kinds[0]
    if kind not in KIND_TYPES:
        raise ValueError(f"{fn}(): the adapter is of kind {kind!r}, which peft has no type for (peft's format "
                         f"holds {['lora', *KIND_TYPES]}). Save with format='lora_inject'.")
    K = find_kind(kind)
    modules = dict(named_modules(model))
    parents = _parents(modules)
    at: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        at.setdefault(id(m), []).append(name)
    views = {}
    for e in entries:
        if e.module:
            _site(fn, kind, e.module, modules[e.module], parents[e.module])
        if not e.module or e.tensor != "weight" or e.experts:
            raise ValueError(f"{fn}(): `{e.key}` ({e.type}) has no equivalent in peft's format: peft's "
                             f"{KIND_TYPES[kind]} adapts the `weight` of a submodule. Save with "
                             "format='lora_inject'.")
        views[e.key] = _site(fn, kind, e.module, modules[e.module], parents[e.module])
        if (views[e.key].transpose, tuple(views[e.key].shape)) != (e.transpose, tuple(e.shape)):
            raise ValueError(f"{fn}(): `{e.key}` was adapted with transpose={e.transpose} (a custom rule), but peft "
                             f"reads a {e.type} with transpose={views[e.key].transpose}. Save with "
                             "format='lora_inject'.")
        _lokr_conv1d(fn, kind, e.module, views[e.key], e.extra)
        where = at.get(id(modules[e.module]), [])
        if len(where) > 1:
            raise ValueError(f"{fn}(): {e.type} `{e.module}` sits at {len(where)} paths in the model ({where}); "
                             "peft would adapt it at each, so it would not give this model's outputs. Save with "
                             "format='lora_inject', or untie the module.")
        if kind == "oft" and e.options.get("rotate", "in") != "in":
            raise ValueError(f"{fn}(): `{e.key}` is OFT with rotate={e.options['rotate']!r}; peft's OFT on a "
                             f"{e.type} rotates the input. Save with format='lora_inject'.")
    if kind == "lokr":
        entries = [_peft_split(fn, e, views[e.key]) for e in entries]
    fields = _KIND_FIELDS[kind]
    shared = {tuple((f, e.options[f]) for f in fields) for e in entries}
    if kind == "oft":  # the rank is OFT's block count, part of its structure: one per adapter in peft
        shared = {(*s, ("r", e.r), ("oft_block_size", e.options["oft_block_size"])) for s, e in
                  zip([tuple((f, e.options[f]) for f in fields) for e in entries], entries)}
    if kind == "vera":
        shared = {(*tuple((f, e.options[f]) for f in fields), ("r", e.r)) for e in entries}
    if len(shared) > 1:
        raise ValueError(f"{fn}(): peft's {KIND_TYPES[kind]} has one setting per adapter for "
                         f"{sorted({f for s in shared for f, _ in s})}, but this adapter's tensors differ in them "
                         f"({sorted(shared)}). Save with format='lora_inject'.")
    options = dict(next(iter(shared)))
    targets = [e.module for e in sorted(entries, key=lambda e: list(modules).index(e.module))]
    cls = type_before_parametrizations(model)
    config = {
        "peft_type": KIND_TYPES[kind], "task_type": None, "inference_mode": True, "revision": None,
        "peft_version": PEFT_VERSION,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        if hasattr(cls, "from_pretrained") else None,
        "target_modules": _target_spec(modules, targets), "exclude_modules": None, "modules_to_save": None,
        **{f: options[f] for f in fields},
    }
    if kind in ("loha", "lokr"):
        ranks, alphas = {e.module: e.r for e in entries}, {e.module: e.alpha for e in entries}
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        names = [n for n in modules if n]
        exact = {p: ("^" if any(n != p and n.endswith("." + p) for n in names) else "") + re.escape(p)
                 for p in ranks}
        config.update(r=r0, alpha=a0, rank_pattern={exact[p]: r for p, r in ranks.items() if r != r0},
                      alpha_pattern={exact[p]: a for p, a in alphas.items() if a != a0}, init_weights=True,
                      layers_to_transform=None, layers_pattern=None)
    conv1d = any(v.transpose for v in views.values()) and not any(not v.transpose for v in views.values())
    if kind == "oft":
        config.update(r=options["r"], oft_block_size=options["oft_block_size"], fan_in_fan_out=False,
                      bias="none", init_weights=True, layers_to_transform=None, layers_pattern=None)
    if kind == "ia3":
        ff = [e.module for e in entries if e.options["feedforward"]]
        by_list = all(any(t.endswith(f) for f in ff) == (t in ff) for t in targets)
        config.update(feedforward_modules=ff if by_list else "|".join(f"(?:{re.escape(p)})" for p in ff) or [],
                      fan_in_fan_out=conv1d, init_ia3_weights=True)
    if kind == "vera":
        config.update(r=options["r"], fan_in_fan_out=conv1d, bias="none", init_weights=True, vera_dropout=0.0,
                      layers_to_transform=None, layers_pattern=None)
    tensors = {}
    for e in entries:
        for name, t in e.extra.items():
            if name not in _VERA_SHARED:
                tensors[f"{PREFIX}{e.module}.{K.peft_key(name)}"] = t.contiguous()
    if kind == "vera":
        A, B = _vera_projections(fn, K, entries, views, options)
        if options["save_projection"]:
            tensors["base_model.vera_A"], tensors["base_model.vera_B"] = A, B
    return config, tensors


def _vera_projections(fn: str, K, entries: list[Entry], views: dict[str, View], options: dict):
    """VeRA's shared ``vera_A`` ``(r, in_max)`` and ``vera_B`` ``(out_max, r)``, from the slices the
    sites hold; raise unless the slices are of one projection, the one peft rebuilds from the key
    where it is not saved."""
    wide = max(entries, key=lambda e: views[e.key].in_features)
    tall = max(entries, key=lambda e: views[e.key].out_features)
    A, B = wide.extra["vera_A"], tall.extra["vera_B"]
    for e in entries:
        v = views[e.key]
        if not (torch.equal(e.extra["vera_A"], A[:, :v.in_features].to(e.extra["vera_A"]))
                and torch.equal(e.extra["vera_B"], B[:v.out_features].to(e.extra["vera_B"]))):
            raise ValueError(f"{fn}(): VeRA's projections on `{e.key}` are not slices of those of `{wide.key}` "
                             f"and `{tall.key}`; peft shares one pair per adapter. Save with "
                             "format='lora_inject'.")
    if not options["save_projection"]:
        made = K.shared(list(views.values()), options["r"], options)
        if not (torch.equal(made["vera_A"].to(A), A) and torch.equal(made["vera_B"].to(B), B)):
            raise ValueError(f"{fn}(): VeRA's projections differ from those projection_prng_key="
                             f"{options['projection_prng_key']} gives, and save_projection=False would have peft "
                             "rebuild them from the key. Inject with save_projection=True, or save with "
                             "format='lora_inject'.")
    return A.contiguous(), B.contiguous()


def _check_kind_config(fn: str, file: str, config: dict, kind: str) -> None:
    def refuse(what: str) -> ValueError:
        return ValueError(f"{fn}(): {file} uses {what}, which lora_inject cannot reproduce; nothing was "
                          "loaded. Merge the adapter with peft (merge_and_unload()) instead.")

    known = _COMMON | _KIND_KNOWN[kind] | set(_KIND_FIELDS[kind])
    unknown = next((k for k, v in config.items() if k not in known and v not in (None, False, [], {}, "", 0, 0.0)),
                   None)
    if unknown is not None:
        raise refuse(f"the field {unknown!r} = {config[unknown]!r} with peft_type {config['peft_type']!r}")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config['bias']!r} with peft_type {config['peft_type']!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, (str, list)) or targets == "all-linear":
        raise refuse(f"target_modules={targets!r} (a list of names or a regex is needed)")
    if kind == "ia3" and not isinstance(config.get("feedforward_modules") or [], (str, list)):
        raise refuse(f"feedforward_modules={config['feedforward_modules']!r} (a list of names or a regex)")
    for field in ("target_modules", "exclude_modules") + (("feedforward_modules",) if kind == "ia3" else ()):
        if isinstance(config.get(field), str):
            try:
                re.compile(config[field])
            except re.error as e:
                raise ValueError(f"{fn}(): `{field}` in {file} is not a valid regex: {e}.") from None


def kind_of(config: dict) -> str | None:
    """Our kind for peft's ``peft_type`` of ``config``, or None for LoRA."""
    return _TYPE_KINDS.get(config.get("peft_type"))


def _feedforward(config: dict, name: str) -> bool:
    """peft's IA³ ``_check_target_module_feedforward``: a regex fully matches, a list entry ends the path."""
    spec = config.get("feedforward_modules") or []
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(s) for s in spec)


def kinds_from_peft(fn: str, model: nn.Module, saved: Saved) -> list[Entry]:
    """Translate peft's LoHa, LoKr, OFT, IA³ or VeRA adapter ``saved`` into entries for ``model``,
    or raise where it cannot be reproduced."""
    file, weights, config, tensors = saved.file, saved.weights, saved.config, dict(saved.tensors)
    kind = kind_of(config)
    K = find_kind(kind)
    modules = dict(named_modules(model))
    parents = _parents(modules)
    sites = {}
    for name, module in modules.items():
        if name and _targeted(config, name) and not isinstance(module, LoRA):
            try:
                sites[name] = _site(fn, kind, name, module, parents[name])
            except ValueError as e:
                raise ValueError(f"{str(e).rstrip('.')}; {file} targets it, so nothing was loaded.") from None
    if not sites:
        raise ValueError(f"{fn}(): `target_modules` in {file} selects no module of the model; it was saved from "
                         "another model.")
    shared = {}
    if kind == "vera":
        r = config.get("r", 256)
        options = {o.name: config.get(o.name, o.default) for o in K.options}
        if config.get("vera_dropout"):
            raise ValueError(f"{fn}(): {file} has vera_dropout={config['vera_dropout']!r}; lora_inject's VeRA has "
                             "no dropout, so nothing was loaded.")
        want = K.shared([View(tuple(v.shape), v.transpose, False) for v in sites.values()], r, options)
        if any(k in tensors for k in ("base_model.vera_A", "base_model.vera_B")):
            for x in _VERA_SHARED:
                t = tensors.pop(f"base_model.{x}", None)
                if t is None or tuple(t.shape) != tuple(want[x].shape):
                    raise ValueError(f"{fn}(): {weights} holds `base_model.{x}` of shape "
                                     f"{None if t is None else tuple(t.shape)}, but VeRA with r={r} on the modules "
                                     f"{file} targets needs {tuple(want[x].shape)}. It was saved from another model.")
                shared[x] = t
        else:
            shared = want
    entries = []
    for name, view in sites.items():
        module = modules[name]
        opts = {f: config[f] for f in _KIND_FIELDS[kind] if f in config}
        r, alpha = None, None
        if kind in ("loha", "lokr"):
            r = _pattern(fn, config, "rank_pattern", name, config.get("r", 8))
            alpha = float(_pattern(fn, config, "alpha_pattern", name, config.get("alpha", 8)))
        elif kind == "vera":
            r = config.get("r", 256)
        elif kind == "ia3":
            opts["feedforward"] = _feedforward(config, name)
        got = {n: tensors.pop(f"{PREFIX}{name}.{K.peft_key(n)}") for n in _KIND_TENSORS[kind]
               if f"{PREFIX}{name}.{K.peft_key(n)}" in tensors}
        if kind == "oft":  # the block size, from oft_R's shape (peft may have adjusted the config's)
            if "oft_R" not in got:
                raise ValueError(f"{fn}(): {file} targets `{name}`, but {weights} lacks `{PREFIX}{name}.oft_R.weight`. "
                                 "It was saved from another model.")
            try:
                b = block_size(got["oft_R"].shape[-1]) if got["oft_R"].dim() == 2 else 0
            except ValueError:
                b = 0
            if b < 2 or view.in_features % b:
                raise ValueError(f"{fn}(): `{PREFIX}{name}.oft_R.weight` has shape {tuple(got['oft_R'].shape)}, "
                                 f"which is no OFT block of the {view.in_features} inputs of `{name}`. It was saved "
                                 "from another model.")
            r, opts["oft_block_size"], opts["rotate"] = 0, b, "in"
        r, alpha, opts = K.resolve(r, alpha, **opts)
        with torch.device("meta"):
            made = K.create(view, r, alpha, opts)
        shapes = {n: tuple(t.shape) for n, t in made.items()}
        if set(got) != set(shapes) or any(tuple(got[n].shape) != s for n, s in shapes.items()):
            have = {f"{K.peft_key(n)}": tuple(t.shape) for n, t in got.items()}
            need = {f"{K.peft_key(n)}": s for n, s in shapes.items()}
            raise ValueError(f"{fn}(): {weights} holds {have or 'nothing'} for `{name}`, but "
                             f"{KIND_TYPES[kind]} with r={r} and {file}'s options on its weight of shape "
                             f"{tuple(view.shape)} makes {need}. It was saved from another model or config.")
        _lokr_conv1d(fn, kind, name, view, got)
        bad = next((n for n, t in got.items() if not t.dtype.is_floating_point), None)
        if bad is not None:
            raise TypeError(f"{fn}(): `{PREFIX}{name}.{K.peft_key(bad)}` in {weights} has dtype "
                            f"{dtype_name(got[bad].dtype)}; an adapter's tensors are floating point. The file is "
                            "corrupt.")
        if shared:
            got.update(K.share(shared, view, r, opts))
            got = {n: t.to(got["vera_lambda_b"].dtype) for n, t in got.items()}
        rule = find_rule(module)
        entries.append(Entry(module=name, tensor="weight", type=type_name(module), shape=tuple(view.shape), A=None,
                             B=None, r=r, alpha=alpha, transpose=view.transpose, factored=rule.is_factored(module),
                             extra=got, kind=kind, options=opts))
    if tensors:
        key = sorted(tensors)[0]
        raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(tensors[key].shape)}, which no module that "
                         f"`target_modules` in {file} selects takes; it was saved from another model, so nothing "
                         "was loaded.")
    return entries
