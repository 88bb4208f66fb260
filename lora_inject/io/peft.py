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
==========================  ======================================  ==========================

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

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from ..lookup import named_modules, source
from ..lora import LoRA, lora_scaling
from ..rule import find_rule, type_name
from .entries import Entry, tensor_shape
from .files import read_json, read_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
             ".lora_magnitude_vector": "m"}
_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights alone
_UNSUPPORTED = {
    "modules_to_save": "`modules_to_save` (full copies of modules)",
    "lora_bias": "`lora_bias`", "target_parameters": "`target_parameters`",
    "layers_to_transform": "`layers_to_transform`", "trainable_token_indices": "`trainable_token_indices`",
    "layer_replication": "`layer_replication`", "megatron_config": "Megatron layers",
    "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
}
_KNOWN = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias", "init_lora_weights", "layers_pattern",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "target_modules_to_tie", "use_dora", *_UNSUPPORTED,
}


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
    if issubclass(cls, nn.Linear) and not isinstance(parent, nn.MultiheadAttention):
        return "linear", ""
    if any(f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D" for c in cls.__mro__):
        return "conv1d", ""
    if issubclass(cls, nn.Linear):
        return None, "a MultiheadAttention's out_proj (peft's LoRA there has no effect: MHA reads its weight)"
    return None, f"a {cls.__name__} (peft's LoRA covers Linear, Conv1D, Embedding and Conv with groups=1)"


def _parents(modules: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    return {n: modules.get(n.rpartition(".")[0]) if n else None for n in modules}


# -- ours -> peft ----------------------------------------------------------------------------
def to_peft(fn: str, model: nn.Module, entries: list[Entry]) -> tuple[dict, dict[str, Tensor]]:
    """Translate our entries to peft's config and tensors, or raise if one has no equivalent."""
    entries = [_from_w0(e) for e in entries]
    modules = dict(named_modules(model))
    parents = _parents(modules)
    kinds = {}
    for e in entries:
        kind, why = peft_kind(modules[e.module], parents[e.module])
        if not e.module:
            kind, why = None, "the model itself (peft adapts submodules only)"
        if kind is None or e.tensor != "weight" or e.experts or e.transpose != (kind in ("embedding", "conv1d")):
            why = why or f"a custom rule on {e.type} (tensor {e.tensor!r}, transpose={e.transpose})"
            raise ValueError(f"{fn}(): `{e.key}` has no equivalent in peft's format: it is {why}. Save "
                             "with format='lora_inject', or remove the adapter from that module first.")
        kinds[e.module] = kind
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
    dropouts = sorted({e.dropout for e in entries})
    if len(dropouts) > 1:
        raise ValueError(f"{fn}(): peft has one `lora_dropout` per adapter, but this adapter uses {dropouts}. "
                         "Save with format='lora_inject', or set one dropout in each LoRA's config.")
    doras = sorted({e.dora for e in entries})
    if len(doras) > 1:
        raise ValueError(f"{fn}(): peft has one `use_dora` per adapter, but this adapter is DoRA on some tensors "
                         "only. Save with format='lora_inject'.")
    rslora = all(e.rslora for e in entries)
    # peft has one use_rslora: fold any other scaling into alpha, as alpha' / r == alpha / sqrt(r).
    alphas = {e.module: e.alpha * math.sqrt(e.r) if e.rslora and not rslora else e.alpha for e in entries}
    r0 = Counter(e.r for e in entries).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    names = [n for n in modules if n]
    paths = [e.module for e in entries]
    exact = {p: ("^" if any(n != p and n.endswith("." + p) for n in names) else "") + re.escape(p)
             for p in paths}
    overmatch = any(n not in kinds and any(n.endswith("." + p) for p in paths) for n in names)
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": r0, "lora_alpha": a0,
        "target_modules": "|".join(f"(?:{re.escape(p)})" for p in paths) if overmatch else paths,
        "rank_pattern": {exact[e.module]: e.r for e in entries if e.r != r0},
        "alpha_pattern": {exact[p]: a for p, a in alphas.items() if a != a0},
        "use_rslora": rslora, "fan_in_fan_out": "conv1d" in kinds.values() and "linear" not in kinds.values(),
        "lora_dropout": dropouts[0], "bias": "none", "lora_bias": False, "use_dora": doras[0],
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None,
    }
    tensors = {}
    for e in entries:
        p, kind = PREFIX + e.module, kinds[e.module]
        if e.dora:  # (out,); for Conv (1, out, 1, ..)
            m = e.extra["lora_magnitude"]
            tensors[p + ".lora_magnitude_vector"] = m.reshape(1, -1, *[1] * (len(e.shape) - 2)) if kind == "conv" else m
        if kind == "embedding":
            tensors[p + ".lora_embedding_A"], tensors[p + ".lora_embedding_B"] = e.A, e.B
            continue
        A, B = e.A, e.B
        if kind == "conv":  # (r, in*k) -> (r, in, *k); (out, r) -> (out, r, 1, ..)
            A, B = A.reshape(e.r, *e.shape[1:]), B.reshape(*B.shape, *[1] * (len(e.shape) - 2))
        tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"] = A, B
    return config, tensors


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
def from_peft(fn: str, model: nn.Module, path: str) -> list[Entry]:
    """Read peft's adapter in ``path`` into entries for ``model``, or raise if it cannot be reproduced."""
    file, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    config = read_json(fn, file)
    _check_config(fn, file, config)
    if not os.path.exists(weights) and os.path.exists(os.path.join(path, "adapter_model.bin")):
        raise ValueError(f"{fn}(): {path} holds adapter_model.bin (a pickle), which is not read; save it "
                         "with peft's save_pretrained(..., safe_serialization=True).")
    tensors, _ = read_safetensors(fn, weights)
    modules = dict(named_modules(model))
    factors: dict[str, dict[str, tuple[str, Tensor]]] = {}
    copies: dict[str, tuple[str, Tensor]] = {}
    for key, t in sorted(tensors.items()):
        rest = key.removeprefix(PREFIX)
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        module = rest[: -len(suffix)] if suffix else rest.removesuffix(".base_layer.weight")
        if rest == key or (suffix is None and module == rest):
            raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, not a LoRA factor (from "
                             "modules_to_save, bias or another model); nothing was loaded. Merge it "
                             "with peft (merge_and_unload()) instead.")
        if module not in modules or isinstance(modules[module], LoRA):
            raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, but the model has no module "
                             f"`{module}`. It was saved from another model.")
        if suffix is None:  # peft's copy of an embedding's base weight: fine if it is ours
            copies[module] = (key, t)
        else:
            factors.setdefault(module, {})[_SUFFIXES[suffix]] = (key, t)
    targeted = [n for n in modules if n and _targeted(config, n)]
    stray = next((m for m in factors if m not in targeted), None)
    if stray is not None:
        first = min(k for k, _ in factors[stray].values())
        raise ValueError(f"{fn}(): {weights} holds `{first}`, but `target_modules` in {file} does not select "
                         f"`{stray}`, so peft would not load it.")
    parents, entries = _parents(modules), []
    for name in targeted:
        module = modules[name]
        kind, why = peft_kind(module, parents[name])
        if kind is None:
            raise ValueError(f"{fn}(): {file} targets `{name}`, which is {why}; lora_inject cannot "
                             "reproduce peft's outputs there, so nothing was loaded.")
        emb = kind == "embedding"
        keys = [f"{PREFIX}{name}.lora_embedding_{x}" if emb else f"{PREFIX}{name}.lora_{x}.weight" for x in "AB"]
        got = factors.get(name, {})
        if [got.get(x, ("",))[0] for x in "AB"] != keys:
            raise ValueError(f"{fn}(): {file} targets `{name}` ({type_name(module)}), but {weights} lacks "
                             f"`{keys[0]}`/`{keys[1]}`. It was saved from another model.")
        r = _pattern(fn, config, "rank_pattern", name, config.get("r", 8))
        alpha = _pattern(fn, config, "alpha_pattern", name, config.get("lora_alpha", 8))
        shape = tensor_shape(module, "weight")
        out, inn = (shape[1], shape[0]) if kind in ("embedding", "conv1d") else (shape[0], shape[1])
        want = {"A": (r, inn, *shape[2:]), "B": (out, r, *[1] * (len(shape) - 2))}
        for x in "AB":
            key, t = got[x]
            if tuple(t.shape) != want[x]:
                raise ValueError(f"{fn}(): `{key}` has shape {tuple(t.shape)}, but r={r} on `{name}.weight` "
                                 f"of shape {shape} needs {want[x]}. It was saved from another model.")
        A, B = got["A"][1].reshape(r, -1), got["B"][1].reshape(out, r)
        dora, extra = bool(config.get("use_dora")), {}
        if dora or "m" in got:
            key = f"{PREFIX}{name}.lora_magnitude_vector"
            if "m" not in got or not dora:
                raise ValueError(f"{fn}(): {file} has use_dora={dora}, but {weights} "
                                 f"{'holds' if 'm' in got else 'lacks'} DoRA's magnitude `{key}`. It was saved "
                                 "from another adapter.")
            t = got["m"][1]
            want_m = (1, out, *[1] * (len(shape) - 2)) if kind == "conv" else (out,)
            if tuple(t.shape) != want_m:
                raise ValueError(f"{fn}(): `{key}` has shape {tuple(t.shape)}, but `{name}.weight` of shape "
                                 f"{shape} needs {want_m}. It was saved from another model.")
            extra["lora_magnitude"] = t.reshape(out)
        rule = find_rule(module)
        entries.append(Entry(
            module=name, tensor="weight", type=type_name(module), shape=shape, A=A, B=B, r=r,
            alpha=float(alpha), rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0)),
            init="gaussian" if config.get("init_lora_weights") == "gaussian" else "default",
            targets=config["target_modules"] if isinstance(config["target_modules"], str) else None,
            transpose=kind in ("embedding", "conv1d"), factored=rule.is_factored(module) if rule else True,
            dora=dora, extra=extra))
    for name, (key, t) in copies.items():
        base = source(modules[name], "weight")
        if name not in factors or t.shape != base.shape or not torch.equal(t.to(base.device, base.dtype), base):
            raise ValueError(f"{fn}(): {weights} holds `{key}` {tuple(t.shape)}, a changed copy of the base "
                             f"weight `{name}.weight` {tuple(base.shape)} (a resized vocabulary?). Load it "
                             "into the base model first; nothing was loaded.")
    return entries


def _check_config(fn: str, file: str, config: dict) -> None:
    def refuse(what: str) -> ValueError:
        return ValueError(f"{fn}(): {file} uses {what}, which lora_inject cannot reproduce; nothing was "
                          "loaded. Merge the adapter with peft (merge_and_unload()) instead.")

    if config.get("peft_type") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} (only 'LORA' translates)")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise refuse(f"{what} = {config[field]!r}")
    if config.get("init_lora_weights", True) not in _INITS:
        raise refuse(f"init_lora_weights={config['init_lora_weights']!r}, which changes the base weights")
    unknown = next((k for k, v in config.items() if k not in _KNOWN and v not in (None, False, [], {}, "")), None)
    if unknown is not None:
        raise refuse(f"the field {unknown!r} = {config[unknown]!r}, unknown to lora_inject")
    targets = config.get("target_modules")
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
    return not _matches(config.get("exclude_modules"), name) and _matches(config["target_modules"], name)


def _pattern(fn: str, config: dict, field: str, name: str, default):
    """peft's ``get_pattern_key``: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in (config.get(field) or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(f"{fn}(): the key {key!r} of `{field}` is not a valid regex: {e}.") from None
    return default
