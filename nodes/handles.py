"""Reading LoRA files safely and the typed handles the loader nodes output.

Untrusted files are only ever read through safe loaders: safetensors, or
``torch.load(weights_only=True)`` for legacy ``.pt``/``.ckpt``/``.bin`` files
(which refuses pickled code).  Every problem becomes a :class:`KLoRAError` that
names the file and says what to do.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch

from ..klora_core.errors import KLoRAError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

SUBJECT = "subject"
STYLE = "style"

# Content hashes by (path, size, mtime_ns, ctime_ns, inode): avoids rehashing an unchanged file.  ctime is
# part of the key because mtime can be set back (os.utime, cp -p, rsync -t) after a same-size rewrite in
# place; ctime cannot be set by user code and changes on every write.
_HASH_MEMO: dict = {}
_HASH_MEMO_LIMIT = 256


@dataclass
class LoRAHandle:
    """A LoRA file chosen as subject or style (the value of a KLORA_SUBJECT / KLORA_STYLE socket).

    Attributes:
        role: "subject" or "style".
        name: the file name as listed in ComfyUI's loras folder.
        path: absolute path.
        sha256: hex digest of the file content (scores are cached by it).
        strength: multiplier of the diffusion-model delta (ComfyUI's convention:
            delta = strength * alpha / rank * up @ down).
        state_dict: the file's tensors, on the CPU.
    """

    role: str
    name: str
    path: str
    sha256: str
    strength: float
    state_dict: dict = field(repr=False)

    def label(self) -> str:
        return f"{self.role} LoRA '{self.name}'"


def file_signature(path: str) -> str:
    """Changes whenever the file is replaced or rewritten (for IS_CHANGED), even with its mtime set back."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def content_sha256(path: str) -> str:
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_HASH_MEMO) >= _HASH_MEMO_LIMIT:
            _HASH_MEMO.clear()
        _HASH_MEMO[memo_key] = digest
    return digest


def read_lora_file(path: str, label: str = "LoRA") -> dict:
    """Load a LoRA file's tensors safely and validate them.

    Returns ``{tensor_name: tensor}`` on the CPU.  Raises KLoRAError naming the
    file for: missing file, corrupt/truncated safetensors, a pickle that needs
    code to load (never executed), an empty file, non-tensor entries, NaN/Inf.
    """
    if not os.path.isfile(path):
        raise KLoRAError(f"{label}: file not found: {path}")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        import safetensors.torch

        try:
            state_dict = safetensors.torch.load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise KLoRAError(
                f"{label}: '{path}' is not a valid safetensors file ({exc}); it may be truncated or "
                "corrupt: download or copy it again"
            ) from None
    elif lower.endswith(PICKLE_SUFFIXES):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise KLoRAError(
                f"{label}: '{path}' could not be loaded safely ({type(exc).__name__}: {str(exc)[:200]}). "
                "Pickle files are only read with torch weights_only=True, which refuses embedded code; "
                "convert the file to .safetensors"
            ) from None
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    else:
        raise KLoRAError(f"{label}: '{path}' has an unknown extension; expected .safetensors (or .pt/.ckpt)")
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
        if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor, path, label, shown):
            raise KLoRAError(
                f"{label}: '{path}' tensor {shown} contains NaN or infinite values; the file is damaged"
            )
    return state_dict


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


def make_handle(role: str, name: str, path: str, strength: float) -> LoRAHandle:
    label = f"{role} LoRA '{name}'"
    state_dict = read_lora_file(path, label)
    return LoRAHandle(role=role, name=name, path=path, sha256=content_sha256(path),
                      strength=float(strength), state_dict=state_dict)
