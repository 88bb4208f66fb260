"""Our format: ``adapter.safetensors`` and ``adapter.json``."""

from __future__ import annotations

import hashlib
import os

from ..version import __version__
from .entries import EXTRAS, Entry
from .files import DTYPES, dtype_name, read_json, read_safetensors

__all__: list[str] = []

CONFIG = "adapter.json"
WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


def to_ours(entries: list[Entry], adapter: str) -> tuple[dict, dict]:
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


def from_ours(fn: str, path: str) -> tuple[str, list[Entry]]:
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


