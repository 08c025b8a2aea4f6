"""What `armada doctor` may read of the machine, in one object the tests replace.

Every probe goes through a ``Host``: files under ``root`` (a fake /sys and /dev in tests),
commands through ``run`` (fake chronyc / ip output), limits through ``getrlimit``, the user's
groups through ``groups``, TCP through ``connect``. Nothing here writes to a device or moves
anything; every command and connection has a timeout.
"""

from __future__ import annotations

import grp
import os
import resource
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

COMMAND_TIMEOUT_S = 2.0


class CommandMissing(Exception):
    """The program is not installed here."""


def run_command(argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """stdout of ``argv``; CommandMissing when it is not installed, RuntimeError when it fails or
    runs past ``timeout_s`` (a hung chronyd or ip must not hang the doctor)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise CommandMissing(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} did not answer within {timeout_s:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}")
    return done.stdout


def user_groups() -> set[str]:
    """Names of this process's groups (primary and supplementary)."""
    names = set()
    for gid in {os.getegid(), *os.getgroups()}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.add(str(gid))
    return names


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def connect_tcp(host: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout_s)


def resolve(name: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str | None:
    """The IPv4/IPv6 address of ``name``, or None when it does not resolve in ``timeout_s``
    (getaddrinfo has no timeout of its own: it runs in a thread the doctor stops waiting for)."""
    import threading

    found: list[str] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError:
            pass

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return found[0] if found else None


def is_local_address(address: str) -> bool:
    """Whether ``address`` belongs to this machine: binding a UDP socket to it succeeds only then."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def measure_clock(probe: Any, curve: Any, timeout_s: float) -> Any:
    """Another host's wall-clock offset through one of the cell's processes there (a ClockProbe):
    a driver's ping and state, or the wall clock a camera's clock endpoint or the inference process
    answers a ping with; a ClockSample. Bounded by ``timeout_s`` per wait; TimeoutError when nothing
    answers."""
    import zmq

    from armada.runtime.remote.clock import measure_driver_clock, measure_pinged_clock

    ctx = zmq.Context()
    try:
        if probe.kind == "driver":
            return measure_driver_clock(ctx, probe.endpoints[0], probe.endpoints[1], curve, timeout_s=timeout_s)
        return measure_pinged_clock(ctx, probe.endpoints[0], curve, timeout_s=timeout_s)
    finally:
        ctx.destroy(linger=0)


@dataclass
class Host:
    root: Path = Path("/")
    run: Callable[[list[str], float], str] = run_command
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    groups: Callable[[], set[str]] = user_groups
    group_name: Callable[[int], str] = group_name
    connect: Callable[[str, int, float], socket.socket] = connect_tcp
    access: Callable[[Path, int], bool] = os.access
    resolve: Callable[[str], str | None] = resolve
    is_local: Callable[[str], bool] = is_local_address
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    now: Callable[[], float] = time.time
    measure_clock: Callable[[Any, Any, float], Any] = measure_clock

    def path(self, absolute: str | Path) -> Path:
        """``absolute`` (a /dev or /sys path) under this host's root."""
        p = Path(absolute)
        return self.root / p.relative_to("/") if p.is_absolute() else p
