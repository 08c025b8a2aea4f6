"""What every camera source gives the camera process (the factory that picks one: factory.py).

A source opens a device (or a recording, or a pattern generator), hands out captured frames
with a host wall-clock capture stamp, and never blocks for longer than the timeout it is given.
The camera process owns everything else: sequence numbers, drop and recovery counters,
reopening a stalled device, and publishing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

class SourceError(RuntimeError):
    """A camera could not be opened or configured; the message says which, where and why."""


@dataclass
class Captured:
    rgb: np.ndarray  # HxWx3 uint8, C-contiguous, owned by the frame (safe to hand to ZeroMQ)
    capture_ns: int  # host wall clock (time.time_ns domain)
    clock: str  # how capture_ns was obtained, e.g. "rs:global_time", "v4l2:monotonic", "arrival-interval"
    device_frame: int | None = None  # the device's own frame counter, when it has one
    device_ts_ns: int | None = None  # the device's own timestamp, in its own domain
    device_domain: str | None = None  # e.g. "hardware_clock", "global_time", "v4l2_monotonic"
    depth: np.ndarray | None = None  # HxW, aligned to rgb
    depth_scale_m: float | None = None  # metres per depth unit
    # The depth frame's own counter: the syncer may pair a colour frame with a neighbouring depth one.
    depth_frame: int | None = None


class CameraSource(Protocol):
    def open(self) -> dict[str, Any]:
        """Open the device; returns what was opened (serial, size, rate, clock). Raises SourceError."""

    def read(self, timeout_s: float) -> Captured | None:
        """The next frame, or None when none arrives within ``timeout_s`` (a stall)."""

    def close(self) -> None:
        """Release the device. Safe to call twice, or after a failed open."""


def resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p
