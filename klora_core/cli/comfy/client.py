# SPDX-License-Identifier: GPL-3.0-or-later
"""HTTP client of a ComfyUI server's API, and the errors it reports.

:class:`ComfyClient` queues an API-format workflow (``POST /prompt``), waits
for it (``GET /history/<id>``, with the websocket progress events of
:mod:`klora_core.cli.comfy.events` passed to a callback meanwhile) and fetches
what ComfyUI saved (``GET /view``).  Every request goes to
``http://127.0.0.1:<port>``, without the proxies of the environment.
:class:`klora_core.cli.comfy.server.ComfyUIServer` is this client plus the server
process.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Callable, Optional

from .events import EventStream
from ...errors import KLoRAError

log = logging.getLogger(__name__)

#: Seconds one workflow may run before :meth:`ComfyClient.wait` gives up.
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


# The server is on the loopback interface: a proxy from the environment must never see its traffic.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its whitespace runs collapsed to one space, cut to ``limit`` characters (ends "...")."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _deliver_queued(events: Optional[EventStream], on_event: Optional[Callable[[dict], None]]) -> None:
    """Pass every websocket event queued so far to ``on_event`` (nothing unless both are given)."""
    if events is None or on_event is None:
        return
    try:
        while True:
            on_event(events.events.get_nowait())
    except queue.Empty:
        pass


class ComfyClient:
    """The HTTP API of the ComfyUI server on ``127.0.0.1:port`` (``port`` is None until it is known).

    ``client_id`` tags every queued prompt, so the server sends that prompt's
    websocket events to this client.  A subclass that owns the server process
    overrides :meth:`_raise_if_gone` so :meth:`wait` fails fast when it died.
    """

    def __init__(self, port: Optional[int] = None):
        self.port = port
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _raise_if_gone(self) -> None:
        """Raise ServerError when the server is known to be gone (here: never known)."""

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
            _deliver_queued(events, on_event)
            self._raise_if_gone()
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
        _deliver_queued(events, on_event)
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or not status.get("completed", True):
            for kind, data in status.get("messages") or []:
                if kind == "execution_error":
                    node = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
                    raise ExecutionFailed(f"{node} failed: {one_line(data.get('exception_message', ''), 600)}", data)
                if kind == "execution_interrupted":
                    raise ExecutionFailed("the workflow was interrupted", data)
            raise ExecutionFailed(f"the workflow failed: {one_line(json.dumps(status), 600)}", status)
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
    return one_line(head + ("; " + "; ".join(parts) if parts else ""), 700)

