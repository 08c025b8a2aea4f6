"""A leader arm read once per follower tick for the state's ``device`` map, without ever costing the
follower its mode, and at most a bounded, small part of its tick.

Used by the ALOHA and SO-101 backends; it knows nothing of either bus. The leader is optional for
the follower: whatever happens to it, the follower's read goes on and nothing here raises.

What ``device`` gets (what teleop and the recorder read):
- ``leader``: the leader's pose in the follower's action units, or None when it cannot be read now,
  then ``leader_error`` says why;
- ``leader_follows_in_hardware``: False (these followers obey only their driver).

Per failure:
- a port that failed (the adapter unplugged: EIO) gives None at once. Every ``retry_s`` its port is
  reopened, in the tick, while its device path exists again (the udev name comes back on replug), so
  the leader returns by itself, with no clear_fault or restart (nothing on a leader is ever written,
  so reopening it is safe). The reopen must be cheap (open the port, no pings: the next read checks
  that every ID answers); the full checks (IDs, models, calibration) are connect's. A full reopen in
  a background thread was tried: it took 7-147 ms in the worker on a loaded 2-core host, spin-waiting
  in the SDK against the follower's reads for the GIL; the cheap one in the tick is bounded by one
  port open and one reply timeout, every ``retry_s`` at most.
- a bus that stops answering (leader unpowered, cable off the servos) is read every tick for
  ``stale_s``, publishing the last good pose meanwhile (one lost reply on a loaded host must not make
  teleop drop its leader), then None, and from then on read only every ``retry_s``: each try costs a
  reply timeout (a few ms), which must not be paid every tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from armada.drivers.core.backend import BackendError

log = logging.getLogger("armada.leader")

LEADER_STALE_S = 0.1  # a leader that has not answered for this long is lost: None
LEADER_RETRY_S = 0.25  # a lost leader is tried again this often


class LeaderPoll:
    def __init__(self, name: str, read: Callable[[], np.ndarray], dead: Callable[[], bool],
                 reopen: Callable[[], None], stale_s: float = LEADER_STALE_S, retry_s: float = LEADER_RETRY_S):
        """``read``: the leader's pose (raises BackendError); ``dead``: its port is not usable and needs
        ``reopen`` (cheap: opens the port; raises BackendError while it cannot, e.g. still unplugged)."""
        self.name = name
        self._read, self._dead, self._reopen = read, dead, reopen
        self.stale_s, self.retry_s = stale_s, retry_s
        self.start()

    def start(self, error: str | None = None) -> None:
        """The backend (re)connected; ``error``: why the leader could not be opened then."""
        self._last: list[float] | None = None
        self._last_ok = time.monotonic()
        self._error = error  # why the last try failed; None while the leader reads
        self._lost = error is not None  # stale_s without a reading, or its port failed: None, tried every retry_s
        self._next_try = time.monotonic() + self.retry_s if self._lost else 0.0

    def extras(self) -> dict[str, Any]:
        now = time.monotonic()
        if not self._lost or now >= self._next_try:
            self._try(now)
        if self._error is None:
            return self._pose(self._last)
        if not self._lost and now - self._last_ok <= self.stale_s:
            # A lost reply, not (yet) a lost leader: the last pose, if there is one yet.
            return self._pose(self._last) if self._last is not None else self._none(self._error)
        if not self._lost:
            self._lost, self._next_try = True, now + self.retry_s
            log.warning("%s lost: %s", self.name, self._error)
        return self._none(f"{self._error} (no reading for {(now - self._last_ok) * 1e3:.0f} ms; tried again every "
                          f"{self.retry_s:g} s)")

    @staticmethod
    def _pose(q: list[float] | None) -> dict[str, Any]:
        return {"leader": q, "leader_follows_in_hardware": False}

    @staticmethod
    def _none(why: str) -> dict[str, Any]:
        return {"leader": None, "leader_error": why, "leader_follows_in_hardware": False}

    def _try(self, now: float) -> None:
        was_lost = self._lost
        try:
            if self._dead():
                self._reopen()
            q = self._read()
        except BackendError as exc:
            self._error = str(exc)
            if not exc.transient:  # the port failed or is gone: no last pose is worth publishing
                self._last = None
                if not self._lost:
                    log.warning("%s lost: %s", self.name, self._error)
                self._lost = True
            if self._lost:
                self._next_try = now + self.retry_s
            return
        self._last = [float(v) for v in q]
        self._last_ok, self._error, self._lost = now, None, False
        if was_lost:
            log.info("%s read again", self.name)
