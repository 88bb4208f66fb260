"""peft's adapter directory: its file names and keys, its ``adapter_config.json`` checked against
what lora_inject reproduces, for LoRA and for the other kinds peft has (LoHa, LoKr, OFT, IA³,
VeRA), and peft's rules for which modules a config selects and with which rank and alpha.

:mod:`lora_inject.io._peft` translates LoRA adapters both ways, and
:mod:`lora_inject.io._peft_kinds` the other kinds; both take the :class:`Saved` adapter that :func:`read_peft` returns.
"""

from __future__ import annotations

import dataclasses
import os
import re

from torch import Tensor, nn

from ..kind import find_kind
from ._files import read_json, read_pickled, read_safetensors

# -- the files and their keys ----------------------------------------------------------------------
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"  # peft's save_pretrained(safe_serialization=False)
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
            ".lora_magnitude_vector": "m", ".lora_B.bias": "b"}
TOKENS = ".token_adapter.trainable_tokens_delta"  # trainable_token_indices: the rows' values, below the module


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
                ends = [f".{find_kind(kind).peft_key(n)}" for n in KIND_TENSORS[kind]]
                end = next((e for e in ends if rest.endswith(e)), None)
                if rest != key and end is not None:
                    paths.append(rest[: -len(end)])
                continue
            if rest.endswith(TOKENS):
                paths.append(rest[: -len(TOKENS)])
                continue
            suffix = next((s for s in SUFFIXES if rest.endswith(s)), None)
            paths.append(unwrap(rest[: -len(suffix)] if suffix else rest.rpartition(".")[0])[0])
        return paths


def read_peft(fn: str, path: str) -> Saved:
    """Read peft's adapter in the directory ``path``, checking its config. The weights are
    ``adapter_model.safetensors``, or else ``adapter_model.bin``, read with
    ``torch.load(weights_only=True)``: tensors only, never an arbitrary object."""
    file, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    config = read_json(fn, file)
    check_config(fn, file, config)
    if not os.path.exists(weights) and os.path.exists(os.path.join(path, PICKLE)):
        weights = os.path.join(path, PICKLE)
        return Saved(file, weights, config, read_pickled(fn, weights, integers=True))
    tensors, _ = read_safetensors(fn, weights, integers=True)
    return Saved(file, weights, config, tensors)


def unwrap(path: str) -> tuple[str, int]:
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


# -- the kinds peft has besides LoRA: LoHa, LoKr, OFT, IA³, VeRA -----------------------------------
KIND_TYPES = {"loha": "LOHA", "lokr": "LOKR", "oft": "OFT", "ia3": "IA3", "vera": "VERA"}
_TYPE_KINDS = {t: k for k, t in KIND_TYPES.items()}
# The tensors of each kind in peft's files, by our name (the key below the module is its peft_key)
KIND_TENSORS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
                "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                "oft": ("oft_R",), "ia3": ("ia3_l",), "vera": ("vera_lambda_b", "vera_lambda_d")}
# The kind's options that are fields of peft's config of the same name (IA³'s feedforward is per module)
KIND_FIELDS = {"loha": ("rank_dropout", "module_dropout", "use_effective_conv2d"),
               "lokr": ("rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
                        "decompose_factor", "rank_dropout_scale"),
               "oft": ("use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps", "block_share",
                       "module_dropout"),
               "ia3": (), "vera": ("d_initial", "projection_prng_key", "save_projection")}


def kind_of(config: dict) -> str | None:
    """Our kind for peft's ``peft_type`` of ``config``, or None for LoRA."""
    return _TYPE_KINDS.get(config.get("peft_type"))


# -- the config, checked against what lora_inject reproduces ---------------------------------------
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
_COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
           "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
           "modules_to_save"}
_KIND_KNOWN = {  # the rest of each config's fields that are read, or have no effect on the outputs
    "loha": {"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights"},
    "lokr": {"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights"},
    "oft": {"r", "oft_block_size", "fan_in_fan_out", "bias", "init_weights"},
    "ia3": {"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"},
    "vera": {"r", "fan_in_fan_out", "bias", "init_weights"},
}


def _refuse(fn: str, file: str, what: str) -> ValueError:
    return ValueError(f"{fn}(): {file} uses {what}, which lora_inject cannot reproduce; nothing was "
                      "loaded. Merge the adapter with peft (merge_and_unload()) instead.")


