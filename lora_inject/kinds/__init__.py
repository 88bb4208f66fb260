"""The built-in kinds of update besides LoRA, one module each; importing one registers it.

Each module defines its :class:`~lora_inject.kind.Kind` with peft 0.21's parameter names, init
and math, and registers it under its name: ``"loha"``, ``"lokr"``, ``"oft"``, ``"ia3"``,
``"vera"``.
"""

from __future__ import annotations

from . import ia3, loha, lokr, oft, vera

__all__: list[str] = []

del ia3, loha, lokr, oft, vera
