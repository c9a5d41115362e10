"""The real ComfyUI-GGUF node pack (city96, Apache-2.0) for tests, unpacked from the shared source tarball.

    reason = gguf_pack.unavailable_reason()     # None when the tarball and the ``gguf`` package are there
    gguf_pack.require()                         # pytest.fail under CI=true, pytest.skip otherwise
    mappings = gguf_pack.load_in_process()      # ComfyUI's own nodes.load_custom_node(); its node classes
    sd = gguf_pack.host_dequantized(path)       # the weights as ComfyUI-GGUF's layers compute with them
    gguf_pack.install_into(server_custom_nodes) # a link, for a ComfyServer's custom_nodes folder

Where the tarball is found (as scripts/setup_comfyui_env.sh finds ComfyUI 0.8.0's):
``KLORA_GGUF_TARBALL``; else ``<repo>/../shared/comfyui/``; else, in a git
worktree, ``<main checkout>/../shared/comfyui/``.  Its sha256 is checked
(the value in shared/comfyui/README.md) and it is unpacked once into the
test environment's cache (``$KLORA_ENV_DIR/custom_nodes-gguf-<sha>/``,
outside the repository).  ComfyUI-GGUF imports the PyPI ``gguf`` package
(requirements-test.txt).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from support import comfy_env
from klora_core.cli.comfy.server import env_dir  # noqa: E402  (comfy_env puts the repository on sys.path)

TARBALL_NAME = "ComfyUI-GGUF-795e451-src.tar.gz"
TARBALL_SHA256 = "5793b0b7e4d19e6f8e2a4516bfd127e7d3ccc7bac29ea1fed623cbad2e3e6a07"
#: Folder name inside the tarball (and under custom_nodes/).
PACK_DIR = "ComfyUI-GGUF"

_loaded: dict = {}


def _candidates() -> list:
    explicit = os.environ.get("KLORA_GGUF_TARBALL")
    if explicit:
        return [Path(explicit)]
    out = [comfy_env.REPO_ROOT.parent / "shared" / "comfyui" / TARBALL_NAME]
    try:  # a git worktree: shared/ sits beside the main checkout
        common = subprocess.run(["git", "-C", str(comfy_env.REPO_ROOT), "rev-parse", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        common = ""
    if common:
        main = (comfy_env.REPO_ROOT / common).resolve().parent
        out.append(main.parent / "shared" / "comfyui" / TARBALL_NAME)
    return out


def tarball() -> Path | None:
    return next((p for p in _candidates() if p.is_file()), None)


def unavailable_reason() -> str | None:
    """Why the real ComfyUI-GGUF cannot be used here (None when it can)."""
    if tarball() is None:
        return (f"ComfyUI-GGUF source {TARBALL_NAME} not found (looked at "
                f"{', '.join(str(p) for p in _candidates())}; set KLORA_GGUF_TARBALL)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the 'gguf' package (requirements-test.txt) is not installed in this environment"
    return None


def require() -> None:
    """Fail (under CI=true) or skip (elsewhere) with the reason when ComfyUI-GGUF is unavailable."""
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"GGUF tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def unpacked() -> Path:
    """The pack's folder (``.../ComfyUI-GGUF``), unpacked once from the verified tarball."""
    src = tarball()
    if src is None:
        raise FileNotFoundError(unavailable_reason())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise RuntimeError(f"{src}: sha256 {digest} is not the expected {TARBALL_SHA256}")
    root = env_dir() / f"custom_nodes-gguf-{digest[:12]}"
    pack = root / PACK_DIR
    if (pack / "__init__.py").is_file():
        return pack
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        with tarfile.open(src) as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            for m in members:  # plain files under the one top folder only
                if not (m.name == PACK_DIR or m.name.startswith(PACK_DIR + "/")) or ".." in m.name.split("/"):
                    raise RuntimeError(f"{src}: unexpected member {m.name!r}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links, devices, absolute paths
                tar.extractall(staging, members=members, filter="data")
            else:
                tar.extractall(staging, members=members)
        try:
            os.replace(staging / PACK_DIR, pack)
        except OSError:  # another process finished first
            if not (pack / "__init__.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pack


def load_in_process() -> dict:
    """Load ComfyUI-GGUF with ComfyUI's own custom-node loader (once per process); its node classes by id."""
    if not _loaded:
        comfy_env.setup_comfy()
        import nodes

        path = unpacked()
        if not asyncio.run(nodes.load_custom_node(str(path))):
            raise RuntimeError(f"ComfyUI could not load the custom node pack {path} (see the log above)")
        _loaded.update({k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if "GGUF" in k})
    return dict(_loaded)


def install_into(custom_nodes_dir) -> Path:
    """Link the unpacked pack into a ComfyUI ``custom_nodes`` folder (e.g. a ComfyServer's, before start)."""
    link = Path(custom_nodes_dir) / PACK_DIR
    if not link.exists():
        os.symlink(unpacked(), link, target_is_directory=True)
    return link


def host_dequantized(path) -> dict:
    """``{name: float32 tensor}`` of a GGUF file as ComfyUI-GGUF's layers compute with it at every forward:
    its loader function ``gguf_sd_loader`` and its ``dequantize_tensor`` with the layers' default dequant
    dtype (legacy quants multiply scale and value in float16 there, so this is not the gguf package's
    float32 dequantization bit for bit)."""
    import torch

    package = load_in_process()["UnetLoaderGGUF"].__module__.rsplit(".", 1)[0]
    loader, dequant = sys.modules[package + ".loader"], sys.modules[package + ".dequant"]
    out = {}
    for name, tensor in loader.gguf_sd_loader(str(path)).items():
        out[name] = dequant.dequantize_tensor(tensor, torch.float32).as_subclass(torch.Tensor).clone()
    return out