def check_config(fn: str, file: str, config: dict) -> None:
    """Raise where ``config`` (read from ``file``) asks for what lora_inject cannot reproduce: a
    peft_type, a field or a value it does not know, an init that changes the base weights, or a
    selector that is not a list of names or a valid regex."""
    if kind_of(config) is not None:
        _check_kind_config(fn, file, config, kind_of(config))
        return
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        unknown = next((k for k, v in config.items() if k not in _TOKENS_KNOWN and v not in (None, False, [], {}, "")),
                       None)
        if unknown is not None:
            raise _refuse(fn, file, f"the field {unknown!r} = {config[unknown]!r} with peft_type 'TRAINABLE_TOKENS'")
        if not isinstance(config.get("target_modules"), (str, list)):
            raise _refuse(fn, file, f"target_modules={config.get('target_modules')!r} (a list of names or a regex "
                                    "is needed)")
        return
    if config.get("peft_type") != "LORA":
        raise _refuse(fn, file, f"peft_type {config.get('peft_type')!r} (only {['LORA', *_TYPE_KINDS]} translate)")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise _refuse(fn, file, f"{what} = {config[field]!r}")
    if config.get("init_lora_weights", True) not in _INITS:
        raise _refuse(fn, file, f"init_lora_weights={config['init_lora_weights']!r}, which changes the base weights")
    unknown = next((k for k, v in config.items() if k not in _KNOWN and v not in (None, False, [], {}, "")), None)
    if unknown is not None:
        raise _refuse(fn, file, f"the field {unknown!r} = {config[unknown]!r}, unknown to lora_inject")
    targets = config.get("target_modules")
    if targets is None and config.get("target_parameters"):
        targets = []
    if not isinstance(targets, (str, list)) or targets == "all-linear":
        raise _refuse(fn, file, f"target_modules={targets!r} (a list of names or a regex is needed)")
    for field in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field), str):
            try:
                re.compile(config[field])
            except re.error as e:
                raise ValueError(f"{fn}(): `{field}` in {file} is not a valid regex: {e}.") from None


def _check_kind_config(fn: str, file: str, config: dict, kind: str) -> None:
    known = _COMMON | _KIND_KNOWN[kind] | set(KIND_FIELDS[kind])
    unknown = next((k for k, v in config.items() if k not in known and v not in (None, False, [], {}, "", 0, 0.0)),
                   None)
    if unknown is not None:
        raise _refuse(fn, file, f"the field {unknown!r} = {config[unknown]!r} with peft_type {config['peft_type']!r}")
    if config.get("bias", "none") != "none":
        raise _refuse(fn, file, f"bias={config['bias']!r} with peft_type {config['peft_type']!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, (str, list)) or targets == "all-linear":
        raise _refuse(fn, file, f"target_modules={targets!r} (a list of names or a regex is needed)")
    if kind == "ia3" and not isinstance(config.get("feedforward_modules") or [], (str, list)):
        raise _refuse(fn, file, f"feedforward_modules={config['feedforward_modules']!r} (a list of names or a regex)")
    for field in ("target_modules", "exclude_modules") + (("feedforward_modules",) if kind == "ia3" else ()):
        if isinstance(config.get(field), str):
            try:
                re.compile(config[field])
            except re.error as e:
                raise ValueError(f"{fn}(): `{field}` in {file} is not a valid regex: {e}.") from None


# -- which modules a config selects, with which rank and alpha -------------------------------------
MHA_OUT = ("a MultiheadAttention's out_proj targeted on its own: MultiheadAttention reads out_proj.weight "
           "without calling out_proj, so peft's LoRA there has no effect (peft merges out_proj's LoRA only when "
           "the MultiheadAttention itself is targeted)")


def parents_of(modules: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    """Each module's parent by path (None for the root), for what peft decides by the parent
    (a MultiheadAttention's ``out_proj``)."""
    return {n: modules.get(n.rpartition(".")[0]) if n else None for n in modules}


def matches(spec: str | list | None, name: str) -> bool:
    """peft's rule: a str must fully match; a list entry must equal the name or end it after a dot."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{s}") for s in spec)


def targeted(config: dict, name: str) -> bool:
    """peft's ``check_target_module_exists``: excluded modules and ``modules_to_save`` never match,
    and with a list of targets ``layers_to_transform`` keeps only the layers it names, except for a
    module whose whole path is in the list (``lm_head``), which peft takes before any layer filter."""
    if matches(config.get("exclude_modules"), name) or any(
            re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if not matches(targets, name):
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


def pattern(fn: str, config: dict, field: str, name: str, default):
    """peft's ``get_pattern_key``: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in (config.get(field) or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(f"{fn}(): the key {key!r} of `{field}` is not a valid regex: {e}.") from None
    return default


def feedforward(config: dict, name: str) -> bool:
    """peft's IA³ ``_check_target_module_feedforward``: a regex fully matches, a list entry ends the path."""
    spec = config.get("feedforward_modules") or []
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(s) for s in spec)
