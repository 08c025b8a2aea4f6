"""The hardware interface every device implements, in the spirit of ros2_control.

A backend only moves bytes between the driver and the device: it reads what the device
measured and writes position targets that the driver's safety filter has already passed.
Limits, leases, trajectories and states live in the driver core, never in a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


class BackendError(Exception):
    """A device call failed. ``transient`` errors are retried by the loop; others fault the driver."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Reading:
    position: np.ndarray  # action layout order, SI units (rad, m)
    mono_ns: int  # when it was measured, on this host's monotonic clock
    velocity: np.ndarray | None = None
    estopped: bool = False  # the device's own e-stop is engaged
    fault: str | None = None  # the device reports a fault it cannot recover from by itself
    # Device-specific state published as-is with each state message (a UR's TCP pose, safety mode,
    # controller time, ...). Plain numbers, strings, bools and lists only: it goes on the wire.
    extras: dict[str, Any] | None = None


class Backend(ABC):
    """One device. Calls must return within their timeout; none may block forever."""

    @abstractmethod
    def connect(self, timeout_s: float) -> None:
        """Open the device. Raise BackendError (transient=False) with a clear message on failure."""

    @abstractmethod
    def read(self) -> Reading:
        """Read the device's state now."""

    @abstractmethod
    def write(self, position: np.ndarray) -> None:
        """Send one filtered position target."""

    @abstractmethod
    def estop(self) -> None:
        """Stop all motion in the device now (the device holds; torque stays on where it can)."""

    def release_estop(self) -> None:
        """Undo ``estop`` at the device level, when the operator resets it."""

    def recover(self, timeout_s: float) -> None:
        """Operator-requested recovery from a fault (reconnect, unlock, restart), never automatic.

        Raise BackendError (transient=False) saying what the operator must do when it cannot.
        """

    def on_fault(self, reason: str) -> None:
        """The driver has faulted: make sure nothing reaches the device until ``recover``.

        Called from the control loop, so it must return within a few milliseconds. A backend whose
        SDK could recover or resend on its own (a reconnect thread, queued commands) stops it here.
        """

    @abstractmethod
    def close(self) -> None:
        """Disconnect. Must not cut torque on a raised arm."""
