# SPDX-License-Identifier: GPL-3.0-or-later
"""A real ComfyUI server in a subprocess, with this node pack installed.

:class:`ComfyUIServer` prepares a working folder (models, outputs, settings,
``extra_model_paths.yaml``, a link to this pack under ``custom_nodes/``),
starts ComfyUI as ``python main.py ...`` on 127.0.0.1, waits until it
answers, and stops it (bounded); its HTTP API is
:class:`klora_core.cli.comfy.client.ComfyClient`'s.  It is what ``python -m
klora_core run`` (:mod:`klora_core.cli.run_command`) renders through, and what the
server tests use (``tests/server_harness.py``).

This is the only module of the pack that starts processes: ComfyUI itself,
and (:func:`server_uses_cpu`) a probe of another python's torch.  No ComfyUI
import: only the standard library (torch only to probe this python's GPU).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .client import (
    DEFAULT_PROMPT_TIMEOUT,
    ComfyClient,
    ExecutionFailed,
    PromptRejected,
    ServerError,
    describe_rejection,
    one_line,
)
from .events import EventStream
from ...errors import KLoRAError

# The names server tests and the run command import from here (the errors live in comfy_client).
__all__ = [
    "ComfyUIServer", "ServerError", "PromptRejected", "ExecutionFailed", "EventStream", "describe_rejection",
    "DEFAULT_PROMPT_TIMEOUT", "DEFAULT_READY_TIMEOUT", "MODEL_FOLDERS", "PACK_ROOT", "env_dir",
    "cached_comfy_dir", "find_comfy_root", "free_port", "link_or_copy", "server_uses_cpu",
]

log = logging.getLogger(__name__)

#: Repository root = the node pack folder ComfyUI loads (holds __init__.py and nodes/).
PACK_ROOT = Path(__file__).resolve().parents[3]
PACK_DIR_NAME = "klora-fusion"
#: ComfyUI model folder types this runner manages, in extra_model_paths.yaml names.
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")

#: Seconds ComfyUI may take to answer after it was started.
DEFAULT_READY_TIMEOUT = 180.0
#: ComfyUI version of the default cached environment of scripts/setup_comfyui_env.sh (its
#: ``--comfyui`` default); ``KLORA_COMFYUI_VERSION`` picks another cached version.
DEFAULT_CACHED_COMFYUI = "0.3.75"


# --------------------------------------------------------------------------- helpers

def env_dir() -> Path:
    """The cached environment folder of scripts/setup_comfyui_env.sh."""
    return Path(os.environ.get("KLORA_ENV_DIR") or Path.home() / ".cache" / "klora-comfyui").expanduser()


def cached_comfy_version() -> str:
    """Which cached ComfyUI of scripts/setup_comfyui_env.sh is meant: ``$KLORA_COMFYUI_VERSION``, else 0.3.75."""
    return os.environ.get("KLORA_COMFYUI_VERSION") or DEFAULT_CACHED_COMFYUI


def cached_comfy_dir(version: Optional[str] = None) -> Path:
    """Folder of the cached ComfyUI ``version`` (default :func:`cached_comfy_version`): the default
    version lives in :func:`env_dir` itself, any other in ``env_dir()/comfyui-<version>`` (each with
    its own ``venv/`` and the ``comfyui_path`` marker)."""
    version = version or cached_comfy_version()
    return env_dir() if version == DEFAULT_CACHED_COMFYUI else env_dir() / f"comfyui-{version}"


def find_comfy_root(explicit: Optional[str] = None) -> Path:
    """``explicit``, else ``$COMFYUI_PATH``, else the cached ComfyUI of scripts/setup_comfyui_env.sh
    (the version ``$KLORA_COMFYUI_VERSION`` names, default 0.3.75)."""
    if explicit:
        root, source = Path(explicit).expanduser(), f"--comfyui {explicit}"
    elif os.environ.get("COMFYUI_PATH"):
        root, source = Path(os.environ["COMFYUI_PATH"]).expanduser(), "COMFYUI_PATH"
    else:
        marker = cached_comfy_dir() / "comfyui_path"
        if not marker.is_file():
            raise KLoRAError(f"no ComfyUI {cached_comfy_version()} found: {marker} does not exist; run "
                             f"scripts/setup_comfyui_env.sh --comfyui {cached_comfy_version()} "
                             "or pass --comfyui PATH")
        root, source = Path(marker.read_text().strip()).expanduser(), str(marker)
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise KLoRAError(f"{root} (from {source}) is not a ComfyUI folder (no main.py / comfy/)")
    return root.resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar (same escapes).
    return json.dumps(text)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a symlink to ``src`` (replacing whatever is there); a copy where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".git", "demo-output"))
        else:
            shutil.copy2(src, dst)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server if the process that started it dies (a killed test run or CLI)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def server_uses_cpu(force_cpu: bool, python: Optional[str]) -> bool:
    """Whether ComfyUI will sample on the CPU: ``force_cpu`` (``--cpu``), else no CUDA/MPS device
    in the torch of ``python`` (``--python``; None = this python)."""
    if force_cpu:
        return True
    if python and Path(python).resolve() != Path(sys.executable).resolve():
        probe = ("import torch,sys; ok = torch.cuda.is_available() or "
                 "(hasattr(torch.backends,'mps') and torch.backends.mps.is_available()); sys.exit(0 if ok else 3)")
        try:
            return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode != 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KLoRAError(f"--python {python}: cannot run it ({exc})") from None
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _model_folder(folder_type: str) -> property:
    """A read-only :class:`ComfyUIServer` attribute: its ``models/<folder_type>`` folder."""
    return property(lambda self: self.model_dir(folder_type), doc=f"``workdir/models/{folder_type}``")


def _work_path(*parts: str) -> property:
    """A read-only :class:`ComfyUIServer` attribute: ``workdir/<parts>``."""
    return property(lambda self: self.workdir.joinpath(*parts), doc=f"``workdir/{'/'.join(parts)}``")


# --------------------------------------------------------------------------- the server

class ComfyUIServer(ComfyClient):
    """A real ComfyUI server in a subprocess, on 127.0.0.1, with this node pack installed.

    Everything it writes lives in ``workdir``: ``user/`` (with
    ``default/comfy.settings.json`` marking the tutorial done), ``output/``,
    ``temp/``, ``input/``, ``custom_nodes/`` (a link ``klora-fusion`` to this
    repository, unless ComfyUI's own custom_nodes already holds this same
    folder), ``models/<type>/`` for the types in :data:`MODEL_FOLDERS`, the
    ``extra_model_paths.yaml`` that registers them and ``server.log``.
    ``extra_model_dirs`` adds more folders per type.

    Use as a context manager; the process is always stopped (SIGINT, then
    terminate, then kill, each bounded).  The HTTP API (``post_prompt``,
    ``wait``, ``object_info`` ...) is :class:`~klora_core.cli.comfy.client.ComfyClient`'s.
    """

    def __init__(self, comfy_root, workdir, python: Optional[str] = None, port: Optional[int] = None,
                 cpu: Optional[bool] = None, extra_model_dirs: Optional[dict] = None,
                 install_pack: bool = True, env: Optional[dict] = None, extra_args=(),
                 ready_timeout: float = DEFAULT_READY_TIMEOUT):
        super().__init__()
        self.comfy_root = Path(comfy_root).resolve()
        self.workdir = Path(workdir).resolve()
        self.python = python or sys.executable
        self.requested_port = port
        self.cpu = cpu
        self.extra_model_dirs = {k: [str(Path(p).resolve()) for p in v] for k, v in (extra_model_dirs or {}).items()}
        self.install_pack = install_pack
        self.env = env
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self.pack_link: Optional[Path] = None
        self.notes: list = []

    # folders -------------------------------------------------------------
    def model_dir(self, folder_type: str) -> Path:
        return self.workdir / "models" / folder_type

    loras_dir = _model_folder("loras")
    unet_dir = _model_folder("diffusion_models")
    clip_dir = _model_folder("text_encoders")
    vae_dir = _model_folder("vae")
    checkpoints_dir = _model_folder("checkpoints")
    output_dir = _work_path("output")
    user_dir = _work_path("user")
    temp_dir = _work_path("tmp", "temp")  # ComfyUI appends "temp" to --temp-directory (main.start_comfyui).
    input_dir = _work_path("input")
    log_path = _work_path("server.log")

    def prepare(self) -> None:
        """Create the folders, the settings file, the pack link and extra_model_paths.yaml."""
        for d in (self.output_dir, self.user_dir / "default", self.workdir / "tmp", self.input_dir,
                  self.workdir / "custom_nodes"):
            d.mkdir(parents=True, exist_ok=True)
        for folder_type in MODEL_FOLDERS:
            self.model_dir(folder_type).mkdir(parents=True, exist_ok=True)
        settings = self.user_dir / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        if self.install_pack:
            self._install_pack()
        lines = ["klora_run:"]
        if self.install_pack:
            lines.append(f"  custom_nodes: {_yaml_str(str(self.workdir / 'custom_nodes'))}")
        for folder_type in MODEL_FOLDERS + tuple(k for k in self.extra_model_dirs if k not in MODEL_FOLDERS):
            paths = ([str(self.model_dir(folder_type))] if folder_type in MODEL_FOLDERS else [])
            paths += self.extra_model_dirs.get(folder_type, [])
            lines.append(f"  {folder_type}: {_yaml_str(chr(10).join(paths))}")
        (self.workdir / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def _install_pack(self) -> None:
        if not (PACK_ROOT / "__init__.py").is_file() or not (PACK_ROOT / "nodes").is_dir():
            raise ServerError(f"{PACK_ROOT} is not the K-LoRA node pack folder (no __init__.py / nodes/)")
        name = PACK_DIR_NAME
        own = self.comfy_root / "custom_nodes"
        if own.is_dir():
            for entry in own.iterdir():
                try:
                    same = entry.resolve() == PACK_ROOT
                except OSError:
                    same = False
                if same:
                    self.notes.append(f"ComfyUI already loads this pack from {entry}")
                    return
            if (own / name).exists():
                name = PACK_DIR_NAME + "-run"
                self.notes.append(f"{own / PACK_DIR_NAME} is another copy of the pack; this run's copy "
                                  f"({PACK_ROOT}) loads after it and its nodes take precedence")
        self.pack_link = self.workdir / "custom_nodes" / name
        link_or_copy(PACK_ROOT, self.pack_link)

    # process -------------------------------------------------------------
    def _supported_flags(self) -> str:
        try:
            return (self.comfy_root / "comfy" / "cli_args.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def command(self) -> list:
        flags = self._supported_flags()
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--user-directory", str(self.user_dir),
               "--output-directory", str(self.output_dir), "--temp-directory", str(self.workdir / "tmp"),
               "--input-directory", str(self.input_dir),
               "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml")]
        if self.cpu:
            cmd.append("--cpu")
        if "--disable-api-nodes" in flags:
            cmd.append("--disable-api-nodes")
        if "--database-url" in flags:
            # Keep ComfyUI's database out of its install folder (parallel servers, read-only installs).
            cmd += ["--database-url", "sqlite:///:memory:"]
        return cmd + self.extra_args

    def start(self) -> "ComfyUIServer":
        self.prepare()
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            self.port = self.requested_port or free_port()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except ServerError:
                in_use = "address already in use" in self.log_text().lower()
                self.stop()
                if not in_use or attempt == attempts - 1:
                    raise
                log.info("port %d was taken; retrying", self.port)
        return self

    def _spawn(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        self._log_file = open(self.log_path, "ab")
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
            if sys.platform.startswith("linux"):
                kwargs["preexec_fn"] = _die_with_parent
        log.debug("starting %s", " ".join(self.command()))
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_root), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, **kwargs)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited during startup (status {self.proc.returncode}): "
                                  f"{self._log_tail_line()} (log: {self.log_path})")
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (OSError, ServerError, ValueError):
                time.sleep(0.2)
        raise ServerError(f"ComfyUI did not answer on {self.url} within {self.ready_timeout:.0f} s "
                          f"(log: {self.log_path})")

    def _log_tail_line(self) -> str:
        lines = [ln for ln in self.log_text().splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "Error" in ln or "error" in ln:
                return one_line(ln, 300)
        return one_line(lines[-1], 300) if lines else "no output"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _raise_if_gone(self) -> None:
        """ServerError when the process exited (called by ``wait`` while a workflow runs)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"ComfyUI exited (status {self.proc.returncode}) while running the workflow: "
                              f"{self._log_tail_line()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                steps = []
                if os.name == "posix":
                    steps.append((lambda: proc.send_signal(signal.SIGINT), timeout * 0.6))
                steps += [(proc.terminate, timeout * 0.3), (proc.kill, timeout * 0.1 + 2)]
                for action, wait_s in steps:
                    try:
                        action()
                    except OSError:
                        pass
                    try:
                        proc.wait(timeout=wait_s)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> "ComfyUIServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
