"""The demo LoRA pair as files for ``map``/``inspect`` without SUBJECT and STYLE.

It is the same pair ``python -m klora_core run`` (``bash scripts/demo.sh``)
renders with: :func:`klora_core.cli.demo_models.make_lora_pair`, kohya names
for the 24 attention projections of the demo UNet (SD1.5 layout, 320
channels, context 768), subject rank 8, style rank 4.  One demo pair
everywhere: the README's selection map, ``map``, ``inspect`` and the demo
render show the same weights and the same gamma (tests/test_readme.py).
"""
from __future__ import annotations

import os
from typing import Union

from .demo_models import DEFAULT_SEED, make_lora_pair

__all__ = ["DEFAULT_SEED", "SUBJECT_FILE", "STYLE_FILE", "save_demo_pair"]

SUBJECT_FILE = "demo_subject.safetensors"
STYLE_FILE = "demo_style.safetensors"


def save_demo_pair(folder: Union[str, os.PathLike], seed: int = DEFAULT_SEED) -> tuple:
    """Write the demo pair as ``demo_subject.safetensors`` / ``demo_style.safetensors`` in ``folder``.

    Returns the two paths.  The folder is created if needed.
    """
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    subject, style = make_lora_pair(seed)
    paths = []
    for sd, fname, role in ((subject, SUBJECT_FILE, "subject"), (style, STYLE_FILE, "style")):
        path = os.path.join(folder, fname)
        save_file(sd, path, metadata={"klora_demo": role, "klora_demo_seed": str(int(seed)),
                                      "ss_network_module": "networks.lora"})
        paths.append(path)
    return tuple(paths)
