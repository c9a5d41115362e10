"""``python -m klora_core``: the K-LoRA command line (see :mod:`klora_core.cli.main`)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
