"""K-LoRA Fusion: a ComfyUI node pack (GPL-3.0-or-later).

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS,
NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY.  Registration is guarded so the
package (and ``klora_core``) can be imported where ComfyUI is absent, e.g. by
tools and tests.
"""
import logging

logger = logging.getLogger(__name__)

WEB_DIRECTORY = "./web"

try:
    import comfy.model_patcher  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
