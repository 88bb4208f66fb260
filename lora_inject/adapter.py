"""Adapters on disk: ``save_adapter`` writes one adapter of a model, ``load_adapter`` puts it back.

Our format is a directory that holds two files:

* ``adapter.safetensors``: for each adapted tensor ``p.weight``, the factors ``p.weight.lora_A``
  ``(r, in)`` and ``p.weight.lora_B`` ``(out, r)`` (with a leading experts dimension for expert
  weights), in their own dtype, and where the adapter has them DoRA's magnitude
  ``p.weight.lora_magnitude`` and the frozen initial factors ``p.weight.lora_A0``/``lora_B0`` of
  the ``"pissa"``/``"olora"`` inits;
* ``adapter.json``: the format and library versions, the adapter's name, dtype and targets, the
  sha256 of the weights file, and for each adapted tensor its module path and type, its shape, r,
  alpha, rslora, dora, dropout, init and rule (``transpose``, ``experts``, ``factored``).

peft's format (``adapter_model.safetensors`` and ``adapter_config.json``) is translated by
:mod:`lora_inject.peft_format`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from .files import DTYPES, dtype_name, read_json, read_safetensors, write_atomic, write_safetensors
from .inits import WEIGHT_INITS
from .lookup import _loras, _parametrized, _source, find_lora, named_modules
from .lora import LoRA, check_adapter_name, lora_scaling
from .rule import Rule, _own_tensor_names, type_name
from .state import refuse_flat_params
from .surgery import inject, remove

__all__ = ["load_adapter", "save_adapter"]

M = TypeVar("M", bound=nn.Module)
FACTORS = ("lora_A", "lora_B")
EXTRAS = ("lora_magnitude", "lora_A0", "lora_B0")  # what an adapter may hold besides its factors
CONFIG = "adapter.json"
WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1
FORMATS = ("lora_inject", "peft")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter: str = "default",
                 format: str = "lora_inject") -> None:
    r"""Write adapter ``adapter`` of ``model`` to the directory ``path``.

    With ``format="lora_inject"`` the directory gets ``adapter.safetensors`` (the factors) and
    ``adapter.json`` (everything needed to inject them again: per tensor r, alpha, rslora, the
    rule and shape; the targets, dtype and library version). With ``format="peft"`` it gets
    ``adapter_model.safetensors`` and ``adapter_config.json``, which
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads; that covers ``Linear``,
    transformers' ``Conv1D``, ``Embedding`` and ``Conv1d/2d/3d`` with ``groups=1``, and per-tensor
    r and alpha go to ``rank_pattern``/``alpha_pattern``.

    Each file is written to a temporary file in ``path`` and renamed into place, so an
    interrupted save never leaves a half-written file under the final name (and the weights'
    sha256 in ``adapter.json`` catches a weights file from another save).

    Args:
        model (nn.Module): a model that carries ``adapter``.
        path (str or os.PathLike): the directory to write; it is created if needed.
        adapter (str): the adapter to save. Default: ``"default"``.
        format (str): ``"lora_inject"`` or ``"peft"``. Default: ``"lora_inject"``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``adapter`` is not a str.
        ValueError: if ``format`` is unknown, the model has no adapter ``adapter``, or (for
            ``format="peft"``) a tensor has no equivalent in peft's format.
        RuntimeError: if the factors are sharded: flattened by FSDP1, or DTensors under FSDP2
            (unshard the FSDP modules first; see the README's "Distributed training").

    Example::

        >>> inject(model, "attn", r=8)
        >>> save_adapter(model, "my_adapter")
        >>> load_adapter(fresh_model, "my_adapter")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter(): `model` must be an nn.Module, got {type(model).__name__}.")
    if format not in FORMATS:
        raise ValueError(f"save_adapter(): `format` must be one of {FORMATS}, got {format!r}.")
    from . import peft_format

    entries = collect("save_adapter", model, adapter)
    path = os.fspath(path)
    if format == "peft":
        config, tensors = peft_format.to_peft("save_adapter", model, entries)
    else:
        config, tensors = _to_ours(entries, adapter)
    os.makedirs(path, exist_ok=True)
    weights, config_name = (
        (peft_format.WEIGHTS, peft_format.CONFIG) if format == "peft" else (WEIGHTS, CONFIG))
    blob = write_safetensors(tensors, {"format": "pt"})
    if format != "peft":
        config["sha256"] = hashlib.sha256(blob).hexdigest()
    write_atomic(os.path.join(path, weights), blob)
    write_atomic(os.path.join(path, config_name), (json.dumps(config, indent=2) + "\n").encode())


def load_adapter(model: M, path: str | os.PathLike, *, adapter: str | None = None) -> M:
    r"""Load the adapter saved in the directory ``path`` into ``model``, in place.

    The format is detected: ``adapter.json`` is ours, ``adapter_config.json`` is peft's. If the
    model does not carry the adapter yet, it is injected with the saved r, alpha, scaling and
    rule of every tensor, and the outputs equal those of the saved model exactly. If the model
    already carries it, on exactly those tensors, the factors are updated in place (same
    Parameter objects, so an optimizer holding them stays valid), and so are alpha and the
    scaling. Everything is checked before anything changes: if the call raises, the model is
    exactly as it was.

    From peft's format this reads ``r``, ``lora_alpha``, ``target_modules`` (a list, or a regex
    that must fully match), ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``,
    ``use_rslora`` and ``lora_dropout``; ``fan_in_fan_out`` follows the layer type, as in peft.
    What it cannot reproduce (DoRA, other peft types, ``modules_to_save``, bias tensors,
    inits that change the base weights, ...) is refused.

    Args:
        model (nn.Module): the base model, or a model that already carries the adapter.
        path (str or os.PathLike): a directory written by :func:`save_adapter` or by peft's
            ``save_pretrained``.
        adapter (str, optional): the name to load it under. Default: the saved name for our
            format, ``"default"`` for peft's.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``adapter`` is not a str, or a saved
            tensor has a dtype that LoRA factors cannot have.
        ValueError: if ``path`` holds no adapter, a file is missing, truncated or corrupt, the
            adapter was saved from another model (unknown module paths, other types or
            shapes), it does not match the adapter the model already carries, or peft's
            config uses a feature that cannot be translated.
    """
    fn = "load_adapter"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(): `model` must be an nn.Module, got {type(model).__name__}.")
    if adapter is not None:
        check_adapter_name(fn, adapter)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{fn}(): `path` must be a directory written by save_adapter() or by "
                         f"peft's save_pretrained(), got {path!r}, which is not a directory.")
    from . import peft_format

    if os.path.exists(os.path.join(path, CONFIG)):
        saved_name, entries = _from_ours(fn, path)
    elif os.path.exists(os.path.join(path, peft_format.CONFIG)):
        saved_name, entries = "default", peft_format.from_peft(fn, model, path)
    else:
        lone = [f for f in (WEIGHTS, peft_format.WEIGHTS) if os.path.exists(os.path.join(path, f))]
        what = f"it has {lone[0]} but its config is missing" if lone else "it holds no adapter files"
        raise ValueError(
            f"{fn}(): {path!r} is not an adapter directory: {what}. Expected {CONFIG} + {WEIGHTS} "
            f"(save_adapter) or {peft_format.CONFIG} + {peft_format.WEIGHTS} (peft); save it again."
        )
    apply(fn, model, entries, adapter or saved_name)
    return model


