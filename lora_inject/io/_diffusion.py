"""A diffusion LoRA file (kohya-ss, LyCORIS or diffusers layout) loaded into a model or a pipeline.

The target is a module (a diffusers UNet or transformer, a text encoder, any ``nn.Module``) or a
diffusers pipeline, whose components (``unet``, ``transformer``, ``text_encoder``, ..) each take
their own keys. The file's module names are matched against names built from the live model
(:mod:`lora_inject.io._aliases`), and each matched module's tensors become entries
(:mod:`lora_inject.io._kohya`), applied all at once: a refused load changes nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections import Counter
from dataclasses import replace

import torch
from torch import nn

from ._aliases import flat, names
from ._entries import Entry, apply
from ._files import DTYPES, dtype_name, safetensors_torch
from ._kohya import Saved, group, to_entries

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "lora.safetensors")
_DENOISERS = ("unet", "transformer", "prior", "decoder")
_OURS_AND_PEFT = ("adapter.safetensors", "adapter_model.safetensors")  # their configs say their format


def is_pipeline(obj: object) -> bool:
    """Whether ``obj`` is a diffusers pipeline (or anything holding its modules in ``components``)."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def components(pipe) -> dict[str, nn.Module]:
    """The modules of a pipeline, by attribute."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}


def find_file(path: str) -> str | None:
    """The safetensors file ``path`` names: itself, or the one such file in the folder ``path``."""
    if os.path.isfile(path):
        return path if path.endswith(".safetensors") else None
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f not in _OURS_AND_PEFT)
    for name in WEIGHT_NAMES:
        if name in found:
            return os.path.join(path, name)
    return os.path.join(path, found[0]) if len(found) == 1 else None


def read(fn: str, file: str) -> tuple[str, list[Saved], dict]:
    """``(layout, modules, metadata)`` of the file, read through a memory map (the file's bytes are
    never held twice).

    Raises:
        ValueError: if the file is truncated or corrupt.
        TypeError: if a tensor is not floating point.
    """
    st = safetensors_torch(fn)
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n < 100_000_000 else None
            size = os.fstat(f.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
        body = size - 8 - n
        cut = next((k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > body), None)
        if cut is not None:
            raise ValueError(f"`{cut}` needs bytes up to {header[cut]['data_offsets'][1]} of the data, but the file "
                             f"holds {body}")
        tensors = st.load_file(file)
    except Exception as e:  # SafetensorError, a broken header, a short file
        raise ValueError(f"{fn}(): {file} is truncated or corrupt ({type(e).__name__}: {e}). Nothing was "
                         "loaded.") from None
    for key, t in tensors.items():
        if t.dtype not in DTYPES.values():
            raise TypeError(f"{fn}(): `{key}` in {file} has dtype {dtype_name(t.dtype)}; LoRA tensors must be "
                            f"floating point ({', '.join(DTYPES)}).")
    metadata = header.get("__metadata__") or {}
    layout, saved = group(fn, file, tensors)
    return layout, saved, metadata


def load(fn: str, target, file: str, *, adapter: str, dtype: torch.dtype | None, strict: bool) -> None:
    """Load the file into ``target`` (a module or a pipeline) as adapter ``adapter``.

    Raises:
        ValueError: if keys match no module, a partial match (unless ``strict=False``), tensors that
            do not fit the modules they name, or the file is truncated or corrupt.
    """
    holder, entries = resolve(fn, target, file, strict=strict)
    if dtype is not None:
        entries = [e.cast(dtype) for e in entries]
    else:  # the adapted weight's dtype, as diffusers gives them
        modules = dict(holder.named_modules())
        entries = [e if e.dtype == (d := _dtype_of(modules[e.module], e.tensor)) else e.cast(d) for e in entries]
    apply(fn, holder, entries, adapter)


def _dtype_of(module: nn.Module, tensor: str) -> torch.dtype:
    """The dtype of ``module``'s tensor as the factors should have it: its own if floating, else float32."""
    from .._chain import source

    t = source(module, tensor)
    dtype = getattr(t, "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


def resolve(fn: str, target, file: str, *, strict: bool = True) -> tuple[nn.Module, list[Entry]]:
    """``(holder, entries)``: the file's entries on ``target``, with paths in ``holder`` (``target``
    itself, or a module holding a pipeline's components under their names); nothing changes.

    Raises:
        ValueError: as :func:`load`.
    """
    _, saved, metadata = read(fn, file)
    _alphas(saved, metadata)
    pipe = is_pipeline(target)
    roots = components(target) if pipe else {"": target}
    plan: dict[str, list[Saved]] = {}  # root -> its modules in the file
    stray: list[Saved] = []  # modules of no root
    others: dict[str, list[Saved]] = {}  # a single module: the other components, warned about
    if pipe:
        for s in saved:
            root = _root_of(s.component, roots)
            (plan.setdefault(root, []) if root is not None else stray).append(s)
    else:
        by_component: dict[str | None, list[Saved]] = {}
        for s in saved:
            by_component.setdefault(s.component, []).append(s)
        table = names(target)
        scores = {c: _score(fn, group_, target, table) if len(by_component) > 1 else (1, 1)
                  for c, group_ in by_component.items()}  # one component: the checks below say the rest
        best = max(scores, key=lambda c: (*scores[c], c is None))
        if scores[best][1] == 0:
            stray = saved
        else:
            plan[""] = by_component.pop(best)
            others = {str(c): g for c, g in by_component.items()}
    entries: list[Entry] = []
    skipped: list[Saved] = []
    near: dict[str, list[str]] = {}
    for root_name, group_ in plan.items():
        root = roots[root_name]
        table = names(root)
        prefix = _wrapper_prefix([s for s in group_ if flat(s.path) not in table], table)
        modules = dict(root.named_modules())
        for s in group_:
            targets = _lookup(s, table, prefix)
            if targets is None:
                skipped.append(s)
                near[s.name] = difflib.get_close_matches(flat(s.path), list(table), n=3)
                continue
            for path, rows in targets:
                for e in to_entries(fn, s, path, modules[path], rows):
                    e.module = f"{root_name}.{e.module}" if root_name else e.module
                    entries.append(e)
    for s in stray:
        near[s.name] = []
    if not entries:
        _refuse(fn, file, target, saved, near)
    if stray or (skipped and strict):
        missed = stray + skipped
        what = ", ".join(f"`{s.name}`" + (f" (nearest: {near[s.name]})" if near.get(s.name) else "")
                         for s in missed[:6])
        raise ValueError(
            f"{fn}(): {file} matches {type(target).__name__} in part: {len(missed)} of its {len(saved)} modules "
            f"match no module ({what}{', ...' if len(missed) > 6 else ''}). Nothing was loaded. Pass "
            "strict=False to load the rest and skip those, or load it into the model it was made for.")
    if skipped:
        warnings.warn(f"{fn}(): skipped {len(skipped)} module(s) of {file} that match no module of "
                      f"{type(target).__name__} (strict=False): {[s.name for s in skipped]}.", stacklevel=3)
    if others:
        warnings.warn(
            f"{fn}(): {file} also holds the component(s) {sorted(others)} ({sum(map(len, others.values()))} "
            f"modules, such as `{next(iter(others.values()))[0].name}`), which are not {type(target).__name__}: "
            "they were not loaded. Pass the pipeline to load every component, or load the file into each.",
            stacklevel=3)
    holder = target
    if pipe:
        holder = nn.Module()
        for name in plan:
            holder.add_module(name, roots[name])
    return holder, entries


def _root_of(component: str | None, roots: dict[str, nn.Module]) -> str | None:
    if component in roots:
        return component
    if component in _DENOISERS:
        return next((d for d in _DENOISERS if d in roots), None)
    return None


def _score(fn: str, saved: list[Saved], root: nn.Module, table) -> tuple[int, int]:
    """How many of ``saved`` fit ``root`` (named there, with tensors of the right shapes), and how
    many are named there."""
    modules = dict(root.named_modules())
    prefix = _wrapper_prefix([s for s in saved if flat(s.path) not in table], table)
    fits = named = 0
    for s in saved:
        targets = _lookup(s, table, prefix)
        if targets is None:
            continue
        named += 1
        try:
            for path, rows in targets:
                to_entries(fn, s, path, modules[path], rows)
        except (ValueError, AttributeError, RuntimeError):
            continue
        fits += 1
    return fits, named


def _lookup(s: Saved, table, prefix: str):
    key = flat(s.path)
    if key in table:
        return table[key]
    if prefix and key.startswith(prefix + "_"):
        return table.get(key[len(prefix) + 1:])
    return None


def _wrapper_prefix(missed: list[Saved], table) -> str:
    """The leading name the file gives the modules it misses and the live model lacks (a wrapper
    such as CLIP's ``text_model``): the one most of them share, or ``""``."""
    found = Counter()
    for s in missed:
        parts = flat(s.path).split("_")
        for k in range(1, len(parts)):
            if "_".join(parts[k:]) in table:
                found["_".join(parts[:k])] += 1
                break
    return found.most_common(1)[0][0] if found else ""


def _refuse(fn: str, file: str, target, saved: list[Saved], near: dict[str, list[str]]) -> None:
    keys = [k for s in saved[:4] for k in s.keys()[:1]]
    hints = {s.name: near.get(s.name) for s in saved[:4] if near.get(s.name)}
    components_ = sorted({str(s.component) for s in saved})
    raise ValueError(
        f"{fn}(): no key of {file} matches a module of {type(target).__name__}: its {len(saved)} modules "
        f"(components {components_}; keys such as {keys}) are none of the model's"
        + (f" (nearest module names: {hints})" if hints else "")
        + ". The file was made for another model; nothing was loaded.")


def _alphas(saved: list[Saved], metadata: dict) -> None:
    """diffusers' layout: each module's alpha from the file's ``lora_adapter_metadata`` (peft's
    config per component: ``lora_alpha``, ``alpha_pattern``), where it has one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    for s in saved:
        if s.flat or "alpha" in s.tensors:
            continue
        own = {k[len(f"{s.component}."):]: v for k, v in config.items() if k.startswith(f"{s.component}.")}
        c = own or config.get(s.component) or config  # "unet.lora_alpha", {"unet": {..}}, or one config
        if not isinstance(c, dict) or "lora_alpha" not in c:
            continue
        alpha = c["lora_alpha"]
        for pattern, a in (c.get("alpha_pattern") or {}).items():
            if s.path == pattern or s.path.endswith("." + pattern):
                alpha = a
        s.tensors["alpha"] = torch.tensor(float(alpha))


def kohya_prefix(component: str, names_: list[str], root: nn.Module) -> str:
    """The kohya-ss prefix of a pipeline component (``""`` for a single module, by its type)."""
    if component in _DENOISERS:
        return "lora_unet"
    if component.startswith("text_encoder"):
        n = component.removeprefix("text_encoder").lstrip("_") or "1"
        return "lora_te" if n == "1" and "text_encoder_2" not in names_ else f"lora_te{n}"
    if component:
        return f"lora_{component}"
    return "lora_te" if _is_text_encoder(root) else "lora_unet"


def _is_text_encoder(root: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(root).__mro__)


def to_kohya(fn: str, target, adapter: str, entries: list[Entry] | None = None) -> dict[str, torch.Tensor]:
    """The kohya-layout tensors of adapter ``adapter`` of ``target`` (a module or a pipeline), or
    of ``entries`` (with paths in ``target``, or in its components under their names)."""
    from ._entries import collect
    from ._kohya import from_entry

    roots = components(target) if is_pipeline(target) else {"": target}
    out: dict[str, torch.Tensor] = {}
    found = False
    for component, root in roots.items():
        if entries is not None:
            mine = [e for e in entries if not component or e.module.startswith(component + ".")]
            mine = [replace(e, module=e.module[len(component) + 1:] if component else e.module) for e in mine]
        else:
            try:
                mine = collect(fn, root, adapter)
            except ValueError:
                continue  # this component does not carry the adapter
        if not mine:
            continue
        found = True
        prefix = kohya_prefix(component, list(roots), root)
        # CLIP's text models are named under its `text_model` in kohya-ss' files (and transformers 4)
        clip = type(root).__name__.startswith("CLIPText") and not hasattr(root, "text_model")
        wrapper = "text_model_" if clip else ""
        for e in mine:
            out.update(from_entry(f"{prefix}_{wrapper}{flat(e.module)}", e))
    if not found:
        raise ValueError(f"{fn}(): no adapter named {adapter!r} in {type(target).__name__}. Pass `adapter=` with the "
                         "name it was loaded or injected under.")
    return out


def summary(fn: str, file: str) -> dict:
    """What a diffusion file holds: its layout, and per component the number of modules, their
    kinds, ranks and alphas."""
    layout, saved, metadata = read(fn, file)
    _alphas(saved, metadata)
    parts: dict[str, dict] = {}
    for s in saved:
        p = parts.setdefault(str(s.component or "(module)"), {"modules": 0, "kinds": Counter(), "ranks": Counter(),
                                                           "alphas": Counter()})
        p["modules"] += 1
        kind = s.kind + ("+dora" if "dora_scale" in s.tensors or "lora_magnitude_vector" in s.tensors else "") + (
            "+tucker" if {"lora_mid.weight", "hada_t1", "lokr_t2"} & set(s.tensors) else "")
        p["kinds"][kind] += 1
        p["ranks"][s.rank if s.kind != "full" else "full"] += 1
        alpha = s.alpha
        p["alphas"]["-" if alpha is None else f"{alpha:g}"] += 1
    return {"layout": "LyCORIS" if layout == "kohya" and any(s.kind in ("loha", "lokr", "full") for s in saved)
            else layout, "parts": parts, "tensors": sum(len(s.tensors) for s in saved)}
