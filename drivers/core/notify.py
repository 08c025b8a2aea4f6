"""sd_notify, our own: the datagrams a ``Type=notify`` systemd unit expects, and a watchdog pacer.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named
by ``$NOTIFY_SOCKET`` (a leading ``@`` means Linux's abstract namespace). We send ``READY=1`` once
the process serves, ``STATUS=...`` with its state, ``WATCHDOG=1`` from the loop whose liveness
matters (so a stuck loop, not a merely live process, trips ``WatchdogSec=``) and ``STOPPING=1`` on
the way out. Without ``$NOTIFY_SOCKET`` (a terminal, ``armada run``, the tests) nothing is sent.

Sending never blocks and never raises: the socket is non-blocking, and a datagram the service
manager cannot take now is dropped and counted. A control loop must not wait on systemd; a lost
``WATCHDOG=1`` is covered by the next one (we ping at half the watchdog interval).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("armada.notify")

# sd_notify's STATUS is free text; keep ours short enough for `systemctl status` to show on one line.
STATUS_MAX_CHARS = 200


def notify_address(value: str) -> str | bytes:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        # vsock: and relative paths are not used by systemd for services on the host.
        raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an abstract '@' name")
    return value


@dataclass
class Notifier:
    """Sends sd_notify datagrams to ``address``; with ``address`` None every call does nothing.

    ``watchdog_ns``: the interval between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None
    when the unit has no watchdog for us.
    """

    address: str | bytes | None = None
    watchdog_ns: int | None = None
    sent: int = 0
    dropped: int = 0
    _sock: socket.socket | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> "Notifier":
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (set by systemd): a watchdog
        meant for another pid (``WATCHDOG_PID``) is not ours; a malformed value is ignored, said once."""
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls()
        try:
            address = notify_address(raw)
        except ValueError as exc:
            log.warning("not notifying systemd: %s", exc)
            return cls()
        watchdog_ns = None
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        if usec:
            try:
                interval = int(usec)
                if interval <= 0 or (owner and int(owner) != pid):
                    raise ValueError
                watchdog_ns = interval * 1000 // 2
            except ValueError:
                log.warning("WATCHDOG_USEC=%r WATCHDOG_PID=%r: not a watchdog for this process (pid %d); "
                            "no WATCHDOG=1 pings", usec, owner, pid)
        return cls(address, watchdog_ns)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` fields; True if the service manager took it."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
        except OSError as exc:  # full queue (BlockingIOError), no listener, ...: never the caller's problem
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("sd_notify to %r failed (%d so far): %s", self.address, self.dropped, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WatchdogPacer:
    """Calls ``notifier.watchdog()`` at most once per interval, when ``tick`` is called from the loop.

    Cheap enough to call every control tick (one comparison); the loop that calls it is the one
    that must be alive. ``interval_ns`` overrides the notifier's (tests)."""

    def __init__(self, notifier: Notifier, interval_ns: int | None = None):
        self.notifier = notifier
        self.interval_ns = interval_ns if interval_ns is not None else notifier.watchdog_ns
        self._next_ns = 0

    def tick(self, now_ns: int | None = None) -> None:
        if self.interval_ns is None:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        if now >= self._next_ns:
            self.notifier.watchdog()
            self._next_ns = now + self.interval_ns


def _status(text: str) -> str:
    # One line: a newline would start a new (bogus) field of the datagram.
    return "STATUS=" + " ".join(text.split())[:STATUS_MAX_CHARS]
