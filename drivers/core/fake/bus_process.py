"""A multi-bus servo fake run as its own process (what a cell's driver talks to), both sides.

The child (``serve``): symlinks with fixed names in a link dir point at the fake's ptys, so a cell
names stable paths; an optional Unix socket (0600) takes fault-injection commands as JSON lines
(one object in, one reply out; a bad command gets an error reply and the fake stays up); one JSON
line ``{"ready": true, "ports": ...}`` on stdout says it is serving; SIGTERM/SIGINT end it and
remove the links and the socket.

The parent (``FakeProcess``): starts the child, waits for its ready line with a deadline, and calls
the control socket with a timeout. Tests and benches use it; production code never imports it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

CONTROL_TIMEOUT_S = 5.0


class BusFake(Protocol):
    def command(self, msg: dict[str, Any]) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class FakeProcess:
    """``python -m MODULE --link-dir DIR --control DIR/<control_name>`` as a child, with a client."""

    def __init__(self, module: str, label: str, link_dir: Path, control_name: str, *extra: str,
                 ready_timeout_s: float = 10.0):
        self.label = label
        self.link_dir = Path(link_dir)
        self.control = self.link_dir / control_name
        self._sock: socket.socket | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--link-dir", str(link_dir),
                                      "--control", str(self.control), *extra], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self._ready_line(ready_timeout_s)
        if not line:
            self.close()
            raise RuntimeError(f"the {label} fake did not start within {ready_timeout_s} s")
        self.ports: dict[str, str] = json.loads(line)["ports"]

    def _ready_line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout_s
        while (remaining := end - time.monotonic()) > 0 and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                return self.proc.stdout.readline()  # the child writes the whole line at once
        return ""

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(CONTROL_TIMEOUT_S)
            self._sock.connect(str(self.control))
            self._file = self._sock.makefile("rwb")
        self._file.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self._file.flush()
        reply = json.loads(self._file.readline())
        if not reply.pop("ok"):
            raise RuntimeError(f"{self.label} fake: {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "FakeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(fake: BusFake, ports: dict[str, str], link_dir: Path, link_prefix: str, control: Path | None,
          label: str) -> int:
    """The child's main loop: links, control socket, ready line, serve until SIGTERM/SIGINT."""
    link_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, port in ports.items():
        link = link_dir / f"{link_prefix}{name}"
        link.unlink(missing_ok=True)
        link.symlink_to(port)
        links[name] = str(link)
    done = threading.Event()
    server = _serve_control(fake, control, done, label) if control is not None else None
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(json.dumps({"ready": True, "ports": links, "control": str(control) if control else None}), flush=True)
    while not done.wait(0.5):
        pass
    if server is not None:
        server.close()
        control.unlink(missing_ok=True)
    fake.stop()
    for link in links.values():
        Path(link).unlink(missing_ok=True)
    return 0


def _serve_control(fake: BusFake, path: Path, done: threading.Event, label: str) -> socket.socket:
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(4)
    server.settimeout(0.2)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = {"ok": True, **fake.command(json.loads(line))}
                except Exception as exc:  # noqa: BLE001 (a bad command gets an error reply, the fake stays up)
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                f.write((json.dumps(reply) + "\n").encode())
                f.flush()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, name=f"{label}-fake-control", daemon=True).start()
    return server
