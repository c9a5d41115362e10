"""The typed handles the loader nodes output, and file identity (signature, content hash).

The file itself is read by :func:`klora_core.safe_load.load_tensors`, the
project's one LoRA reader (safe loaders only; the same reader serves the
preview route and the command line).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from ..klora_core.safe_load import load_tensors

logger = logging.getLogger(__name__)

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
    """Changes whenever the file is replaced or rewritten, even with its mtime set back (fingerprint_inputs)."""
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


def make_handle(role: str, name: str, path: str, strength: float) -> LoRAHandle:
    label = f"{role} LoRA '{name}'"
    state_dict = load_tensors(path, label)
    return LoRAHandle(role=role, name=name, path=path, sha256=content_sha256(path),
                      strength=float(strength), state_dict=state_dict)
