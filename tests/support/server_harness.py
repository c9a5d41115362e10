"""A real ComfyUI server for tests: ``ComfyServer`` (a context manager).

    with ComfyServer() as server:
        detectable_models.write_all(server)
        prompt_id = server.post_prompt(graph)      # PromptRejected(.node_errors) on validation failure
        entry = server.wait(prompt_id, timeout=60) # ExecutionFailed(.details) when a node raised
        server.object_info(); server.interrupt(); server.log_text()

It is :class:`klora_core.cli.comfy.server.ComfyUIServer` (the same code
``python -m klora_core run`` uses) with test defaults:

- ComfyUI from ``comfy_env.find_comfy_root()`` (``COMFYUI_PATH`` or the
  cached 0.3.75 of scripts/setup_comfyui_env.sh), started with this test
  run's python (the venv's) as
  ``python main.py --cpu --listen 127.0.0.1 --port <free> --disable-auto-launch
  --disable-api-nodes --user-directory D --output-directory O --temp-directory T
  --input-directory I --extra-model-paths-config F`` (plus
  ``--database-url sqlite:///:memory:`` where supported);
- a fresh temporary folder per server holding D, O, T, I, ``server.log``,
  ``custom_nodes/klora-fusion`` (a symlink to this repository, registered
  through the ``custom_nodes:`` entry of F, which ComfyUI 0.3.75's
  ``utils.extra_config.load_extra_path_config`` adds to
  ``folder_paths``' ``custom_nodes`` list), ``models/{checkpoints,
  diffusion_models, text_encoders, vae, loras}`` (``unet``/``clip`` are
  ComfyUI's legacy names of the same folders) and
  ``user/default/comfy.settings.json`` = ``{"Comfy.TutorialCompleted": true}``;
- torch threads from ``KLORA_TEST_THREADS`` (default 1, see conftest.py),
  passed as ``OMP_NUM_THREADS``;
- startup bounded (``ready_timeout``, default 120 s), stop bounded (SIGINT,
  terminate, kill), the folder removed afterwards unless
  ``KLORA_KEEP_SERVER_DIR=1``.

Only 127.0.0.1 is contacted, without proxies.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from support import comfy_env

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from klora_core.cli.comfy.server import (  # noqa: E402
    ComfyUIServer,
    ExecutionFailed,
    PromptRejected,
    ServerError,
)

__all__ = ["ComfyServer", "ExecutionFailed", "PromptRejected", "ServerError"]


class ComfyServer(ComfyUIServer):
    """The real ComfyUI server with this pack installed, in a temporary folder (see module docstring)."""

    def __init__(self, workdir=None, comfy_root=None, python=None, threads=None, ready_timeout: float = 120.0,
                 extra_args=()):
        self._own_workdir = workdir is None
        workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="klora-server-"))
        n = str(threads or os.environ.get("KLORA_TEST_THREADS", "1"))
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        # Never let a proxy setting reach the server (it only talks to itself).
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(var, None)
        super().__init__(comfy_root or comfy_env.find_comfy_root(), workdir, python=python or sys.executable,
                         cpu=True, env=env, extra_args=extra_args, ready_timeout=ready_timeout)
        self.prepare()

    def wait(self, prompt_id: str, timeout: float = 120.0, **kwargs) -> dict:  # noqa: D102 - see base class
        return super().wait(prompt_id, timeout=timeout, **kwargs)

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        """``post_prompt`` + ``wait``: the history entry of a finished graph."""
        return self.wait(self.post_prompt(graph), timeout=timeout)

    def output_file(self, entry: dict, node_id: str, kind: str = "images") -> Path:
        """Path of the first file a saving node (``SaveImage``: "images", ``SaveLatent``: "latents") wrote."""
        items = (entry.get("outputs") or {}).get(str(node_id), {}).get(kind) or []
        if not items:
            raise AssertionError(f"node {node_id} saved no {kind}: {entry.get('outputs')}")
        item = items[0]
        base = self.output_dir if item.get("type", "output") == "output" else self.temp_dir
        return base / item.get("subfolder", "") / item["filename"]

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._own_workdir and not os.environ.get("KLORA_KEEP_SERVER_DIR"):
                shutil.rmtree(self.workdir, ignore_errors=True)
