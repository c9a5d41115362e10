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
        """Queue ``graph`` (API format); returns the prompt id; PromptRejected on validation failure.

        ComfyUI queues a graph when at least one of its outputs is valid, and
        only lists the invalid nodes in ``node_errors`` of its 200 answer (a
        misspelt sampler then runs the selection map but never the image).
        That is a rejection too: the prompt is taken off the queue and
        PromptRejected raised.
        """
        try:
            reply = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id}, timeout=60)
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read().decode("utf-8"))
            except ValueError:
                payload = {}
            error = payload.get("error") or {}
            node_errors = payload.get("node_errors") or {}
            raise PromptRejected(describe_rejection(error, node_errors, graph, self.allowed_values),
                                 node_errors, error) from None
        except OSError as exc:
            raise ServerError(f"cannot reach ComfyUI at {self.url}: {exc}") from None
        node_errors = reply.get("node_errors") or {}
        if node_errors:
            try:
                self.post_json("/queue", {"delete": [reply["prompt_id"]]})
            except (OSError, ValueError) as exc:
                log.info("could not take the rejected prompt off the queue: %s", exc)
            raise PromptRejected(describe_rejection({}, node_errors, graph, self.allowed_values), node_errors, {})
        return reply["prompt_id"]

    def allowed_values(self, class_type: str, input_name: str) -> Optional[list]:
        """The values a combo input of ``class_type`` accepts, from ``/object_info`` (None if unknown)."""
        try:
            info = self.object_info(class_type)[class_type]["input"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for section in ("required", "optional"):
            spec = (info.get(section) or {}).get(input_name)
            if spec is not None:
                return combo_choices(spec)
        return None

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


#: How many allowed values a rejection message lists before "... (N in all)".
MAX_CHOICES_SHOWN = 45


def combo_choices(spec) -> Optional[list]:
    """The allowed values of one ``/object_info`` input spec: ``[[...], {...}]`` (V1) or
    ``["COMBO", {"options": [...]}]`` (newer ComfyUI); None for other input types."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        return options if isinstance(options, list) else None
    return None


def _shown_choices(choices: list) -> str:
    shown = ", ".join(str(c) for c in choices[:MAX_CHOICES_SHOWN])
    return shown + (f", ... ({len(choices)} in all)" if len(choices) > MAX_CHOICES_SHOWN else "")


def _describe_node_error(class_type: str, node_id: str, err: dict, allowed) -> str:
    """``KSampler (node 10) input sampler_name = 'eulr': Value not in list; allowed: euler, ...``."""
    extra = err.get("extra_info") or {}
    message = err.get("message") or err.get("type") or "invalid"
    name = extra.get("input_name")
    if not name:
        details = err.get("details") or ""
        return f"{class_type} (node {node_id}): {message}" + (f": {details}" if details else "")
    text = f"{class_type} (node {node_id}) input {name}"
    if "received_value" in extra:
        text += f" = {extra['received_value']!r}"
    text += f": {message}"
    if err.get("type") == "custom_validation_failed" and err.get("details"):
        # The node's own words (e.g. K-LoRA's validate_inputs); ComfyUI writes "<input> - <reason>".
        text += f": {str(err['details']).split(' - ', 1)[-1]}"
    if err.get("type") == "value_not_in_list":
        config = extra.get("input_config")
        choices = combo_choices(config) if config else None  # ComfyUI leaves out lists over 20 entries
        if choices is None and allowed is not None:
            choices = allowed(class_type, name)
        if choices:
            text += f"; allowed: {_shown_choices(choices)}"
    return text


def describe_rejection(error: dict, node_errors: dict, graph: Optional[dict] = None,
                       allowed: Optional[Callable[[str, str], Optional[list]]] = None) -> str:
    """One line from ComfyUI's ``/prompt`` validation failure: per error the node type and id, the input,
    the value received and, for a value not in a list, the allowed values (``allowed(class_type, input)``
    supplies them when ComfyUI left a long list out)."""
    parts = []
    for node_id, info in (node_errors or {}).items():
        class_type = info.get("class_type") or (graph or {}).get(node_id, {}).get("class_type", "?")
        for err in info.get("errors") or []:
            parts.append(_describe_node_error(class_type, node_id, err, allowed))
    head = "ComfyUI rejected the workflow" if parts else (error.get("message") or "ComfyUI rejected the workflow")
    if error.get("details") and not parts:
        head += f": {error['details']}"
    return one_line(head + (": " + "; ".join(parts) if parts else ""), 1500)
