"""peft's LoRA format, both ways: our adapters to ``adapter_model.safetensors`` +
``adapter_config.json``, and those files back to our adapters (the other kinds peft has are
:mod:`lora_inject.io._peft_kinds`; the files and the config, :mod:`lora_inject.io._peft_config`).

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
import re
from collections import Counter

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .._chain import find_lora, parametrized, source
from .._selection import named_modules
from .._tied import tensor_users, users_of
from .._view import View, compute_dtype
from ..lora import LoRA, lora_scaling
from ..rule import find_rule, own_tensor_names, type_name
from ._entries import Copy, Entry, tensor_shape
from ._files import dtype_name, is_integer
from ._peft_config import (
    MHA_OUT,
    PREFIX,
    SUFFIXES,
    TOKENS,
    Saved,
    matches,
    parents_of,
    pattern,
    targeted,
    unwrap,
)

_BIASED = ("linear", "conv", "conv1d")  # the layers where peft's lora_B has a bias (lora_bias=True)
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


def _param_names(module: nn.Module) -> list[str]:
    """The module's own parameters in registration order (a parametrized one by its name)."""
    names = [n for n, t in module._parameters.items() if t is not None]
    return names + [n for n in parametrized(module) if n not in names]


def _is_transposed(module: nn.Module) -> bool:
    """transformers' expert modules store ``(E, in, out)`` where they say ``is_transposed``."""
    return bool(getattr(module, "is_transposed", False))


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
    x = _grouped(fn, model, entries, lora_bias)
    return _lora_config(fn, model, x, lora_bias, tie), _lora_tensors(x, lora_bias)


@dataclasses.dataclass
class _Export:
    """One adapter's entries grouped as peft's LoRA format writes them (see :func:`_grouped`)."""

    modules: dict[str, nn.Module]  # the model's modules by path
    kinds: dict[str, str]  # entry key -> how it is written (see _export_kind)
    lora: list[Entry]  # the LoRA layers
    full: list[Entry]  # the full copies: modules_to_save, or a bias alone (peft's `bias`)
    tokens: list[Entry]  # trainable token rows
    copies: set[str]  # modules_to_save: the outermost module of each full copy
    wrapped: set[str]  # the modules peft wraps in a LoRA layer of its own
    own_bias: dict[str, Entry]  # with lora_bias: the bias updates written as lora_B.bias, by module
    scalings: dict[str, float]  # each LoRA layer's scaling, by module
    mha: dict[str, dict[str, Entry]]  # MultiheadAttention path -> its in_proj and out_proj entries
    pkey: dict[str, str]  # entry key -> peft's pattern key: the module, the MultiheadAttention, or module.param

    def copied(self, path: str) -> bool:
        """Whether ``path`` is inside a module that is saved whole."""
        return any(path == c or path.startswith(f"{c}.") for c in self.copies)


def _grouped(fn: str, model: nn.Module, entries: list[Entry], lora_bias: bool) -> _Export:
    """``entries`` grouped for peft's LoRA format, or raise where peft could not give the model's
    outputs with them (a module at several paths, a LoRA inside a full copy, a bias peft's
    ``lora_B.bias`` cannot hold, a MultiheadAttention with two ranks)."""
    modules = dict(named_modules(model))
    parents = parents_of(modules)
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
    # modules_to_save (a bias alone is peft's `bias`): the outermost module of each, whose copy holds
    # its submodules' tensors too, as peft wraps and saves it (a MultiheadAttention with its out_proj)
    copies = saved_whole(full)
    x = _Export(modules, kinds, lora, full, [e for e in entries if kinds[e.key] == "tokens"], copies,
                {e.module for e in lora if kinds[e.key] in _LORA_KINDS}, {},
                {e.module: lora_scaling(e.r, e.alpha, e.rslora) for e in lora}, {},
                # peft names each LoRA by a pattern key: the module, the MultiheadAttention, or module.parameter.
                {e.key: e.key if kinds[e.key] == "param" else
                 e.module.rpartition(".")[0] if kinds[e.key] == "mha_out" else e.module for e in lora})
    clash = next((e for e in lora if x.copied(e.module)), None)
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
        x.own_bias = {e.module: e for e in full if e.tensor == "bias" and e.module in x.wrapped
                      and not x.copied(e.module)}
    zero = next((m for m in x.own_bias if x.scalings[m] == 0), None)
    if zero is not None:
        raise ValueError(f"{fn}(): `{zero}` has a bias update but a LoRA scaling of 0, so no lora_B.bias gives it. "
                         "Save with lora_bias=False.")
    for e in lora:
        if kinds[e.key] in ("mha", "mha_out"):
            owner = e.module if kinds[e.key] == "mha" else e.module.rpartition(".")[0]
            x.mha.setdefault(owner, {})[kinds[e.key]] = e
    for owner, pair in x.mha.items():
        if len({(e.r, e.alpha, e.rslora) for e in pair.values()}) > 1:
            raise ValueError(f"{fn}(): peft gives MultiheadAttention `{owner}` one r and alpha for in_proj and "
                             f"out_proj, but this adapter has {[(e.key, e.r, e.alpha) for e in pair.values()]}. "
                             "Save with format='lora_inject'.")
    return x


