"""A synthetic camera: a moving pattern with the frame number drawn in.

The frame number in the pixels lets a test check, from the image alone, which frame it got
and how old it is: the same check a person does by holding a clock up to a real camera.
"""

from __future__ import annotations

import cv2
import numpy as np


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