# -- our format ------------------------------------------------------------------------------
def collect(fn: str, model: nn.Module, adapter: str) -> list[Entry]:
    """Read adapter ``adapter`` of ``model`` into entries, one per adapted tensor."""
    check_adapter_name(fn, adapter)
    entries, present = [], set()
    loras = list(_loras(model))
    refuse_flat_params(fn, model, loras)  # FSDP1
    for qualname, module, tensor_name, lora in loras:
        present.update(lora.adapters)
        if adapter not in lora.adapters:
            continue
        if any(hasattr(t, "full_tensor") for t in lora.tensors(adapter).values()):
            raise RuntimeError(
                f"{fn}(): the factors of `{qualname}.{tensor_name}` are shards (DTensors, as FSDP2 leaves "
                "them). Unshard every FSDP module on every rank (m.unshard()), save on one rank, then "
                "reshard; or save lora_state_dict(model), which gathers them. See the README's "
                "\"Distributed training\".")
        c = lora.config[adapter]
        entries.append(Entry(
            module=qualname, tensor=tensor_name, type=type_name(module), shape=tuple(lora.shape),
            A=lora.lora_A[adapter].detach(), B=lora.lora_B[adapter].detach(), r=c["r"],
            alpha=float(c["alpha"]), rslora=bool(c.get("rslora", False)), dropout=float(c["dropout"]),
            init=c["init"], targets=c["targets"], transpose=lora.transpose, experts=lora.experts,
            factored=bool(lora.factored), dora=bool(c.get("dora", False)),
            extra={k: t.detach() for k, t in lora.tensors(adapter).items() if k not in FACTORS},
        ))
    if not entries:
        raise ValueError(f"{fn}(): no adapter named {adapter!r} in the model; it has {sorted(present)}. "
                         "Pass `adapter=` with one of those names.")
    return entries


