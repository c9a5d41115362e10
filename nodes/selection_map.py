"""The selection map as a ComfyUI IMAGE and as a picture shown on the node (no custom JS needed)."""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace

import numpy as np
import torch

import folder_paths

from ..klora_core.weight_keys import display_key
from ..klora_core.render import render_selection_map

logger = logging.getLogger(__name__)


def display_plan(plan):
    """The plan with string keys (unit keys may be ``(name, offset)`` tuples)."""
    return replace(plan, details={display_key(k): v for k, v in plan.details.items()})


def pil_to_image_tensor(picture) -> torch.Tensor:
    """PIL RGB image -> ComfyUI IMAGE [1, H, W, 3] float32 in [0, 1]."""
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def selection_map_outputs(plan, steps: int):
    """``(IMAGE tensor, ui image entry or None)``; a 1x1 white image when there is no plan."""
    if plan is None:
        return torch.ones((1, 1, 1, 3), dtype=torch.float32), None
    picture = render_selection_map(display_plan(plan), int(steps))
    image = pil_to_image_tensor(picture)
    try:
        temp_dir = folder_paths.get_temp_directory()
        os.makedirs(temp_dir, exist_ok=True)
        filename = f"klora_map_{uuid.uuid4().hex[:12]}.png"
        picture.save(os.path.join(temp_dir, filename))
        return image, {"filename": filename, "subfolder": "", "type": "temp"}
    except OSError as exc:  # the picture on the node is a convenience; the IMAGE output still works
        logger.warning("K-LoRA: could not save the selection map preview: %s", exc)
        return image, None
