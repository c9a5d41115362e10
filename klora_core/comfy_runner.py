"""``python -m klora_core run``: render with K-LoRA through a real ComfyUI server.

This module starts ComfyUI as a subprocess (``python main.py ...``) with this
node pack installed as a custom node, posts a workflow to its HTTP API
(``POST /prompt``), follows the run (websocket ``/ws`` for step progress,
``GET /history/<id>`` for the result) and copies what ComfyUI saved
(``GET /view``) to an output folder.  Sampling, model loading and decoding
are ComfyUI's own; nothing is re-implemented here.

Without model arguments it generates the seeded demo models of
:mod:`klora_core.demo_models` (an SD1.5-detectable UNet, a CLIP-L text
encoder, a TAESD-layout VAE and a subject/style LoRA pair) into a cache
folder and uses the cached ComfyUI 0.3.75 of ``scripts/setup_comfyui_env.sh``.

No ComfyUI import: only the standard library, torch/safetensors (to write the
demo models) and Pillow (loaded lazily to draw the ``--grid`` contact sheet;
it ships with every ComfyUI).  Every network request goes to the loopback
server this module started (or to ``--comfyui``'s server on 127.0.0.1);
proxies from the environment are ignored.

:class:`ComfyUIServer` is also what the server tests use
(``tests/server_harness.py``).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional

from .errors import KLoRAError

log = logging.getLogger(__name__)

#: Repository root = the node pack folder ComfyUI loads (holds __init__.py and nodes/).
PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "klora-fusion"
#: ComfyUI model folder types this runner manages, in extra_model_paths.yaml names.
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")

DEFAULT_READY_TIMEOUT = 180.0
DEFAULT_PROMPT_TIMEOUT = 1800.0


class ServerError(KLoRAError):
    """The ComfyUI server could not be started, reached, or it reported a failure."""


class PromptRejected(ServerError):
    """``POST /prompt`` failed validation; ``node_errors`` is ComfyUI's per-node error dict."""

    def __init__(self, message: str, node_errors: dict, error: dict):
        super().__init__(message)
        self.node_errors = node_errors
        self.error = error


