"""``python -m klora_core``: the K-LoRA command line (see :mod:`klora_core.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
