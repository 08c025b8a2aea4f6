"""A leader arm read once per follower tick for the state's ``device`` map, without ever costing the
follower its tick or its mode.

Used by the ALOHA and SO-101 backends (generic: it knows nothing of either bus; it would belong in
drivers/core, which this driver does not own). The leader is optional for the follower: whatever
happens to it, the follower's read goes on and nothing here raises.

What ``device`` gets (the interface teleop and the recorder read, brief of issue 11):
- ``leader``: the leader's pose in the follower's action units, or None when it cannot be read now,
  then ``leader_error`` says why;
- ``leader_follows_in_hardware``: False (these followers obey only their driver).

Per failure:
- a port that failed (the adapter unplugged: EIO) or never opened gives None at once. It is reopened
  every ``retry_s`` in a background thread, with the connect checks (IDs, models): a reopen that
  waits on a silent bus must not hold up a follower tick. So the leader comes back by itself once it
  is plugged in again (the udev name returns), no clear_fault or restart needed; nothing on a leader
  is ever written, so reopening it is safe. While the thread owns the leader's bus the tick does not
  touch it.
- a bus that stops answering (leader unpowered, cable off the servos) is read every tick for
  ``stale_s``, publishing the last good pose meanwhile (one lost reply on a loaded host must not make
  teleop drop its leader), then None, and from then on read only every ``retry_s``: each try costs a
  reply timeout, which must not be paid every tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from armada.drivers.core.backend import BackendError

log = logging.getLogger("armada.leader")

LEADER_STALE_S = 0.1  # a leader that has not answered for this long is lost: None
LEADER_RETRY_S = 0.25  # a lost leader is tried again this often
STOP_WAIT_S = 0.2  # close waits this long for a reopen in progress; a later one closes what it opened


class LeaderPoll:
    def __init__(self, name: str, read: Callable[[], np.ndarray], dead: Callable[[], bool],
                 reopen: Callable[[], None], close: Callable[[], None], stale_s: float = LEADER_STALE_S,
                 retry_s: float = LEADER_RETRY_S):
        """``read``: the leader's pose (raises BackendError); ``dead``: its port is not usable and needs
        ``reopen`` (opens and checks it, raises BackendError); ``close`` closes its port."""
        self.name = name
        self._read, self._dead, self._reopen, self._close = read, dead, reopen, close
        self.stale_s, self.retry_s = stale_s, retry_s
        self._last: list[float] | None = None
        self._last_ok = time.monotonic()
        self._error: str | None = None  # why the last try failed; None while the leader reads
        self._lost = False  # stale_s without a reading, or its port failed: None, tried every retry_s
        self._next_try = 0.0
        self._reopening: threading.Thread | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle (the backend's thread)

    def stop(self) -> None:
        """Before the backend closes or reopens the leader's port: no reopen may run behind it."""
        self._stopped = True
        thread = self._reopening
        if thread is not None:
            thread.join(STOP_WAIT_S)
            if thread.is_alive():
                log.warning("%s: a reopen is still running; it closes the port when it ends", self.name)
        self._reopening = None

    def start(self) -> None:
        """The backend (re)connected: the leader counts as read now."""
        self.stop()
        self._stopped = False
        self._last, self._error, self._lost = None, None, False
        self._last_ok = time.monotonic()
        self._next_try = 0.0

    # ------------------------------------------------------------------ per tick

    def extras(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._reopening is not None:
            if self._reopening.is_alive():
                return self._none(f"{self._error} (opening its port)")
            self._reopening = None
        if (not self._lost or now >= self._next_try) and self._try(now):
            return self._none(f"{self._error} (opening its port)")
        if self._error is None:
            return self._pose(self._last)
        if not self._lost and now - self._last_ok <= self.stale_s:
            if self._last is not None:
                return self._pose(self._last)  # a lost reply, not (yet) a lost leader
            return self._none(self._error)
        if not self._lost:
            self._lost, self._next_try = True, now + self.retry_s
        return self._none(f"{self._error} (no reading for {(now - self._last_ok) * 1e3:.0f} ms; tried again every "
                          f"{self.retry_s:g} s)")

    def _try(self, now: float) -> bool:
        """Read the leader, or start reopening its port (True)."""
        if self._dead():
            self._lost, self._last, self._next_try = True, None, now + self.retry_s
            if self._error is None:
                self._error = f"{self.name}: not read yet"
            self._reopening = threading.Thread(target=self._reopen_in_background, name=f"reopen {self.name}",
                                               daemon=True)
            self._reopening.start()
            return True
        try:
            q = self._read()
        except BackendError as exc:
            self._error = str(exc)
            if not exc.transient:  # the port failed: no last pose is worth publishing
                self._lost, self._last = True, None
            if self._lost:
                self._next_try = now + self.retry_s
            return False
        self._last = [float(v) for v in q]
        self._last_ok, self._error, self._lost = now, None, False
        return False

    def _reopen_in_background(self) -> None:
        try:
            self._reopen()
        except BackendError as exc:
            self._error = str(exc)
            return
        except Exception as exc:  # noqa: BLE001 (a thread's exception would only reach stderr)
            self._error = f"{self.name}: reopening failed: {type(exc).__name__}: {exc}"
            return
        if self._stopped:  # the backend closed meanwhile: do not leave the port open behind it
            self._close()
            return
        log.info("%s: reopened", self.name)
        self._next_try = 0.0  # read it at the next tick

    @staticmethod
    def _pose(q: list[float] | None) -> dict[str, Any]:
        return {"leader": q, "leader_follows_in_hardware": False}

    @staticmethod
    def _none(why: str | None) -> dict[str, Any]:
        return {"leader": None, "leader_error": why or "not read yet", "leader_follows_in_hardware": False}