class ExecutionFailed(ServerError):
    """A node raised while the prompt ran; ``details`` is ComfyUI's execution_error message."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


# --------------------------------------------------------------------------- helpers

def env_dir() -> Path:
    """The cached environment folder of scripts/setup_comfyui_env.sh."""
    return Path(os.environ.get("KLORA_ENV_DIR") or Path.home() / ".cache" / "klora-comfyui").expanduser()


def find_comfy_root(explicit: Optional[str] = None) -> Path:
    """``explicit``, else ``$COMFYUI_PATH``, else the cached ComfyUI of scripts/setup_comfyui_env.sh."""
    if explicit:
        root, source = Path(explicit).expanduser(), f"--comfyui {explicit}"
    elif os.environ.get("COMFYUI_PATH"):
        root, source = Path(os.environ["COMFYUI_PATH"]).expanduser(), "COMFYUI_PATH"
    else:
        marker = env_dir() / "comfyui_path"
        if not marker.is_file():
            raise KLoRAError(f"no ComfyUI found: {marker} does not exist; run scripts/setup_comfyui_env.sh "
                             "or pass --comfyui PATH")
        root, source = Path(marker.read_text().strip()).expanduser(), str(marker)
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise KLoRAError(f"{root} (from {source}) is not a ComfyUI folder (no main.py / comfy/)")
    return root.resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar (same escapes).
    return json.dumps(text)


def _link_or_copy(src: Path, dst: Path) -> None:
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


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- websocket

class _WebSocket:
    """A minimal RFC 6455 client: enough to read ComfyUI's ``/ws`` progress messages."""

    _GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("websocket closed during the handshake")
            buf += chunk
            if len(buf) > 65536:
                raise OSError("websocket handshake too long")
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise OSError(f"websocket upgrade refused: {lines[0]}")
        accept = base64.b64encode(hashlib.sha1(key + self._GUID).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if headers.get("sec-websocket-accept") != accept:
            raise OSError("websocket handshake: bad Sec-WebSocket-Accept")
        self.sock.settimeout(None)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self):
        """Next complete message ``(opcode, payload)``; None when the server closes."""
        fragments, first_opcode = [], None
        while True:
            b0, b1 = self._read(2)
            fin, opcode = b0 & 0x80, b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                return None
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode != 0x0:
                first_opcode, fragments = opcode, []
            fragments.append(payload)
            if fin:
                return first_opcode, b"".join(fragments)

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class EventStream:
    """Background reader of the server's websocket; ``events`` is a queue of decoded JSON messages."""

    def __init__(self, host: str, port: int, client_id: str):
        self.events: "queue.Queue" = queue.Queue()
        self._ws = _WebSocket(host, port, f"/ws?clientId={urllib.parse.quote(client_id)}")
        self._thread = threading.Thread(target=self._loop, name="klora-comfy-ws", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                message = self._ws.recv()
                if message is None:
                    return
                opcode, payload = message
                if opcode == 0x1:
                    try:
                        self.events.put(json.loads(payload.decode("utf-8")))
                    except ValueError:
                        continue
        except OSError:
            return

    def close(self) -> None:
        self._ws.close()
        self._thread.join(timeout=2)


# --------------------------------------------------------------------------- the server

class ComfyUIServer:
    """A real ComfyUI server in a subprocess, on 127.0.0.1, with this node pack installed.

    Everything it writes lives in ``workdir``: ``user/`` (with
    ``default/comfy.settings.json`` marking the tutorial done), ``output/``,
    ``temp/``, ``input/``, ``custom_nodes/`` (a link ``klora-fusion`` to this
    repository, unless ComfyUI's own custom_nodes already holds this same
    folder), ``models/<type>/`` for the types in :data:`MODEL_FOLDERS`, the
    ``extra_model_paths.yaml`` that registers them and ``server.log``.
    ``extra_model_dirs`` adds more folders per type.

    Use as a context manager; the process is always stopped (SIGINT, then
    terminate, then kill, each bounded).
    """

    def __init__(self, comfy_root, workdir, python: Optional[str] = None, port: Optional[int] = None,
                 cpu: Optional[bool] = None, extra_model_dirs: Optional[dict] = None,
                 install_pack: bool = True, env: Optional[dict] = None, extra_args=(),
                 ready_timeout: float = DEFAULT_READY_TIMEOUT):
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
        self.client_id = uuid.uuid4().hex
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self.pack_link: Optional[Path] = None
        self.notes: list = []

    # folders -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_dir(self, folder_type: str) -> Path:
        return self.workdir / "models" / folder_type

    @property
    def loras_dir(self) -> Path:
        return self.model_dir("loras")

    @property
    def unet_dir(self) -> Path:
        return self.model_dir("diffusion_models")

    @property
    def clip_dir(self) -> Path:
        return self.model_dir("text_encoders")

    @property
    def vae_dir(self) -> Path:
        return self.model_dir("vae")

    @property
    def checkpoints_dir(self) -> Path:
        return self.model_dir("checkpoints")

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def user_dir(self) -> Path:
        return self.workdir / "user"

    @property
    def temp_dir(self) -> Path:
        # ComfyUI appends "temp" to --temp-directory (main.start_comfyui).
        return self.workdir / "tmp" / "temp"

    @property
    def input_dir(self) -> Path:
        return self.workdir / "input"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

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
        _link_or_copy(PACK_ROOT, self.pack_link)

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
                return _one_line(ln, 300)
        return _one_line(lines[-1], 300) if lines else "no output"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

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

    # HTTP ---------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        return _NO_PROXY_OPENER.open(req, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30.0):
        with self._request("GET", path, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def get_bytes(self, path: str, timeout: float = 60.0) -> bytes:
        with self._request("GET", path, timeout=timeout) as resp:
            return resp.read()

    def post_json(self, path: str, body, timeout: float = 30.0):
        with self._request("POST", path, body, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw.decode("utf-8")) if raw.strip() else None

    def object_info(self, node_class: Optional[str] = None) -> dict:
        path = "/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else "")
        return self.get_json(path, timeout=60)

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def post_prompt(self, graph: dict) -> str:
        """Queue ``graph`` (API format); returns the prompt id; PromptRejected on validation failure."""
        try:
            reply = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id}, timeout=60)
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read().decode("utf-8"))
            except ValueError:
                payload = {}
            error = payload.get("error") or {}
            node_errors = payload.get("node_errors") or {}
            raise PromptRejected(describe_rejection(error, node_errors, graph), node_errors, error) from None
        except OSError as exc:
            raise ServerError(f"cannot reach ComfyUI at {self.url}: {exc}") from None
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = DEFAULT_PROMPT_TIMEOUT,
             on_event: Optional[Callable[[dict], None]] = None, events: Optional[EventStream] = None,
             poll_s: float = 0.1) -> dict:
        """Block until ``prompt_id`` finished; return its history entry.

        Raises ExecutionFailed (with ComfyUI's exception message, node type and
        id) when a node failed or the run was interrupted, ServerError when the
        server died or ``timeout`` passed.  ``events`` (an EventStream) feeds
        ``on_event`` with websocket messages while waiting.
        """
        deadline = time.monotonic() + timeout
        while True:
            if events is not None and on_event is not None:
                try:
                    while True:
                        on_event(events.events.get_nowait())
                except queue.Empty:
                    pass
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited (status {self.proc.returncode}) while running the workflow: "
                                  f"{self._log_tail_line()}")
            try:
                entry = self.history(prompt_id)
            except (OSError, ValueError) as exc:
                raise ServerError(f"cannot read /history from {self.url}: {exc}") from None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    break
            if time.monotonic() > deadline:
                raise ServerError(f"the workflow did not finish within {timeout:.0f} s")
            time.sleep(poll_s)
        if events is not None and on_event is not None:
            try:
                while True:
                    on_event(events.events.get_nowait())
            except queue.Empty:
                pass
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or not status.get("completed", True):
            for kind, data in status.get("messages") or []:
                if kind == "execution_error":
                    node = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
                    raise ExecutionFailed(f"{node} failed: {_one_line(data.get('exception_message', ''), 600)}", data)
                if kind == "execution_interrupted":
                    raise ExecutionFailed("the workflow was interrupted", data)
            raise ExecutionFailed(f"the workflow failed: {_one_line(json.dumps(status), 600)}", status)
        return entry

    def open_events(self) -> Optional[EventStream]:
        """A websocket event stream for this server's client id, or None when it cannot connect."""
        try:
            return EventStream("127.0.0.1", self.port, self.client_id)
        except OSError as exc:
            log.info("no websocket progress (%s); polling /history only", exc)
            return None

    def fetch_output(self, item: dict) -> bytes:
        """Bytes of one saved file listed in a history entry (``{"filename", "subfolder", "type"}``)."""
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        return self.get_bytes(f"/view?{query}")


