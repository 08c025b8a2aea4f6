"""What the cells load: plain values with numpy arrays, no OpenCV objects.

These are what ``calibration.results`` loaders return, so a driver or the inference process can
read a calibration without importing the calibration machinery itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

HandEyeMode = Literal["eye_in_hand", "eye_to_hand"]


@dataclass(frozen=True)
class CameraIntrinsics:
    """A pinhole camera with OpenCV's distortion model, valid at exactly ``image_size``."""

    K: np.ndarray  # (3, 3) float64: [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], pixels
    dist: np.ndarray  # (n,) float64, OpenCV order: k1 k2 p1 p2 [k3 [k4 k5 k6]]
    image_size: tuple[int, int]  # (width, height), pixels

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])


@dataclass(frozen=True)
class HandEyeCalibration:
    """Where a camera is: ``transform`` maps points in the camera frame into the parent frame.

    eye_in_hand: parent is the gripper (tool flange / TCP frame the driver reports), so
    ``gripper_T_camera``. eye_to_hand: parent is the robot base, so ``base_T_camera``.
    ``board_pose`` is the board seen during calibration: base_T_board (eye-in-hand) or
    gripper_T_board (eye-to-hand), useful to check a later set-up against.
    """

    mode: HandEyeMode
    transform: np.ndarray  # (4, 4) float64, metres
    board_pose: np.ndarray  # (4, 4) float64, metres

    @property
    def parent(self) -> str:
        return "gripper" if self.mode == "eye_in_hand" else "base"


@dataclass(frozen=True)
class CameraLatency:
    """How long after the scene a frame's ``capture_ns`` stamp is, in seconds (subtract it)."""

    delay_s: float
    method: str