def _lora_config(fn: str, model: nn.Module, x: _Export, lora_bias: bool, tie: bool) -> dict:
    """peft's ``adapter_config.json`` for ``x``, or raise where peft has one setting per adapter
    (``lora_dropout``, ``use_dora``) and the entries differ in it."""
    lora, kinds, modules, pkey = x.lora, x.kinds, x.modules, x.pkey
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
    # peft has one use_rslora: fold any other scaling into alpha, as alpha' / r == alpha / sqrt(r).
    alphas = {pkey[e.key]: e.alpha * math.sqrt(e.r) if e.rslora and not rslora else e.alpha for e in lora}
    ranks = {pkey[e.key]: e.r for e in lora}
    r0 = Counter(ranks.values()).most_common(1)[0][0] if lora else 8
    a0 = Counter(alphas.values()).most_common(1)[0][0] if lora else 8
    biases = {e.module for e in x.full if e.tensor == "bias" and not x.copied(e.module) and e.module not in x.own_bias}
    names = [n for n in modules if n]
    targets = sorted({pkey[e.key] for e in lora if kinds[e.key] != "param"}, key=list(modules).index)
    exact = {p: ("^" if any(n != p and n.endswith("." + p) for n in names) else "") + re.escape(p)
             for p in ranks}
    overmatch = any(n not in targets and any(n.endswith("." + p) for p in targets) for n in names)
    params = [e for e in lora if kinds[e.key] == "param"]
    cls = type_before_parametrizations(model)
    return {
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
        "bias": "none" if not biases else "lora_only" if biases <= x.wrapped else "all",
        "modules_to_save": sorted(x.copies, key=list(modules).index) or None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "trainable_token_indices": {e.module: list(e.options["token_indices"]) for e in x.tokens} or None,
        "ensure_weight_tying": tie,
    }


def _lora_tensors(x: _Export, lora_bias: bool) -> dict[str, Tensor]:
    """peft's ``adapter_model.safetensors`` for ``x``: the LoRA layers' factors in peft's shapes,
    the full copies, and the token rows."""
    kinds, modules, pkey = x.kinds, x.modules, x.pkey
    tensors = {PREFIX + e.module + TOKENS: e.extra["trainable_tokens_delta"] for e in x.tokens}
    for e in x.lora:
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
            b = x.own_bias.get(e.module)
            b = (b.B.float() @ b.A.float()).reshape(-1) * (lora_scaling(b.r, b.alpha, b.rslora) / x.scalings[e.module]
                                                         ) if b is not None else B.new_zeros(B.shape[0])
            tensors[p + ".lora_B.bias"] = b.to(B.dtype)
    for owner, pair in x.mha.items():  # peft adapts in_proj and out_proj together: the missing one is zero
        e = next(iter(pair.values()))
        mod = modules[owner]
        zeros = {"mha": (f"{PREFIX}{owner}", mod.in_proj_weight.shape),
                 "mha_out": (f"{PREFIX}{owner}.base_layer.out_proj", mod.out_proj.weight.shape)}
        for kind, (p, (out, inn)) in zeros.items():
            if kind not in pair:
                tensors[p + ".lora_A.weight"] = e.A.new_zeros(e.r, inn)
                tensors[p + ".lora_B.weight"] = e.B.new_zeros(out, e.r)
    by_key = {e.key: e for e in x.full}
    for e in x.full:
        if x.copied(e.module) or e.module in x.own_bias and e.tensor == "bias":
            continue
        tensors[f"{PREFIX}{e.module}{'.base_layer' if e.module in x.wrapped else ''}.{e.tensor}"] = \
            _merged(modules[e.module], e)
    tensors.update(copy_tensors(modules, x.copies, by_key))
    return tensors


def saved_whole(full: list[Entry]) -> set[str]:
    """peft's ``modules_to_save`` for the full copies ``full`` (a bias alone is peft's ``bias``):
    the outermost module of each, whose copy holds its submodules' tensors too, as peft wraps and
    saves it (a MultiheadAttention with its out_proj)."""
    copies = {e.module for e in full if e.tensor != "bias"}
    return {c for c in copies if not any(c.startswith(f"{o}.") for o in copies)}


