"""Add LoRA to any PyTorch model in place, and take it out again."""

from .arithmetic import combine
from .io import load_adapter, save_adapter
from .lora import Adapter, LoRA
from .per_sample import per_sample
from .rule import Rule, default_rules, register_rule
from .state import (
    activate,
    cached,
    disabled,
    init_lora,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    named_loras,
)
from .surgery import RequantizationWarning, inject, remove
from .version import __version__ as __version__

__all__ = [
    "Adapter",
    "LoRA",
    "RequantizationWarning",
    "Rule",
    "activate",
    "cached",
    "combine",
    "default_rules",
    "disabled",
    "init_lora",
    "inject",
    "load_adapter",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "named_loras",
    "per_sample",
    "register_rule",
    "remove",
    "save_adapter",
]
