"""A kinematic arm behind the backend interface: first-order tracking, lag, latency, noise.

Good enough to check that the driver tracks chunks, holds and decelerates. Time comes from
the host's monotonic clock so the arm moves the same whether the loop ticks on time or not.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.mock.leader import ScriptedLeader


class MockArm(Backend):
    def __init__(self, initial: np.ndarray, time_constant_s: float = 0.02, latency_s: float = 0.0,
                 noise_std: float = 0.0, seed: int = 0, leader: ScriptedLeader | None = None):
        self._q = np.array(initial, dtype=np.float64)
        self._target = self._q.copy()
        self._tau = time_constant_s
        self._latency_ns = int(latency_s * 1e9)
        self._noise = noise_std
        self._rng = np.random.default_rng(seed)
        self._pending: deque[tuple[int, np.ndarray]] = deque()  # commands still "on the wire"
        self._last_ns: int | None = None
        self._halted = False  # the driver told the arm to stop (its estop call)
        self.button_pressed = False  # the arm's own e-stop button, for tests to press
        self._connected = False
        self.writes = 0  # how many targets reached the arm (tests use it)
        self.leader = leader  # a scripted leader arm published in the state (teleop tests)

    def connect(self, timeout_s: float) -> None:
        self._connected = True
        self._last_ns = time.monotonic_ns()
        if self.leader is not None:
            self.leader.t0_ns = self._last_ns

    def read(self) -> Reading:
        if not self._connected:
            raise BackendError("mock arm is not connected", transient=False)
        now = time.monotonic_ns()
        self._advance(now)
        measured = self._q + (self._rng.normal(0.0, self._noise, self._q.shape) if self._noise else 0.0)
        extras = None
        if self.leader is not None:
            extras = self.leader.extras(now)
            if self.leader.follows_in_hardware and extras["leader"] is not None and not self._halted:
                # Like Cobot Magic's puppet arms: the arm obeys its leader by itself, nothing is written.
                self._target = np.array(extras["leader"], dtype=np.float64)
        return Reading(position=measured, mono_ns=now, estopped=self.button_pressed, extras=extras)

    def write(self, position: np.ndarray) -> None:
        if self._halted or self.button_pressed:
            return  # a real controller ignores motion while e-stopped; so does the mock
        if self.leader is not None and self.leader.follows_in_hardware:
            return  # the arm obeys its leader arm, not the bus (Cobot Magic's puppets)
        self.writes += 1
        self._pending.append((time.monotonic_ns() + self._latency_ns, np.array(position, dtype=np.float64)))

    def estop(self) -> None:
        self._halted = True
        self._pending.clear()
        self._target = self._q.copy()

    def release_estop(self) -> None:
        self._halted = False

    def close(self) -> None:
        self._connected = False

    def _advance(self, now: int) -> None:
        while self._pending and self._pending[0][0] <= now:
            self._target = self._pending.popleft()[1]
        dt = (now - (self._last_ns or now)) * 1e-9
        self._last_ns = now
        if self._halted or self.button_pressed:
            self._pending.clear()
            self._target = self._q.copy()
            return
        alpha = 1.0 if self._tau <= 0 else 1.0 - math.exp(-dt / self._tau)
        self._q += alpha * (self._target - self._q)
