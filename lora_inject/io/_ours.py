"""Our format: ``adapter.safetensors`` and ``adapter.json``."""

from __future__ import annotations

import hashlib
import json
import math
import os

from .._inits import INITS
from ..lora import check_adapter_name
from ..version import __version__
from ._entries import EXTRAS, Entry
from ._files import DTYPES, dtype_name, read_json, read_safetensors

CONFIG = "adapter.json"
WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


# Each field of a tensor's entry: what it must be, as a check and in words.
FIELDS = {
    "module": (lambda v: isinstance(v, str), "a str"),
    "tensor": (lambda v: isinstance(v, str) and bool(v), "a non-empty str"),
    "type": (lambda v: isinstance(v, str) and bool(v), "a non-empty str"),
    "shape": (lambda v: isinstance(v, list) and all(is_int(d) and d >= 0 for d in v), "a list of non-negative ints"),
    "r": (lambda v: is_int(v) and v > 0, "a positive int"),
    "alpha": (is_number, "a finite number"),
    "rslora": (lambda v: isinstance(v, bool), "true or false"),
    "dora": (lambda v: isinstance(v, bool), "true or false"),
    "dora_axis": (lambda v: v in ("out", "in"), '"out" or "in"'),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "init": (lambda v: v in INITS, f"one of {list(INITS)}"),
    "targets": (lambda v: v is None or isinstance(v, str), "a str or null"),
    "dtype": (lambda v: v in DTYPES, f"one of {sorted(DTYPES)}"),
    "rule": (lambda v: isinstance(v, dict) and set(v) == {"transpose", "experts", "factored"}
             and all(isinstance(x, bool) for x in v.values()),
             'an object of three bools: "transpose", "experts", "factored"'),
}
OPTIONAL = {"dora": False, "dora_axis": "out", "kind": "lora"}  # fields that files of an earlier version may lack
# An entry of another kind than LoRA: its own rank and alpha (None where it has none), its options,
# and the names of its tensors.
KIND_FIELDS = {
    "kind": (lambda v: isinstance(v, str) and v.isidentifier(), "a kind's name"),
    "r": (lambda v: v is None or is_int(v) and v >= 0, "a non-negative int or null"),
    "alpha": (lambda v: v is None or is_number(v), "a finite number or null"),
    "options": (lambda v: isinstance(v, dict), "an object of the kind's options"),
    "held": (lambda v: isinstance(v, list) and all(isinstance(n, str) and n.isidentifier() for n in v) and bool(v),
             "a non-empty list of tensor names"),
}