def _to_ours(entries: list[Entry], adapter: str) -> tuple[dict, dict]:
    from . import __version__

    dtypes = {dtype_name(e.A.dtype) for e in entries}
    config = {
        "format": "lora_inject", "format_version": FORMAT_VERSION, "version": __version__,
        "adapter": adapter, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "targets": list(dict.fromkeys(e.targets for e in entries)), "weights": WEIGHTS,
        "tensors": {e.key: {
            "module": e.module, "tensor": e.tensor, "type": e.type, "shape": list(e.shape), "r": e.r,
            "alpha": e.alpha, "rslora": e.rslora, "dora": e.dora, "dropout": e.dropout, "init": e.init,
            "targets": e.targets, "dtype": dtype_name(e.A.dtype),
            "rule": {"transpose": e.transpose, "experts": e.experts, "factored": e.factored},
        } for e in entries},
    }
    tensors = {}
    for e in entries:
        tensors[f"{e.key}.lora_A"], tensors[f"{e.key}.lora_B"] = e.A, e.B
        tensors.update({f"{e.key}.{k}": t for k, t in e.extra.items()})
    return config, tensors


def _from_ours(fn: str, path: str) -> tuple[str, list[Entry]]:
    file = os.path.join(path, CONFIG)
    config = read_json(fn, file)
    if config.get("format") != "lora_inject" or not isinstance(config.get("tensors"), dict):
        raise ValueError(f"{fn}(): {file} is not a lora_inject adapter config (no \"format\": "
                         "\"lora_inject\" or no \"tensors\"). Save the adapter again with save_adapter().")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{fn}(): {file} has format_version {config.get('format_version')!r}, written "
                         f"by lora_inject {config.get('version')}; this version reads {FORMAT_VERSION}. "
                         "Upgrade lora_inject, or save the adapter again.")
    if config.get("dtype") not in (*DTYPES, "mixed"):
        raise TypeError(f"{fn}(): {file} says the factors' dtype is {config.get('dtype')!r}, which "
                        f"cannot be loaded; LoRA factors are one of {sorted(DTYPES)}.")
    weights = os.path.join(path, WEIGHTS)
    tensors, blob = read_safetensors(fn, weights)
    if hashlib.sha256(blob).hexdigest() != config.get("sha256"):
        raise ValueError(f"{fn}(): {weights} does not match {file} (sha256 differs): the files come "
                         "from different saves, or one was changed. Save the adapter again.")
    entries = []
    for key, t in config["tensors"].items():
        try:
            A, B = tensors.pop(f"{key}.lora_A"), tensors.pop(f"{key}.lora_B")
            entry = Entry(
                module=t["module"], tensor=t["tensor"], type=t["type"], shape=tuple(t["shape"]), A=A, B=B,
                r=t["r"], alpha=float(t["alpha"]), rslora=bool(t["rslora"]), dropout=float(t["dropout"]),
                init=t["init"], targets=t["targets"], transpose=bool(t["rule"]["transpose"]),
                experts=bool(t["rule"]["experts"]), factored=bool(t["rule"]["factored"]),
                dora=bool(t.get("dora", False)),
                extra={k: tensors.pop(f"{key}.{k}") for k in EXTRAS if f"{key}.{k}" in tensors})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{fn}(): the entry for `{key}` in {file} is incomplete or malformed "
                             f"({type(e).__name__}: {e}); save the adapter again.") from None
        if t.get("dtype") != dtype_name(A.dtype) or B.dtype != A.dtype:
            raise TypeError(f"{fn}(): `{key}` is saved as {dtype_name(A.dtype)}/{dtype_name(B.dtype)} "
                            f"but {file} says {t.get('dtype')!r}; save the adapter again.")
        entries.append(entry)
    if tensors:
        extra = next(iter(tensors))
        raise ValueError(f"{fn}(): {weights} holds `{extra}` {tuple(tensors[extra].shape)}, which "
                         f"{file} does not describe; save the adapter again.")
    return config.get("adapter", "default"), entries