def copy_tensors(modules: dict[str, nn.Module], copies: set[str], by_key: dict[str, Entry]) -> dict[str, Tensor]:
    """The state dict of each module saved whole (``copies``), as peft saves it: each tensor updated
    where an entry of ``by_key`` (by ``path.tensor``) has it."""
    tensors = {}
    for name in copies:
        for sub, module in named_modules(modules[name]):
            path = f"{name}.{sub}" if sub else name
            for q in _state_names(module):
                e = by_key.get(f"{path}.{q}")
                tensors[f"{PREFIX}{path}.{q}"] = _merged(module, e) if e else source(module, q).detach()
    return tensors


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
def from_peft(fn: str, model: nn.Module, saved: Saved) -> tuple[list[Entry], list[Copy]]:
    """Translate peft's LoRA adapter ``saved`` (``peft_type`` ``"LORA"`` or ``"TRAINABLE_TOKENS"``; the
    other kinds are :func:`~lora_inject.io._peft_kinds.kinds_from_peft`'s) into entries and exact
    copies for ``model``, or raise if it cannot be reproduced.

    LoRA factors become LoRA entries. A full tensor (``modules_to_save``, ``bias="all"`` or
    ``"lora_only"``, ``save_embedding_layers``) that equals the base is dropped; a floating one
    that differs becomes the exact update ``W_saved - W0``, as a LoRA of full rank with an identity
    factor; an integer one that differs (a BatchNorm's ``num_batches_tracked``) is a copy.
    """
    if saved.config.get("peft_type") == "TRAINABLE_TOKENS":  # peft's tokens alone: `p.trainable_tokens_delta`
        return tied_once(fn, saved.file, model, _token_entries(fn, model, dict(named_modules(model)), saved),
                          saved.config), []
    file, weights, config, tensors = saved.file, saved.weights, saved.config, saved.tensors
    modules = dict(named_modules(model))
    factors: dict[tuple[str, int], dict[str, tuple[str, Tensor]]] = {}
    others: dict[str, Tensor] = {}
    entries = _token_entries(fn, model, modules, saved)
    for key, t in sorted(tensors.items()):
        rest = key.removeprefix(PREFIX)
        if rest.endswith(TOKENS):
            continue  # read above
        suffix = next((s for s in SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            others[key] = t
            continue
        module, depth = unwrap(rest[: -len(suffix)])
        _check_key(fn, weights, modules, key, t, module)
        if is_integer(t.dtype):
            raise TypeError(f"{fn}(): `{key}` in {weights} has dtype {dtype_name(t.dtype)}; LoRA factors must be "
                            "floating point. The file is corrupt.")
        factors.setdefault((module, depth), {})[SUFFIXES[suffix]] = (key, t)
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
    more, copies = full_tensors(fn, saved, modules, others, {(e.module, e.tensor) for e in entries}, biases)
    return tied_once(fn, file, model, entries + more, config), copies


def _check_key(fn: str, weights: str, modules: dict[str, nn.Module], key: str, t: Tensor, module: str,
               tensor: str | None = None) -> None:
    """Raise where ``key`` is not peft's, or names no module (or no tensor ``tensor``) of the model."""
    if not key.startswith(PREFIX):
        raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, which is not a key of peft's "
                         f"format (they start with {PREFIX!r}); nothing was loaded.")
    if module not in modules or isinstance(modules[module], LoRA) or (
            tensor is not None and tensor not in own_tensor_names(modules[module])):
        what = f"no module `{module}`" if tensor is None or module not in modules else f"no tensor `{module}.{tensor}`"
        raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, but the model has {what}. "
                         "It was saved from another model.")


def full_tensors(fn: str, saved: Saved, modules: dict[str, nn.Module], tensors: dict[str, Tensor],
                 adapted: set[tuple[str, str]], biases: dict | None = None) -> tuple[list[Entry], list[Copy]]:
    """peft's full tensors ``tensors`` (keys and values; ``modules_to_save``, ``bias="all"`` or
    ``"lora_only"``, ``save_embedding_layers``), beside an adapter on the tensors ``adapted``, as
    entries and exact copies (see :func:`from_peft`); ``biases``: LoRA's ``lora_bias`` updates, by
    ``(module path, "bias")``, taken out as they are used."""
    weights, config = saved.weights, saved.config
    biases = {} if biases is None else biases
    full: dict[tuple[str, str], tuple[str, Tensor]] = {}
    for key, t in tensors.items():
        where, _, tensor = key.removeprefix(PREFIX).rpartition(".")
        module, _ = unwrap(where)
        _check_key(fn, weights, modules, key, t, module, tensor)
        held = full.get((module, tensor))  # the trained copy of a modules_to_save module wins over its original
        if held is None or _copy_rank(key) > _copy_rank(held[0]):
            full[(module, tensor)] = (key, t)
    whole = config.get("modules_to_save") or []
    entries, copies = [], []
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
    return entries, copies


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
        spec = {p: saved.config.get("token_indices") for p in modules if p and matches(targets, p)}
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


def tied_once(fn: str, file: str, model: nn.Module, entries: list[Entry], config: dict) -> list[Entry]:
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
    parents, claims = parents_of(modules), {}
    for name, module in modules.items():
        if not name:
            continue
        if targeted(config, name):
            kind, why = peft_kind(module, parents[name])
            why = MHA_OUT if kind == "mha_out" else why
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
    r = pattern(fn, config, "rank_pattern", pkey, config.get("r", 8))
    alpha = pattern(fn, config, "alpha_pattern", pkey, config.get("lora_alpha", 8))
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
