"""ComfyUI glue for K-LoRA: node definitions, ModelPatcher integration, LoRA parsing.

Everything in this package may import ComfyUI; the algorithm lives in
``klora_core`` and never does.
"""
from .node_defs import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
