# SPDX-License-Identifier: GPL-3.0-or-later
"""Registration with ComfyUI's V3 node API: the extension and its ``comfy_entrypoint``.

ComfyUI's custom-node loader calls ``comfy_entrypoint()`` of the pack's
``__init__.py`` and registers every node of ``get_node_list()`` under its
schema's node id.  A module that also exported ``NODE_CLASS_MAPPINGS`` would
be loaded as V1 instead (the loader checks that first), so the pack exports
none.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .fuse_node import KLoRAFuse
from .lora_loaders import KLoRAStyleLoader, KLoRASubjectLoader

#: The pack's nodes, in menu order.
NODES = (KLoRASubjectLoader, KLoRAStyleLoader, KLoRAFuse)


class KLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> KLoRAExtension:
    return KLoRAExtension()
