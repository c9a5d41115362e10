"""K-LoRA Fusion: a ComfyUI node pack (GPL-3.0-or-later).

ComfyUI imports this folder as a package and reads ``comfy_entrypoint`` (the
V3 node API: ``nodes/extension.py``) and ``WEB_DIRECTORY``.  Registration is
guarded so the package (and ``klora_core``) can be imported where ComfyUI is
absent, e.g. by tools and tests.  No ``NODE_CLASS_MAPPINGS`` here: ComfyUI
would then load the pack as V1 and ignore the entry point.
"""
import logging

logger = logging.getLogger(__name__)

WEB_DIRECTORY = "./web"

try:
    import comfy.model_patcher  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    __all__ = ["WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
