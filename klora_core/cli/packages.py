# SPDX-License-Identifier: GPL-3.0-or-later
"""The Python packages the command line needs, and one message when one is missing.

Every subcommand (``map``, ``inspect``, ``run``) needs torch, numpy,
safetensors and Pillow: the scoring and the demo files are torch tensors,
``safetensors.torch`` reads and writes them (and imports numpy), Pillow draws
the maps and the contact sheet.  ComfyUI's own python has all four.  Asking
for them before the command starts gives one message for a missing package,
whichever subcommand and whichever line of code would have imported it first
(before, ``map`` said "unexpected ModuleNotFoundError: No module named
'numpy'" where ``inspect`` said "the 'safetensors' package is required").
``--help`` needs none of them.
"""
from __future__ import annotations

import importlib
import warnings

#: import name -> pip name, in the order the message lists them.
PACKAGES = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "PIL": "Pillow"}


def missing_packages() -> list:
    """pip names of the :data:`PACKAGES` that cannot be imported here (an import that fails counts)."""
    missing = []
    for module, pip_name in PACKAGES.items():
        with warnings.catch_warnings():  # torch warns "Failed to initialize NumPy" without numpy
            warnings.simplefilter("ignore")
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(pip_name)
    return missing


def missing_message(command: str, missing) -> str:
    """The one line shown when ``missing`` (pip names) are not installed for ``command``."""
    needed = ", ".join(PACKAGES.values())
    return (f"'{command}' needs the Python packages {needed}; missing here: {', '.join(missing)}. "
            f"Run it with ComfyUI's python (it has them all) or install them: pip install {' '.join(missing)}")


def package_of(exc: ImportError):
    """The pip name of the :data:`PACKAGES` entry ``exc`` failed to import, else None."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    return PACKAGES.get(top)
