"""ComfyUI glue for K-LoRA: node definitions, ModelPatcher integration, LoRA parsing.

Everything in this package may import ComfyUI; the algorithm lives in
``klora_core`` and never does.  The nodes use ComfyUI's V3 node API
(``nodes/extension.py``).  docs/architecture.md follows a LoRA file through
these modules, from reading it to restoring the weights after sampling.
"""
from .extension import comfy_entrypoint

try:  # /klora/preview HTTP route (nodes/routes.py): registers only inside a running ComfyUI server
    from . import routes  # noqa: F401
except Exception as _exc:  # pragma: no cover - the nodes must load even if the preview cannot
    import logging; logging.getLogger(__name__).warning("K-LoRA: preview route unavailable: %s", _exc)  # noqa: E702

__all__ = ["comfy_entrypoint"]