def describe_rejection(error: dict, node_errors: dict, graph: Optional[dict] = None) -> str:
    """One line from ComfyUI's ``/prompt`` validation failure."""
    parts = []
    for node_id, info in (node_errors or {}).items():
        class_type = info.get("class_type") or (graph or {}).get(node_id, {}).get("class_type", "?")
        for err in info.get("errors") or []:
            details = err.get("details") or ""
            # "lora_name: 'x' not in ['a', 'b', ...]": keep the value, shorten the list.
            details = re.sub(r"not in \[(.{120}).*\]$", r"not in [\1 ...]", details)
            parts.append(f"{class_type} (node {node_id}): {err.get('message', '')}"
                         + (f": {details}" if details else ""))
    head = error.get("message") or "ComfyUI rejected the workflow"
    if error.get("details") and not parts:
        head += f": {error['details']}"
    return _one_line(head + ("; " + "; ".join(parts) if parts else ""), 700)


# --------------------------------------------------------------------------- progress

class Progress:
    """tqdm-style text progress on stderr from the server's websocket events."""

    def __init__(self, labels: dict, stream=None, width: int = 28):
        self.labels = labels
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.prefix = ""
        self.node = None
        self._last_fraction = -1.0
        self._open_line = False

    def start(self, prefix: str) -> None:
        self.prefix = prefix
        self.node = None
        self._last_fraction = -1.0
        self._write(f"{prefix} queued", final=not self.tty)

    def _write(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "executing" and data.get("node") is not None:
            self.node = str(data["node"])
            self._last_fraction = -1.0
            if self.tty:
                self._write(f"{self.prefix} {self.labels.get(self.node, self.node)}")
        elif kind == "progress":
            value, maximum = int(data.get("value", 0)), max(1, int(data.get("max", 1)))
            node = str(data.get("node", self.node))
            fraction = min(1.0, value / maximum)
            filled = int(round(self.width * fraction))
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"{self.prefix} {self.labels.get(node, node)} |{bar}| {value}/{maximum} {100 * fraction:3.0f}%"
            if self.tty:
                self._write(text)
            elif fraction >= 1.0 or fraction - self._last_fraction >= 0.25:
                self._write(text, final=True)
                self._last_fraction = fraction

    def done(self, text: str) -> None:
        self._write(f"{self.prefix} {text}", final=True)


# --------------------------------------------------------------------------- workflow

#: Node ids of the workflow (API format), kept stable so reports and tests can find nodes.
IDS = {
    "model": "1", "clip": "2", "vae": "3", "subject": "4", "style": "5", "fuse": "6", "positive": "7",
    "negative": "8", "latent": "9", "sampler": "10", "decode": "11", "save": "12", "map": "13",
}

SCOPE_CHOICES = {"attention": "attention projections", "all": "all shared weights"}
MEASURE_CHOICES = {"noise": "noise level", "steps": "step count"}


def build_workflow(opts, names: dict, seed: int, alpha: float, beta: float, prefix: str) -> dict:
    """The API-format workflow: loaders -> Load Subject/Style LoRA -> K-LoRA Fuse -> KSampler -> decode -> save.

    ``names``: ComfyUI file names, keys ``checkpoint`` or ``unet``/``clip``/``vae``,
    plus ``subject`` and ``style``.
    """
    g = {}
    i = IDS
    if names.get("checkpoint"):
        g[i["model"]] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}}
        model, clip, vae = [i["model"], 0], [i["model"], 1], [i["model"], 2]
    else:
        g[i["model"]] = {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}}
        g[i["clip"]] = {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}}
        g[i["vae"]] = {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}}
        model, clip, vae = [i["model"], 0], [i["clip"], 0], [i["vae"], 0]
    g[i["subject"]] = {"class_type": "KLoRASubjectLoader", "inputs": {
        "lora_name": names["subject"], "strength": opts.subject_strength, "clip": clip, "strength_clip": 1.0}}
    g[i["style"]] = {"class_type": "KLoRAStyleLoader", "inputs": {
        "lora_name": names["style"], "strength": opts.style_strength, "clip": [i["subject"], 1], "strength_clip": 1.0}}
    g[i["fuse"]] = {"class_type": "KLoRAFuse", "inputs": {
        "model": model, "subject": [i["subject"], 0], "style": [i["style"], 0], "pattern": opts.pattern,
        "alpha": float(alpha), "beta": float(beta), "scope": SCOPE_CHOICES[opts.scope],
        "outside_scope": opts.outside_scope, "progress_measure": MEASURE_CHOICES[opts.progress_measure],
        "map_steps": max(1, min(150, opts.steps))}}
    g[i["positive"]] = {"class_type": "CLIPTextEncode", "inputs": {"text": opts.prompt, "clip": [i["style"], 1]}}
    g[i["negative"]] = {"class_type": "CLIPTextEncode", "inputs": {"text": opts.negative, "clip": [i["style"], 1]}}
    g[i["latent"]] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": opts.width, "height": opts.height, "batch_size": 1}}
    g[i["sampler"]] = {"class_type": "KSampler", "inputs": {
        "model": [i["fuse"], 0], "seed": int(seed), "steps": opts.steps, "cfg": opts.cfg,
        "sampler_name": opts.sampler, "scheduler": opts.scheduler, "positive": [i["positive"], 0],
        "negative": [i["negative"], 0], "latent_image": [i["latent"], 0], "denoise": 1.0}}
    g[i["decode"]] = {"class_type": "VAEDecode", "inputs": {"samples": [i["sampler"], 0], "vae": vae}}
    g[i["save"]] = {"class_type": "SaveImage", "inputs": {"images": [i["decode"], 0], "filename_prefix": prefix}}
    g[i["map"]] = {"class_type": "SaveImage", "inputs": {"images": [i["fuse"], 2],
                                                          "filename_prefix": prefix + "_selection_map"}}
    return g


