"""``python -m lora_inject``: the ``lora-inject`` command."""

import sys

from .cli import main

sys.exit(main())