# -- into the model --------------------------------------------------------------------------
def apply(fn: str, model: nn.Module, entries: Sequence[Entry], name: str) -> None:
    """Check ``entries`` against ``model``, then inject them as adapter ``name``, or update it.

    Nothing changes unless every check passes; a failure while injecting is rolled back.
    """
    if not entries:
        raise ValueError(f"{fn}(): the saved adapter holds no tensors; save it again.")
    check_entries(fn, model, entries)
    keys = {e.key for e in entries}
    existing = {f"{q}.{t}" if q else t: lora for q, _, t, lora in _loras(model) if name in lora.adapters}
    if existing:
        _update(fn, entries, name, existing, keys)
        return
    modules = dict(named_modules(model))
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.module, e.r, e.alpha, e.rslora, e.dora, e.dropout, e.init, e.A.dtype, e.transpose,
                           e.experts, e.factored), []).append(e)
    calls: dict[tuple, set[str]] = {}  # (settings, tensors) -> modules, one inject call each
    for (module, *settings), group in groups.items():
        calls.setdefault((*settings, tuple(e.tensor for e in group)), set()).add(module)
    try:
        for (r, alpha, rslora, dora, dropout, init, dtype, transpose, experts, factored, tensors), paths \
                in calls.items():
            rule = Rule(tuple(re.escape(t) for t in tensors), transpose=transpose, experts=experts,
                        factored=factored)
            inject(model, lambda q, m, paths=paths: q in paths, r=r, alpha=alpha, adapter=name,
                   dropout=dropout, init=init, rules={nn.Module: rule},
                   dtype=dtype, rslora=rslora, dora=dora)
        with torch.no_grad():
            for e in entries:
                lora = find_lora(modules[e.module], e.tensor)
                _fill(lora, name, e)
                lora.config[name]["targets"] = e.targets
    except BaseException:
        if any(name in lora.adapters for *_, lora in _loras(model)):
            remove(model, adapter=name, merge=False)
        raise


def _fill(lora: LoRA, name: str, e: Entry) -> None:
    """Copy the saved tensors of ``e`` into adapter ``name`` of ``lora``, in place."""
    mine = lora.tensors(name)
    for k, t in (("lora_A", e.A), ("lora_B", e.B), *e.extra.items()):
        mine[k].copy_(t)


def _update(fn: str, entries: Sequence[Entry], name: str, existing: dict[str, LoRA], keys: set[str]):
    extra = next((k for k in existing if k not in keys), None)
    if extra is not None:
        raise ValueError(f"{fn}(): the model's adapter {name!r} also covers `{extra}`, which the saved "
                         f"adapter lacks. Load it under another name with `adapter=`, or remove "
                         f"{name!r} first.")
    for e in entries:
        lora = existing.get(e.key)
        if lora is None:
            raise ValueError(f"{fn}(): the saved adapter covers `{e.key}`, where the model's adapter "
                             f"{name!r} is absent. Load it under another name with `adapter=`, or "
                             f"remove {name!r} first.")
        mine = lora.tensors(name)
        if set(mine) != {*FACTORS, *e.extra}:
            raise ValueError(f"{fn}(): `{e.key}` holds {sorted({*FACTORS, *e.extra})} in the saved adapter (dora="
                             f"{e.dora}, init={e.init!r}) but {sorted(mine)} in the model's adapter {name!r}. "
                             "Load it under another name with `adapter=`.")
        for f, saved in (("lora_A", e.A), ("lora_B", e.B), *e.extra.items()):
            have = mine[f]
            if have.shape != saved.shape:
                raise ValueError(f"{fn}(): `{e.key}.{f}` has shape {tuple(saved.shape)} in the saved "
                                 f"adapter but {tuple(have.shape)} in the model's adapter {name!r} "
                                 f"(r={e.r} vs r={lora.config[name]['r']}). Load it under another name.")
    with torch.no_grad():
        for e in entries:
            lora = existing[e.key]
            _fill(lora, name, e)
            lora.config[name].update(alpha=e.alpha, rslora=e.rslora, dropout=e.dropout, targets=e.targets)
            lora.scaling[name] = lora_scaling(e.r, e.alpha, e.rslora)


