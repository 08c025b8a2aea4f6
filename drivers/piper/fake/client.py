"""Start ``drivers.piper.fake.serve`` as a child process and talk to its control socket.

Used by the HIL tests and ``drivers.piper.bench``. Every wait has a deadline; ``close()`` always
reaps the child (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 5.0


def free_udp_port() -> int:
    """A UDP port nothing on this host is bound to now: a private port for one fake and its driver."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def random_group(rng: random.Random | None = None) -> str:
    """A random administratively scoped IPv4 multicast group (239.x.y.z)."""
    rng = rng or random.Random(os.getpid() ^ time.monotonic_ns())
    return f"239.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def can_env(port: int) -> dict[str, str]:
    """Environment that makes python-can's udp_multicast use ``port`` (for a driver child process)."""
    return os.environ | {"CAN_CONFIG": json.dumps({"port": port})}


class FakePiperProcess:
    """``python -m armada.drivers.piper.fake.serve`` on ``channels`` (udp_multicast on ``port``)."""

    def __init__(self, channels: list[str], port: int, *extra: str, timeout_s: float = START_TIMEOUT_S):
        self.channels, self.port = channels, port
        args = [sys.executable, "-m", "armada.drivers.piper.fake.serve", "--port", str(port)]
        for ch in channels:
            args += ["--channel", ch]
        # stderr goes to a file (a pipe nobody reads could fill and block the child), read on failure.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([*args, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err,
                                     stdin=subprocess.DEVNULL, text=True)
        self._ctl: socket.socket | None = None
        try:
            self.ready = self._wait_ready(timeout_s)
            self._ctl = socket.create_connection(("127.0.0.1", self.ready["control"]), timeout=CONTROL_TIMEOUT_S)
            self._file = self._ctl.makefile("rwb")
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            code = self.proc.poll()
            raise RuntimeError(f"fake PiPer on {self.channels} did not start within {timeout_s} s "
                               f"(exit code {code}, said {line.strip()!r}): {self.stderr_tail()}")
        return json.loads(line[len("READY "):])

    def stderr_tail(self, n: int = 2000) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")[-n:].strip()

    def cmd(self, line: str) -> str:
        """Send one control line; return the answer (raises RuntimeError on an ``error`` answer)."""
        assert self._ctl is not None
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        answer = self._file.readline().decode().strip()  # the socket's timeout bounds this
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"fake PiPer control {line!r}: {answer or 'connection closed'}")
        return answer

    def state(self, channel: str) -> dict:
        return json.loads(self.cmd(f"state {channel}"))

    def targets(self, channel: str, since_mono: float = 0.0) -> list[tuple[float, list[float]]]:
        return [tuple(t) for t in json.loads(self.cmd(f"targets {channel} {since_mono!r}"))]

    def kill(self) -> None:
        """SIGKILL: the arms fall silent at once, as if the cable came off."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)

    def close(self) -> None:
        if self._ctl is not None:
            try:
                self._ctl.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> "FakePiperProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
