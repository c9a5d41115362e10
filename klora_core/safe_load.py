# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading a LoRA file that nobody vouched for: safe loaders only, every tensor checked.

The one reader of LoRA files in this project: the loader nodes, the
``/klora/preview`` route and the command line all call :func:`load_tensors`,
so they accept the same files and refuse the others with the same words.
No ComfyUI import.

Policy (the file's extension decides the loader; nothing else is ever tried):

- ``.safetensors`` / ``.sft``: ``safetensors.torch.load_file``, which parses
  a JSON header and copies raw numbers; it cannot run code.  A pickle saved
  under such a name is recognised by its first bytes and refused unread.
- ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.pkl`` / ``.pickle``:
  ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors
  and plain containers and refuses every other object (so no embedded code
  runs).  A ``{"state_dict": {...}}`` wrapper is unwrapped.
- anything else: refused.

Then every entry must be a named, dense, real, finite floating-point tensor
(an integer scalar is allowed: some trainers store alpha that way), not empty,
and an ``.alpha`` must be one number.  Every problem is a
:class:`~klora_core.errors.KLoRAError` that names the file and says what to do.
"""
from __future__ import annotations

import os
import re

import torch

from .errors import KLoRAError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
#: Read with ``torch.load(weights_only=True)`` (ComfyUI lists .pt, .pth, .ckpt, .bin and .pkl as LoRAs).
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
#: First bytes of a torch zip archive and of a raw pickle (protocol 2 and later start with PROTO, 0x80).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def load_tensors(path, label: str = "LoRA") -> dict:
    """``{tensor name: tensor}`` (CPU) of the LoRA file at ``path``, read safely and checked.

    ``label`` says which file this is to the user (``"subject LoRA 'dog.safetensors'"``);
    every message starts with it and names ``path``.  See the module docstring for the policy.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise KLoRAError(f"{label}: '{path}' is a folder, not a LoRA file")
    if not os.path.isfile(path):
        raise KLoRAError(f"{label}: file not found: {path}")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        state_dict = _load_safetensors(path, label)
    elif lower.endswith(PICKLE_SUFFIXES):
        state_dict = _load_weights_only(path, label)
    else:
        raise KLoRAError(f"{label}: '{path}' has an unknown extension; expected {', '.join(SAFETENSORS_SUFFIXES)} "
                         f"(or {', '.join(PICKLE_SUFFIXES)}, read with torch's weights-only loader)")
    check_tensors(state_dict, path, label)
    return state_dict


def _load_safetensors(path: str, label: str) -> dict:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError...
        failure = exc
    # Only a file safetensors refuses is looked at further: a valid file's first bytes are its header
    # length, which can begin with the same byte as a pickle (0x80 for any length of 128 mod 256).
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise KLoRAError(f"{label}: '{path}' cannot be read ({exc.strerror or exc})") from None
    if head.startswith(_PICKLE_MAGIC):
        raise KLoRAError(f"{label}: '{path}' is a PyTorch pickle checkpoint named like a safetensors file; it was "
                         "not loaded. Rename it to .pt (read with torch's weights-only loader) or convert it to "
                         ".safetensors")
    text = str(failure).strip()
    detail = text.splitlines()[0][:200] if text else type(failure).__name__
    raise KLoRAError(f"{label}: '{path}' is not a valid safetensors file ({detail}); it may be truncated or "
                     "corrupt: download or copy it again") from None


def _load_weights_only(path: str, label: str) -> dict:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KLoRAError(
            f"{label}: '{path}' could not be loaded safely ({_unpickling_reason(exc)}). "
            "Pickle files are only read with torch weights_only=True, which refuses embedded code; "
            "convert the file to .safetensors"
        ) from None
    return loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded


def _unpickling_reason(exc: Exception) -> str:
    """One line saying why torch refused a file.  Its own message spans lines and suggests
    ``weights_only=False`` (which would run the file's code): only the refusal itself is kept."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refusal = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\n|$)", text)
    detail = refusal.group(1) if refusal else next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__


def check_tensors(state_dict, path: str, label: str) -> None:
    """KLoRAError naming ``path`` unless ``state_dict`` holds only usable LoRA tensors (see module docstring)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise KLoRAError(f"{label}: '{path}' holds no tensors")
    for name, tensor in state_dict.items():
        if not isinstance(name, str):  # a pickle can use any key; every later step expects names
            raise KLoRAError(f"{label}: '{path}' has an entry named by a {type(name).__name__}, not a text name; "
                             "it is not a LoRA file")
        shown = repr(name) if len(name) <= 200 else repr(name[:200]) + "..."
        if not isinstance(tensor, torch.Tensor):
            raise KLoRAError(f"{label}: '{path}' entry {shown} is a {type(tensor).__name__}, not a tensor")
        _check_tensor_kind(tensor, path, label, shown)
        if tensor.numel() == 0:  # a rank-0 factor would divide alpha by zero further on
            raise KLoRAError(f"{label}: '{path}' tensor {shown} is empty (shape {tuple(tensor.shape)}); "
                             "the file is damaged or not a LoRA")
        if name.endswith(".alpha") and tensor.numel() != 1:
            raise KLoRAError(f"{label}: '{path}' tensor {shown} should hold one number (the LoRA alpha) but has "
                             f"shape {tuple(tensor.shape)}; the file is damaged")
        if tensor.is_floating_point() and not _all_finite(tensor, path, label, shown):
            raise KLoRAError(f"{label}: '{path}' tensor {shown} contains NaN or infinite values; the file is damaged")


def _check_tensor_kind(tensor: torch.Tensor, path: str, label: str, shown: str) -> None:
    """LoRA tensors are dense real floating-point tensors (integer scalars allowed, e.g. an alpha)."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        kind = "quantized" if tensor.is_quantized else str(tensor.layout).replace("torch.", "")
        raise KLoRAError(f"{label}: '{path}' tensor {shown} is a {kind} tensor; LoRA weights are "
                         "plain dense tensors: the file is damaged or not a LoRA")
    scalar_int = tensor.numel() <= 1 and not tensor.is_complex() and tensor.dtype != torch.bool
    if not tensor.is_floating_point() and not scalar_int:
        raise KLoRAError(f"{label}: '{path}' tensor {shown} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                         "LoRA weights are floating-point numbers: the file is damaged or not a LoRA")


def _all_finite(tensor: torch.Tensor, path: str, label: str, shown: str) -> bool:
    try:
        return bool(torch.isfinite(tensor).all())
    except (RuntimeError, NotImplementedError, TypeError):  # e.g. float8_e4m3fn has no isfinite kernel
        pass
    try:
        return bool(torch.isfinite(tensor.to(torch.float32)).all())
    except (RuntimeError, NotImplementedError, TypeError):
        raise KLoRAError(f"{label}: '{path}' tensor {shown} has dtype {str(tensor.dtype).replace('torch.', '')}, "
                         "which cannot be read as numbers here; save the LoRA as float16, bfloat16 or float32"
                         ) from None