def config_digest(config: dict) -> str:
    """The sha256 of ``config`` without its two digests, as canonical JSON."""
    rest = {k: v for k, v in config.items() if k not in ("sha256", "config_sha256")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checked(fn: str, file: str, key: str, t: object) -> dict:
    """The entry ``t`` of tensor ``key``, every field of the type and value it must have.

    Raises:
        ValueError: naming the first field that is missing or does not fit, and what it must be.
    """
    if not isinstance(t, dict):
        raise ValueError(f"{fn}(): the entry for `{key}` in {file} must be a JSON object, got {t!r}; "
                         "save the adapter again.")
    t = {**OPTIONAL, **t}
    fields = FIELDS if t["kind"] == "lora" else {**FIELDS, **KIND_FIELDS}
    for field, (ok, what) in fields.items():
        if field not in t:
            raise ValueError(f"{fn}(): the entry for `{key}` in {file} has no \"{field}\" ({what}); "
                             "save the adapter again.")
        if not ok(t[field]):
            raise ValueError(f"{fn}(): \"{field}\" of `{key}` in {file} must be {what}, got {t[field]!r}. "
                             "The file was edited or is corrupt; save the adapter again.")
    return t


def to_ours(entries: list[Entry], adapter: str) -> tuple[dict, dict]:
    dtypes = {dtype_name(e.dtype) for e in entries}
    config = {
        "format": "lora_inject", "format_version": FORMAT_VERSION, "version": __version__,
        "adapter": adapter, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "targets": list(dict.fromkeys(e.targets for e in entries)), "weights": WEIGHTS,
        "tensors": {e.key: {
            "module": e.module, "tensor": e.tensor, "type": e.type, "shape": list(e.shape), "r": e.r,
            "alpha": e.alpha, "rslora": e.rslora, "dora": e.dora, "dora_axis": e.dora_axis, "dropout": e.dropout,
            "init": e.init, "targets": e.targets, "dtype": dtype_name(e.dtype),
            "rule": {"transpose": e.transpose, "experts": e.experts, "factored": e.factored},
            **({} if e.kind == "lora" else {"kind": e.kind, "options": e.options, "held": list(e.extra)}),
        } for e in entries},
    }
    tensors = {}
    for e in entries:
        tensors.update({f"{e.key}.{k}": t for k, t in e.tensors.items()})
    return config, tensors


def _kind_entry(fn: str, file: str, weights: str, key: str, t: dict, tensors: dict) -> Entry:
    """The entry of a kind other than LoRA, its tensors taken out of ``tensors``."""
    try:
        held = {k: tensors.pop(f"{key}.{k}") for k in t["held"]}
    except KeyError as e:
        raise ValueError(f"{fn}(): {weights} has no tensor {e}, which {file} describes; save the "
                         "adapter again.") from None
    if any(dtype_name(v.dtype) != t["dtype"] for v in held.values()):
        raise TypeError(f"{fn}(): the tensors of `{key}` are not all {t['dtype']!r}, as {file} says; save the "
                        "adapter again.")
    rule = t["rule"]
    return Entry(module=t["module"], tensor=t["tensor"], type=t["type"], shape=tuple(t["shape"]), A=None, B=None,
                 r=t["r"], alpha=None if t["alpha"] is None else float(t["alpha"]), targets=t["targets"],
                 transpose=rule["transpose"], experts=rule["experts"], factored=rule["factored"], extra=held,
                 kind=t["kind"], options=t["options"])


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
    if "config_sha256" in config and config_digest(config) != config["config_sha256"]:
        raise ValueError(f"{fn}(): {file} does not match its own config_sha256: it was changed after it was "
                         "saved. Save the adapter again.")
    check_adapter_name(fn, config.get("adapter", "default"))
    weights = os.path.join(path, WEIGHTS)
    tensors, blob = read_safetensors(fn, weights)
    if hashlib.sha256(blob).hexdigest() != config.get("sha256"):
        raise ValueError(f"{fn}(): {weights} does not match {file} (sha256 differs): the files come "
                         "from different saves, or one was changed. Save the adapter again.")
    entries = []
    for key, t in config["tensors"].items():
        t = checked(fn, file, key, t)
        if t["kind"] != "lora":
            entries.append(_kind_entry(fn, file, weights, key, t, tensors))
            continue
        try:
            A, B = tensors.pop(f"{key}.lora_A"), tensors.pop(f"{key}.lora_B")
        except KeyError as e:
            raise ValueError(f"{fn}(): {weights} has no tensor {e}, which {file} describes; save the "
                             "adapter again.") from None
        rule = t["rule"]
        entry = Entry(
            module=t["module"], tensor=t["tensor"], type=t["type"], shape=tuple(t["shape"]), A=A, B=B,
            r=t["r"], alpha=float(t["alpha"]), rslora=t["rslora"], dropout=float(t["dropout"]),
            init=t["init"], targets=t["targets"], transpose=rule["transpose"], experts=rule["experts"],
            factored=rule["factored"], dora=t["dora"], dora_axis=t["dora_axis"],
            extra={k: tensors.pop(f"{key}.{k}") for k in EXTRAS if f"{key}.{k}" in tensors})
        if t.get("dtype") != dtype_name(A.dtype) or B.dtype != A.dtype:
            raise TypeError(f"{fn}(): `{key}` is saved as {dtype_name(A.dtype)}/{dtype_name(B.dtype)} "
                            f"but {file} says {t.get('dtype')!r}; save the adapter again.")
        entries.append(entry)
    if tensors:
        extra = next(iter(tensors))
        raise ValueError(f"{fn}(): {weights} holds `{extra}` {tuple(tensors[extra].shape)}, which "
                         f"{file} does not describe; save the adapter again.")
    return config.get("adapter", "default"), entries


