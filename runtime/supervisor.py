"""Start a cell's processes, wait until each answers, and stop them cleanly.

Used by ``armada run``, the HIL tests and the benchmarks: the processes are the same ones
systemd runs in production (``armada driver|camera|infer CELL``), started as children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from runtime.config import DEFAULT_CELL, CellConfig, load_cell
from runtime.protocol import PROTOCOL_VERSION
from runtime.transport import CommandClient, FrameSubscriber, RemoteError

READY_TIMEOUT_S = 15.0
# The inference process may import torch and build the tiny bundle on first use.
INFER_READY_TIMEOUT_S = 90.0


def default_run_dir(cell_name: str) -> Path:
    """A short per-user folder for ipc sockets (ipc paths are limited to about 100 bytes)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"armada-{os.getuid()}" / cell_name


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class CellProcesses:
    cell_path: Path
    run_dir: Path
    cell: CellConfig = field(init=False)
    children: list[Child] = field(default_factory=list)
    ctx: zmq.Context = field(default_factory=zmq.Context)

    def __post_init__(self) -> None:
        self.cell_path = Path(self.cell_path)
        self.run_dir = Path(self.run_dir)
        self.cell = load_cell(self.cell_path, self.run_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)

    @classmethod
    def default(cls, run_dir: Path | None = None) -> "CellProcesses":
        return cls(DEFAULT_CELL, run_dir or default_run_dir("default"))

    # ------------------------------------------------------------------ starting

    def spawn(self, role: str, name: str | None = None) -> Child:
        args = [sys.executable, "-m", "runtime.cli", role, str(self.cell_path), "--run-dir", str(self.run_dir)]
        if name is not None:
            args += ["--name", name]
        label = name or role
        log_path = self.run_dir / "logs" / f"{label}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})
        child = Child(label, role, proc, log_path)
        self.children.append(child)
        return child

    def start_all(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        for d in self.cell.drivers:
            self.spawn("driver", d.name)
        for c in self.cell.cameras:
            self.spawn("camera", c.name)
        self.spawn("infer")
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for child in list(self.children):
            extra = INFER_READY_TIMEOUT_S - timeout_s if child.role == "infer" else 0.0
            self._wait_child(child, deadline + max(0.0, extra))

    def _wait_child(self, child: Child, deadline: float) -> None:
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.role} {child.name} exited with code {child.proc.returncode}:\n"
                                   f"{child.log_tail()}")
            if self._answers(child):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.role} {child.name} did not become ready in time:\n{child.log_tail()}")
            time.sleep(0.05)

    def _answers(self, child: Child) -> bool:
        if child.role == "camera":
            sub = FrameSubscriber(self.ctx, self.cell.camera(child.name).frames)
            try:
                return sub.recv(0.5) is not None
            finally:
                sub.close()
        endpoint = self.cell.inference.ctl if child.role == "infer" else self.cell.driver(child.name).cmd
        client = CommandClient(self.ctx, endpoint, default_timeout_s=0.3)
        try:
            client.request("hello", version=PROTOCOL_VERSION, role="supervisor")
            return True
        except (TimeoutError, RemoteError):
            return False
        finally:
            client.close()

    # ------------------------------------------------------------------ stopping

    def stop(self, timeout_s: float = 5.0) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=2.0)
        self.children.clear()

    def close(self) -> None:
        self.stop()
        self.ctx.destroy(linger=0)  # also closes sockets a caller forgot, so exit never hangs

    def __enter__(self) -> "CellProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)
