"""Start the loopback UR controller in its own process and drive its fault-injection socket.

Used by the HIL tests and `armada bench ur3`. ur-rtde always uses ports 30003 and 30004, so each
fake gets its own loopback address (127.x.y.z; Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

UR_PORTS = (29999, 30003, 30004)
REPO_ROOT = Path(__file__).resolve().parents[3]


class FakeStartError(RuntimeError):
    pass


def free_loopback_host() -> str | None:
    """A 127.x.y.z address where the three fixed UR ports can be bound now, or None."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(20):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        socks = []
        try:
            for port in UR_PORTS:
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return host
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return None


class FakeUR:
    """One fake controller process on ``host``; ``cmd`` sends a fault-injection line."""

    def __init__(self, host: str, extra_args: list[str] | None = None, start_timeout_s: float = 10.0):
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "armada.drivers.ur3.fake.controller", "--host", host, *(extra_args or [])],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.close()
            raise FakeStartError(f"fake UR on {host} did not start: {line.strip()!r}")
        self.ports = json.loads(line[len("READY "):])
        self._ctl = socket.create_connection((host, self.ports["control"]), timeout=5)
        self._ctl_file = self._ctl.makefile("rwb")

    @classmethod
    def start_anywhere(cls, attempts: int = 3) -> "FakeUR":
        for _ in range(attempts):
            host = free_loopback_host()
            if host is None:
                break
            try:
                return cls(host)
            except FakeStartError:
                continue
        raise FakeStartError("no loopback address with 29999/30003/30004 free for a fake UR")

    def cmd(self, line: str) -> str:
        self._ctl_file.write(line.encode() + b"\n")
        self._ctl_file.flush()
        return self._ctl_file.readline().decode().strip()

    def state(self) -> dict:
        return json.loads(self.cmd("state"))

    def targets(self) -> list[list[float]]:
        """Every servoJ target received since the last call."""
        return json.loads(self.cmd("targets"))

    def cycles(self) -> list[list]:
        """What the control script saw in each controller cycle since the last call:
        [controller time s, command id, 1 if it took a fresh servoJ target, the servo target]."""
        return json.loads(self.cmd("cycles"))

    def close(self) -> None:
        try:
            self._ctl.close()
        except (OSError, AttributeError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "FakeUR":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