NODE_LABELS = {
    IDS["model"]: "load model", IDS["clip"]: "load text encoder", IDS["vae"]: "load VAE",
    IDS["subject"]: "Load Subject LoRA", IDS["style"]: "Load Style LoRA", IDS["fuse"]: "K-LoRA Fuse (scoring)",
    IDS["positive"]: "encode prompt", IDS["negative"]: "encode negative", IDS["latent"]: "empty latent",
    IDS["sampler"]: "KSampler", IDS["decode"]: "VAE decode", IDS["save"]: "save image", IDS["map"]: "save map",
}


# --------------------------------------------------------------------------- command line

def _float_list(text: str) -> list:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _int_range(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


RUN_EPILOG = """\
examples:
  %(prog)s                                   # demo models (generated, cached), 1 image
  %(prog)s --steps 4 --out /tmp/klora        # quicker
  %(prog)s --grid 1.0,1.5,2.0 0.3,0.5,0.7    # contact sheet over alpha x beta
  %(prog)s --comfyui ~/ComfyUI --checkpoint v1-5-pruned-emaonly.safetensors \\
      --subject my_dog.safetensors --style watercolor.safetensors \\
      --prompt "a photo of sks dog, watercolor painting" --seed 1 --seed 2 --steps 30

Without --checkpoint, a seeded demo UNet (SD1.5-detectable), CLIP-L text
encoder, TAESD-layout VAE and subject/style LoRA pair are generated into
$KLORA_DEMO_MODELS (default ~/.cache/klora-comfyui/demo-models) once and
reused; their weights are random, so the image is textured noise: the run
shows the whole pipeline working, not a picture.  With --checkpoint you must
give --subject and --style as well.

A file argument that exists on disk is linked into a temporary model folder;
any other value is a name from that ComfyUI's own models folders.

The run starts ComfyUI (python main.py from --comfyui) on a free 127.0.0.1
port with this pack installed as custom node 'klora-fusion', posts the
workflow to its HTTP API and stops it afterwards.  Outputs in --out:
klora_seed<SEED>.png, selection_map.png, report.txt (K-LoRA's report: gamma,
which LoRA each weight takes at the first and last step), workflow_api.json
(load it in ComfyUI) and comfyui.log; with --grid also
grid_seed<SEED>.png and grid/<cell>.png.
Exit status: 0 ok, 1 failure (one line on stderr), 2 bad usage."""


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand on ``subparsers`` (klora_core.cli)."""
    r = subparsers.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="render with K-LoRA through a real ComfyUI server (demo models, or your own)",
        description="Start ComfyUI with this pack, run loaders -> Load Subject/Style LoRA -> K-LoRA Fuse -> "
                    "KSampler -> VAE decode -> save, and copy the image, the selection map and the report.",
        epilog=RUN_EPILOG)
    where = r.add_argument_group("ComfyUI")
    where.add_argument("--comfyui", metavar="PATH", default=None,
                       help="ComfyUI folder to run (default: $COMFYUI_PATH, else the cached ComfyUI of "
                            "scripts/setup_comfyui_env.sh)")
    where.add_argument("--python", metavar="EXE", default=None,
                       help="python that runs ComfyUI (default: this python)")
    where.add_argument("--cpu", action="store_true",
                       help="force ComfyUI onto the CPU (default: CPU only when torch sees no GPU)")
    where.add_argument("--port", type=_int_range(1, 65535, "--port"), default=None,
                       help="port on 127.0.0.1 (default: a free one)")
    where.add_argument("--threads", type=_int_range(1, 1024, "--threads"), default=None, metavar="N",
                       help="CPU threads for ComfyUI's torch (sets OMP_NUM_THREADS; default: torch's choice). On the "
                            "CPU the server also gets OMP_WAIT_POLICY=PASSIVE unless it is set")
    where.add_argument("--timeout", type=_finite, default=DEFAULT_PROMPT_TIMEOUT, metavar="S",
                       help="give up on one image after S seconds (default %(default)g)")
    models = r.add_argument_group("models")
    models.add_argument("--checkpoint", metavar="NAME_OR_PATH", default=None,
                        help="checkpoint for CheckpointLoaderSimple (default: the generated demo UNet, CLIP-L "
                             "and VAE through UNETLoader, CLIPLoader and VAELoader)")
    models.add_argument("--subject", metavar="NAME_OR_PATH", default=None,
                        help="subject LoRA (default: the generated demo subject LoRA)")
    models.add_argument("--style", metavar="NAME_OR_PATH", default=None,
                        help="style LoRA (default: the generated demo style LoRA)")
    models.add_argument("--subject-strength", type=_finite, default=1.0, metavar="X",
                        help="strength of the subject delta whenever it is chosen (default 1)")
    models.add_argument("--style-strength", type=_finite, default=1.0, metavar="X",
                        help="strength of the style delta whenever it is chosen (default 1)")
    models.add_argument("--demo-seed", type=int, default=None, metavar="N",
                        help="seed of the generated demo models (default 2025)")
    sampling = r.add_argument_group("sampling")
    sampling.add_argument("--prompt", default="a photo of sks dog, watercolor painting",
                          help="positive prompt (default: %(default)r)")
    sampling.add_argument("--negative", default="blurry, low quality", help="negative prompt (default: %(default)r)")
    sampling.add_argument("--seed", type=int, action="append", default=None, metavar="N",
                          help="noise seed; repeat for several images (default 0)")
    sampling.add_argument("--steps", type=_int_range(1, 150, "--steps"), default=20,
                          help="sampling steps, 1-150 (default 20)")
    sampling.add_argument("--cfg", type=_finite, default=7.0, help="classifier-free guidance scale (default 7)")
    sampling.add_argument("--sampler", default="euler", help="KSampler sampler_name (default euler)")
    sampling.add_argument("--scheduler", default="normal", help="KSampler scheduler (default normal)")
    sampling.add_argument("--width", type=_int_range(64, 8192, "--width"), default=None,
                          help="image width, multiple of 8 (default 128 for the demo models, 512 otherwise)")
    sampling.add_argument("--height", type=_int_range(64, 8192, "--height"), default=None,
                          help="image height, multiple of 8 (same default)")
    klora = r.add_argument_group("K-LoRA")
    klora.add_argument("--pattern", choices=["s", "s*"], default="s",
                       help="style-factor schedule: s = alpha*p + beta (paper), s* = (alpha*p + beta) mod alpha "
                            "(supplement; FLUX) (default s)")
    klora.add_argument("--alpha", type=_finite, default=1.5, help="schedule slope, 0-10 (default 1.5)")
    klora.add_argument("--beta", type=_finite, default=-1.0,
                       help="schedule offset, 0-10; -1 = the pattern's default, 0.5 for s, 1.275 for s* (default -1)")
    klora.add_argument("--scope", choices=sorted(SCOPE_CHOICES), default="attention",
                       help="weights K-LoRA switches: attention projections (paper) or all shared weights "
                            "(default attention)")
    klora.add_argument("--outside-scope", choices=["both", "subject", "style", "none"], default="both",
                       help="shared weights outside the scope get both LoRAs, one, or none (default both)")
    klora.add_argument("--progress-measure", choices=sorted(MEASURE_CHOICES), default="noise",
                       help="sampling progress p from the noise level or by counting steps (default noise)")
    klora.add_argument("--grid", nargs=2, type=_float_list, metavar=("ALPHAS", "BETAS"), default=None,
                       help="render every alpha x beta combination (comma-separated lists, e.g. "
                            "--grid 1.0,1.5,2.0 0.3,0.5,0.7) and draw one labelled contact sheet per seed")
    out = r.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="demo-output", help="output folder (default demo-output)")
    out.add_argument("--keep-temp", action="store_true",
                     help="keep ComfyUI's temporary folders (models, outputs, log) and print where")
    out.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    r.set_defaults(func=run_command)
    return r


def _check_options(args) -> None:
    if (args.subject is None) != (args.style is None):
        raise KLoRAError("give both --subject and --style, or neither for the demo LoRA pair")
    if args.checkpoint and args.subject is None:
        raise KLoRAError("with --checkpoint give --subject and --style too: the demo LoRAs only fit the demo UNet")
    args.width = args.width or (512 if args.checkpoint else 128)
    args.height = args.height or (512 if args.checkpoint else 128)
    for name in ("width", "height"):
        if getattr(args, name) % 8:
            raise KLoRAError(f"--{name} must be a multiple of 8, got {getattr(args, name)}")
    alphas = args.grid[0] if args.grid else [args.alpha]
    betas = args.grid[1] if args.grid else [args.beta]
    for a in alphas:
        if not 0.0 <= a <= 10.0:
            raise KLoRAError(f"alpha must be between 0 and 10, got {a:g}")
    for b in betas:
        if not (b == -1.0 or 0.0 <= b <= 10.0):
            raise KLoRAError(f"beta must be between 0 and 10 (or -1 for the pattern default), got {b:g}")
    if args.grid and len(alphas) * len(betas) > 64:
        raise KLoRAError(f"--grid asks for {len(alphas) * len(betas)} images; at most 64")
    if args.timeout <= 0:
        raise KLoRAError("--timeout must be positive")
    args.seeds = args.seed or [0]


def _stage_file(value: str, folder: Path, role: str, taken: set) -> str:
    """A file that exists is linked into ``folder``; returns the ComfyUI name to use."""
    path = Path(value).expanduser()
    if not path.is_file():
        if os.sep in value or (os.altsep and os.altsep in value):
            if not path.exists():
                raise KLoRAError(f"{role}: {value}: no such file")
            raise KLoRAError(f"{role}: {value}: not a file")
        return value  # a name from ComfyUI's own model folders
    name = path.name
    if name in taken:
        name = f"{role}/{path.name}"
    taken.add(name)
    _link_or_copy(path.resolve(), folder / name)
    return name.replace(os.sep, "/")


def _server_uses_cpu(args) -> bool:
    if args.cpu:
        return True
    if args.python and Path(args.python).resolve() != Path(sys.executable).resolve():
        probe = ("import torch,sys; ok = torch.cuda.is_available() or "
                 "(hasattr(torch.backends,'mps') and torch.backends.mps.is_available()); sys.exit(0 if ok else 3)")
        try:
            return subprocess.run([args.python, "-c", probe], capture_output=True, timeout=120).returncode != 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KLoRAError(f"--python {args.python}: cannot run it ({exc})") from None
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _fmt(x: float) -> str:
    return f"{x:g}"


def _save_first(server: ComfyUIServer, entry: dict, node_id: str, dest: Path) -> Path:
    images = ((entry.get("outputs") or {}).get(node_id) or {}).get("images") or []
    if not images:
        raise ServerError(f"ComfyUI saved no image for node {node_id}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(server.fetch_output(images[0]))
    return dest


def _report_text(entry: dict) -> str:
    text = ((entry.get("outputs") or {}).get(IDS["fuse"]) or {}).get("text") or []
    return "\n".join(str(t) for t in text) if isinstance(text, list) else str(text)


def contact_sheet(cells: dict, alphas: list, betas: list, title: str, path: Path, cell_px: int = 256) -> Path:
    """Draw ``cells[(alpha, beta)] = PNG path`` as a labelled grid (rows alpha, columns beta)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad, head_h, left_w, title_h = 8, 24, 92, 30
    first = Image.open(next(iter(cells.values())))
    scale = min(1.0, cell_px / max(first.size))
    cw, ch = max(1, int(first.size[0] * scale)), max(1, int(first.size[1] * scale))
    width = left_w + len(betas) * (cw + pad) + pad
    height = title_h + head_h + len(alphas) * (ch + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill=(25, 25, 25), font=font)
    for j, b in enumerate(betas):
        label = "beta default" if b == -1.0 else f"beta = {_fmt(b)}"
        draw.text((left_w + j * (cw + pad) + 4, title_h + 4), label, fill=(25, 25, 25), font=font)
    for i, a in enumerate(alphas):
        y = title_h + head_h + i * (ch + pad)
        draw.text((pad, y + ch // 2 - 8), f"alpha = {_fmt(a)}", fill=(25, 25, 25), font=font)
        for j, b in enumerate(betas):
            with Image.open(cells[(a, b)]) as im:
                im = im.convert("RGB").resize((cw, ch), Image.NEAREST if scale >= 1 else Image.BILINEAR)
                sheet.paste(im, (left_w + j * (cw + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def run_command(args) -> int:
    """Entry point of ``python -m klora_core run`` (see :data:`RUN_EPILOG`).

    Every failure surfaces as a KLoRAError (one line, exit status 1 in klora_core.cli).
    """
    try:
        return _run(args)
    except KLoRAError:
        raise
    except urllib.error.URLError as exc:
        raise ServerError(f"lost contact with ComfyUI: {exc.reason}") from None
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise KLoRAError(f"{where}{exc.strerror or exc}") from None


def _run(args) -> int:
    t_start = time.monotonic()
    _check_options(args)
    comfy_root = find_comfy_root(args.comfyui)
    out_dir = Path(args.out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KLoRAError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None

    def say(text: str) -> None:
        print(f"klora run: {text}", flush=True)

    cpu = _server_uses_cpu(args)
    env = dict(os.environ)
    if cpu:
        # OpenMP threads that spin while waiting slow CPU sampling down many times over
        # on a busy machine (measured 0.5 s -> 2.9 s per UNet call); passive waiting avoids it.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    workdir = Path(tempfile.mkdtemp(prefix="klora-run-"))
    server = ComfyUIServer(comfy_root, workdir, python=args.python, port=args.port, cpu=cpu, env=env)
    try:
        server.prepare()
        names = _stage_models(args, server, say)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    failed = True
    try:
        say(f"starting ComfyUI from {comfy_root} ({'CPU' if server.cpu else 'GPU'}) ...")
        t0 = time.monotonic()
        server.start()
        for note in server.notes:
            say(note)
        say(f"ComfyUI ready at {server.url} after {time.monotonic() - t0:.1f} s")
        events = server.open_events()
        try:
            written = _render(args, server, names, out_dir, events, say)
        finally:
            if events is not None:
                events.close()
        failed = False
    finally:
        server.stop()
        try:
            shutil.copyfile(server.log_path, out_dir / "comfyui.log")
        except OSError:
            pass
        if args.keep_temp or (failed and os.environ.get("KLORA_KEEP_FAILED")):
            say(f"kept ComfyUI's folders in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for path in written:
        say(f"wrote {path}")
    say(f"done in {time.monotonic() - t_start:.1f} s; open {out_dir}")
    return 0


def _stage_models(args, server: ComfyUIServer, say) -> dict:
    """Generate/link the demo models or the user's files into the server's model folders; ComfyUI names."""
    names: dict = {}
    taken: set = set()
    if args.checkpoint:
        names["checkpoint"] = _stage_file(args.checkpoint, server.checkpoints_dir, "checkpoint", set())
    else:
        from . import demo_models

        seed = demo_models.DEFAULT_SEED if args.demo_seed is None else args.demo_seed
        cache = demo_models.default_cache_dir()
        for kind, folder in (("unet", server.unet_dir), ("clip", server.clip_dir), ("vae", server.vae_dir)):
            path = demo_models.ensure_file(kind, cache, seed, notify=say)
            _link_or_copy(path, folder / path.name)
            names[kind] = path.name
    if args.subject is None:
        from . import demo_models

        seed = demo_models.DEFAULT_SEED if args.demo_seed is None else args.demo_seed
        for role in ("subject", "style"):
            path = demo_models.ensure_file(role, demo_models.default_cache_dir(), seed, notify=say)
            _link_or_copy(path, server.loras_dir / path.name)
            names[role] = path.name
    else:
        names["subject"] = _stage_file(args.subject, server.loras_dir, "subject", taken)
        names["style"] = _stage_file(args.style, server.loras_dir, "style", taken)
    return names


def _render(args, server: ComfyUIServer, names: dict, out_dir: Path, events, say) -> list:
    progress = Progress(NODE_LABELS)
    written = []
    alphas = args.grid[0] if args.grid else [args.alpha]
    betas = args.grid[1] if args.grid else [args.beta]
    jobs = [(seed, a, b) for seed in args.seeds for a in alphas for b in betas]
    graphs = []
    for n, (seed, a, b) in enumerate(jobs):
        prefix = f"klora/seed{seed}_alpha{_fmt(a)}_beta{_fmt(b)}"
        graph = build_workflow(args, names, seed, a, b, prefix)
        graphs.append(graph)
    (out_dir / "workflow_api.json").write_text(json.dumps(graphs[0], indent=2))
    written.append(out_dir / "workflow_api.json")
    reports = []
    cells: dict = {}
    first_entry = None
    for n, ((seed, a, b), graph) in enumerate(zip(jobs, graphs)):
        label = f"[{n + 1}/{len(jobs)}] seed {seed}" + (f" alpha {_fmt(a)} beta {_fmt(b)}" if args.grid else "")
        prompt_id = server.post_prompt(graph)
        progress.start(label)
        t0 = time.monotonic()
        entry = server.wait(prompt_id, timeout=args.timeout, on_event=progress, events=events)
        progress.done(f"done in {time.monotonic() - t0:.1f} s")
        first_entry = first_entry or entry
        report = _report_text(entry)
        if args.grid:
            stem = f"alpha{_fmt(a)}_beta{_fmt(b)}_seed{seed}"
            cells[(seed, a, b)] = _save_first(server, entry, IDS["save"], out_dir / "grid" / f"{stem}.png")
            _save_first(server, entry, IDS["map"], out_dir / "grid" / f"map_{stem}.png")
            if seed == args.seeds[0]:
                reports.append(f"== alpha {_fmt(a)}, beta {_fmt(b)} ==\n{report}")
        else:
            written.append(_save_first(server, entry, IDS["save"], out_dir / f"klora_seed{seed}.png"))
            if not reports:
                reports.append(report)
    written.append(_save_first(server, first_entry, IDS["map"], out_dir / "selection_map.png"))
    if args.grid:
        written.append(out_dir / "grid")
        for seed in args.seeds:
            title = (f"K-LoRA, pattern {args.pattern}, seed {seed}, {args.steps} steps: rows alpha, columns beta")
            sheet = contact_sheet({(a, b): cells[(seed, a, b)] for a in alphas for b in betas}, alphas, betas,
                                  title, out_dir / f"grid_seed{seed}.png")
            written.append(sheet)
    report_path = out_dir / "report.txt"
    report_path.write_text("\n\n".join(reports) + "\n")
    written.append(report_path)
    for line in reports[0].splitlines():
        if line.startswith("gamma") or "switch per step" in line:
            say(line)
    return written
