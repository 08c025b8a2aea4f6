"""A fake serial servo bus on a pseudo-terminal: the part every servo-bus fake shares.

The fake opens a pty pair; the vendor SDK opens the slave path (``port``) with pyserial, and a
thread answers on the master side. Subclasses bring the protocol: ``_respond(buf)`` consumes the
complete instruction packets in ``buf`` and returns the reply bytes. This base keeps the servos
(``{id: servo}``, each with ``advance(dt, max_speed)``, ``present()`` and a ``missing`` flag), moves
them with wall time on every wake-up, and gives the lifecycle (``start``, ``stop``, ``unplug``: the pty
closes and the SDK's next read or write fails) and the common control API.

Replies the host leaves unread beyond the pty's buffer (about 4 KiB) are dropped and counted in
``bytes_dropped``, as an adapter's buffer would overflow, rather than blocking the bus.
"""

from __future__ import annotations

import errno
import os
import select
import termios
import threading
import time
import tty
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

S = TypeVar("S")


def _speed_names() -> dict[int, int]:
    names = {}
    for name in dir(termios):
        if name.startswith("B") and name[1:].isdigit():
            names.setdefault(getattr(termios, name), int(name[1:]))
    return names


_SPEEDS = _speed_names()


def termios_speed(fd: int) -> int | None:
    """The port speed pyserial set on the pty (bits/s), or None when it cannot be told."""
    try:
        return _SPEEDS.get(termios.tcgetattr(fd)[5])
    except termios.error:
        return None


class PtyServoBus(ABC, Generic[S]):
    thread_name = "servo-bus-fake"

    def __init__(self, servos: dict[int, S], *, max_speed: float, tick_s: float) -> None:
        self.max_speed = float(max_speed)
        self.tick_s = tick_s
        self._lock = threading.RLock()
        self._servos: dict[int, S] = servos
        self.received_goals: list[tuple[int, int]] = []
        self.packets_in = 0
        self.bytes_dropped = 0
        self.port: str | None = None
        self._master = self._slave = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        self._stop.clear()
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name=self.thread_name, daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def unplug(self) -> None:
        """The USB adapter goes away: the pty closes, the SDK's next read/write fails."""
        self.stop()

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- control API -----------------------------------------------------------------------
    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._servos)

    def _servo(self, servo_id: int) -> S:
        try:
            return self._servos[servo_id]
        except KeyError:
            raise KeyError(f"no fake servo with id {servo_id}; ids are {sorted(self._servos)}") from None

    def set_missing(self, servo_id: int, missing: bool = True) -> None:
        """The servo never answers (unpowered, cable off, wrong ID)."""
        with self._lock:
            self._servo(servo_id).missing = missing

    def present_position(self, servo_id: int) -> int:
        with self._lock:
            self._advance()
            return self._servo(servo_id).present()

    # --- the bus ---------------------------------------------------------------------------
    @abstractmethod
    def _respond(self, buf: bytearray) -> bytes:
        """Consume the complete instruction packets in ``buf``; the replies (called under the lock)."""

    def _port_speed(self) -> int | None:
        return termios_speed(self._master) if self._master >= 0 else None

    def _advance(self) -> None:
        now = time.monotonic()
        dt = now - self._last
        self._last = now
        if dt > 0:
            for s in self._servos.values():
                s.advance(dt, self.max_speed)

    def _serve(self) -> None:
        buf = bytearray()
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([self._master], [], [], self.tick_s)
                except (OSError, ValueError):
                    break
                with self._lock:
                    self._advance()
                if not ready:
                    continue
                try:
                    data = os.read(self._master, 4096)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    break
                if not data:
                    break
                buf += data
                with self._lock:
                    out = self._respond(buf)
                if out and not self._send(out):
                    break
        finally:
            for fd in (self._master, self._slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._master = self._slave = -1

    def _send(self, data: bytes) -> bool:
        """Write replies; bytes the host leaves unread past the pty's buffer are lost, as on a
        real adapter, instead of blocking the bus. False when the port is gone."""
        while data:
            try:
                n = os.write(self._master, data)
            except BlockingIOError:
                self.bytes_dropped += len(data)
                return True
            except OSError:
                return False
            data = data[n:]
        return True
