# SPDX-License-Identifier: GPL-3.0-or-later
"""Text progress of ``python -m klora_core run``, drawn from ComfyUI's websocket events.

On a terminal one line is redrawn in place (``\\r``): the node running and,
while a node reports steps, a bar ``|####----| value/max pct%``.  Elsewhere
(a log file, a pipe) a line is written when a run is queued, at every quarter
of a node's steps and when it is done.
"""
from __future__ import annotations

import sys


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
