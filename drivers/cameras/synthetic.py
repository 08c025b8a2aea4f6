"""A synthetic camera: a moving pattern with the frame number drawn in.

The frame number in the pixels lets a test check, from the image alone, which frame it got
and how old it is: the same check a person does by holding a clock up to a real camera.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from armada.drivers.cameras.source import Captured

if TYPE_CHECKING:
    from armada.drivers.cameras.plugins import SyntheticCameraConfig


class SyntheticCamera:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        x = np.linspace(0, 255, width, dtype=np.float32)
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        base = np.empty((height, width * 2, 3), np.uint8)  # twice as wide so we can slide a window
        base[:, :width, 0] = x
        base[:, :width, 1] = y
        base[:, :width, 2] = 128
        base[:, width:] = base[:, :width]
        self._base = base

    def grab(self, frame_number: int) -> np.ndarray:
        """A new RGB frame (a fresh array: the publisher sends it without copying)."""
        shift = (frame_number * 4) % self.width
        img = np.ascontiguousarray(self._base[:, shift:shift + self.width])
        scale = max(self.height / 240, 0.5)
        cv2.putText(img, f"{frame_number:06d}", (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        return img


class SyntheticSource:
    """The synthetic camera as a camera source: frames on monotonic deadlines at the configured rate.

    ``capture_ns`` is the host wall clock read at the instant the frame is drawn. A deadline the
    process missed (it was descheduled) is skipped, and its frame number with it, so the gap shows
    up as a drop exactly as a real camera's lost frame would.
    """

    def __init__(self, cfg: "SyntheticCameraConfig"):
        self.cfg = cfg
        self.period_ns = int(1e9 / cfg.fps)
        self.camera: SyntheticCamera | None = None
        self._deadline = 0
        self._number = 0

    def open(self) -> dict[str, Any]:
        self.camera = SyntheticCamera(self.cfg.width, self.cfg.height)
        self._deadline, self._number = time.monotonic_ns(), 0
        return {"source": "synthetic", "width": self.cfg.width, "height": self.cfg.height, "fps": self.cfg.fps,
                "clock": "host:synthetic"}

    def read(self, timeout_s: float) -> Captured | None:
        if self.camera is None:
            return None
        now = time.monotonic_ns()
        late = now - self._deadline
        if late > self.period_ns:  # missed deadlines: those frames were never taken
            missed = late // self.period_ns
            self._deadline += missed * self.period_ns
            self._number += int(missed)
        wait_ns = self._deadline - now
        if wait_ns > timeout_s * 1e9:
            time.sleep(timeout_s)
            return None
        if wait_ns > 0:
            time.sleep(wait_ns * 1e-9)
        capture_ns = time.time_ns()
        rgb = self.camera.grab(self._number)
        frame = Captured(rgb, capture_ns, "host:synthetic", device_frame=self._number)
        self._number += 1
        self._deadline += self.period_ns
        return frame

    def close(self) -> None:
        self.camera = None
