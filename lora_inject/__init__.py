"""Add LoRA to any PyTorch model in place, and take it out again.

LoRA adapts a frozen weight ``W0`` with a trainable low-rank update,
``W = W0 + (alpha / r) * B @ A``. ``lora_inject`` registers that update as a
``torch.nn.utils.parametrize`` parametrization on the tensors you select, so the module's own
``forward`` runs on the adapted weight: any layer type works (attention, RNNs, your own),
``Linear``, ``Conv``, ``Embedding`` and transformers' ``Conv1D`` take a factored fast path,
``W0`` is never written, and the model keeps its classes, hooks and state-dict keys.

The main verbs::

    import lora_inject as li

    li.inject(model, r"q_proj|v_proj", r=8, alpha=16)   # in place; a regex or a list of names
    li.mark_only_lora_as_trainable(model)               # train li.lora_parameters(model)
    li.save_adapter(model, "adapter")                   # or format="peft"; li.load_adapter(base, "adapter")
    li.remove(model, merge=True)                        # a plain model with W0 + (alpha / r) * B @ A

Also: ``activate`` and ``disabled`` choose the active adapters, ``cached`` merges for fast
unmerged inference, ``per_sample`` runs one adapter per sample of a batch, ``combine`` adds
weighted adapters, ``lora_state_dict`` and ``named_loras`` read them, ``Rule`` and
``register_rule`` teach it a layer type; ``inject``'s options give DoRA, rsLoRA, PiSSA, OLoRA,
LoftQ, peft's ``modules_to_save`` and ``trainable_token_indices``, and other kinds of update
(``kind="loha"``, ``"lokr"``, ``"oft"``, ``"ia3"``, ``"vera"``); ``loraplus_param_groups`` gives
LoRA+'s optimizer groups; ``AdapterStore`` serves many adapters from disk through a few slots;
``load_adapter`` also reads kohya-ss, LyCORIS and diffusers files into diffusers models.
``lora_inject.trainer.AdapterTrainer`` is a ``transformers.Trainer`` whose checkpoints hold the
adapter; ``lora-inject`` is the command line (``inspect``, ``convert``, ``merge``, ``demo``).

Read more: the README, and one guide per topic in ``docs/`` (training, files and peft, Hugging
Face and the Trainer, quantized bases, diffusion files, variants, serving, distributed training, performance,
how it works, the promises, the command line), with an API reference built by ``mkdocs build``.
Each public name has its own ``help()``.
"""

from . import _ops as _ops  # its import registers the factored forms in the op table (lora_inject._factored.OPS)
from .adapter_store import AdapterStore
from .arithmetic import combine
from .io import load_adapter, save_adapter
from .kind import Kind, Option, default_kinds, find_kind, register_kind
from .lora import Adapter, LoRA
from .meta import init_lora
from .param_groups import loraplus_param_groups
from .params import (
    adapter_parameters,
    adapter_state_dict,
    lora_parameters,
    lora_state_dict,
    mark_only_adapters_as_trainable,
    mark_only_lora_as_trainable,
    named_loras,
)
from .per_sample import per_sample
from .rule import Rule, default_rules, register_rule
from .state import activate, cached, disabled
from .surgery import RequantizationWarning, inject, remove
from .version import __version__ as __version__

__all__ = [
    "Adapter",
    "AdapterStore",
    "Kind",
    "LoRA",
    "Option",
    "RequantizationWarning",
    "Rule",
    "activate",
    "adapter_parameters",
    "adapter_state_dict",
    "cached",
    "combine",
    "default_kinds",
    "default_rules",
    "disabled",
    "find_kind",
    "init_lora",
    "inject",
    "load_adapter",
    "lora_parameters",
    "lora_state_dict",
    "loraplus_param_groups",
    "mark_only_adapters_as_trainable",
    "mark_only_lora_as_trainable",
    "named_loras",
    "per_sample",
    "register_kind",
    "register_rule",
    "remove",
    "save_adapter",
]
