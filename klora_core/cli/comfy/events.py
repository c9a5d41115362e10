# SPDX-License-Identifier: GPL-3.0-or-later
"""ComfyUI's websocket (``/ws``): the progress events of a running workflow.

A minimal RFC 6455 client (:class:`_WebSocket`, standard library only) and a
background reader (:class:`EventStream`) that decodes each text message as
JSON (``{"type": "progress", "data": {"value", "max", "node"}}`` and the
like) into a queue.  Only used against the loopback server that
:mod:`klora_core.cli.comfy.server` started.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import socket
import threading
import urllib.parse


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
