# SPDX-License-Identifier: GPL-3.0-or-later
"""The pack's socket types and menu category (ComfyUI V3 node API).

A loader's output carries a :class:`~.handles.LoRAHandle`; the socket type
says which role it holds, so a subject loader cannot be wired to the style
input of K-LoRA Fuse.  The type names are stored in every saved workflow:
never rename them.
"""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "loaders/K-LoRA"

SubjectLoRA = io.Custom("KLORA_SUBJECT")
StyleLoRA = io.Custom("KLORA_STYLE")