# -- shared with peft_format -----------------------------------------------------------------
@dataclass
class Entry:
    """One adapted tensor of a saved adapter: where it is, its factors and how to re-inject it."""

    module: str  # qualified module path
    tensor: str  # tensor name on that module
    type: str  # the module's type name
    shape: tuple[int, ...]  # the tensor's shape
    A: Tensor  # (r, in), or (E, r, in)
    B: Tensor  # (out, r), or (E, out, r)
    r: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    init: str = "default"
    targets: str | None = None
    transpose: bool = False
    experts: bool = False
    factored: bool = False
    dora: bool = False
    extra: dict[str, Tensor] = field(default_factory=dict)  # lora_magnitude (DoRA), lora_A0/lora_B0 (pissa/olora)

    @property
    def key(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


def tensor_shape(module: nn.Module, tensor_name: str) -> tuple[int, ...]:
    """The shape ``module.<tensor_name>`` reads as, without computing a parametrization if avoidable."""
    lora = find_lora(module, tensor_name)
    if lora is not None:
        return tuple(lora.shape)
    if tensor_name in _parametrized(module):
        return tuple(getattr(module, tensor_name).shape)
    return tuple(_source(module, tensor_name).shape)


def check_entries(fn: str, model: nn.Module, entries: Sequence[Entry]) -> None:
    """Raise unless every entry fits ``model``: module path, type, tensor, shapes, layout."""
    modules = dict(named_modules(model))
    for e in entries:
        module = modules.get(e.module)
        if module is None or isinstance(module, LoRA):
            near = [n for n in modules if n and n.rsplit(".", 1)[-1] == e.module.rsplit(".", 1)[-1]][:3]
            raise ValueError(f"{fn}(): the adapter has `{e.key}`, but the model has no module "
                             f"`{e.module}` (modules with that last name: {near}). It was saved from "
                             "another model.")
        if type_name(module) != e.type:
            raise ValueError(f"{fn}(): `{e.key}` was saved from a {e.type}, but `{e.module}` is a "
                             f"{type_name(module)}. It was saved from another model.")
        if e.tensor not in _own_tensor_names(module):
            raise ValueError(f"{fn}(): the adapter has `{e.key}`, but {e.type} `{e.module}` has no "
                             f"tensor {e.tensor!r}. It was saved from another model.")
        shape = tensor_shape(module, e.tensor)
        if shape != tuple(e.shape):
            raise ValueError(f"{fn}(): `{e.key}` has shape {shape} in the model but {tuple(e.shape)} "
                             "in the adapter. It was saved from another model (or another size of it).")
        lead, core = (shape[:1], shape[1:]) if e.experts else ((), shape)
        out, inn = (core[-1], core[0]) if e.transpose else (core[0], math.prod(core[1:]))
        needs = {"lora_A": (*lead, e.r, inn), "lora_B": (*lead, out, e.r)}
        if e.dora:
            needs["lora_magnitude"] = (*lead, out)
        if e.init in WEIGHT_INITS:
            needs.update(lora_A0=needs["lora_A"], lora_B0=needs["lora_B"])
        if set(e.extra) != set(needs) - set(FACTORS):
            raise ValueError(f"{fn}(): `{e.key}` comes with {sorted(e.extra)}, but dora={e.dora} and "
                             f"init={e.init!r} need {sorted(set(needs) - set(FACTORS))}. The file is corrupt.")
        for f, t in (("lora_A", e.A), ("lora_B", e.B), *e.extra.items()):
            if tuple(t.shape) != needs[f]:
                raise ValueError(f"{fn}(): `{e.key}.{f}` has shape {tuple(t.shape)}, but r={e.r} on "
                                 f"`{e.key}` of shape {shape} needs {needs[f]}. The file is corrupt.")
        lora = find_lora(module, e.tensor)
        if lora is not None and (lora.transpose, lora.experts) != (e.transpose, e.experts):
            raise ValueError(f"{fn}(): `{e.key}` carries LoRA with transpose={lora.transpose}, "
                             f"experts={lora.experts}, but the adapter was saved with "
                             f"transpose={e.transpose}, experts={e.experts}.")


