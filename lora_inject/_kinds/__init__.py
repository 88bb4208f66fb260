"""The built-in kinds of update besides LoRA, one module each; importing one registers it.

Each module defines its :class:`~lora_inject.kind.Kind` with peft 0.21's parameter names, init
and math, and registers it under its name: ``"loha"``, ``"lokr"``, ``"oft"``, ``"ia3"``,
``"vera"``; and ``"full"`` (a tensor trained whole, peft's ``modules_to_save``) and ``"tokens"``
(chosen rows trained whole, peft's ``trainable_token_indices``).
"""

from __future__ import annotations

from . import full, ia3, loha, lokr, oft, tokens, vera

del full, ia3, loha, lokr, oft, tokens, vera
