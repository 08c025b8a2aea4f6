"""A scripted leader arm for the mock follower, so teleop can be tested without hardware.

The leader's pose is ``home + offset + amplitude * sin(2 pi f t + phase_j)`` per joint (grippers
move by ``gripper_amplitude``), clamped into the follower's joint range: it is already in the
follower's action units, as a real leader is once mapped through its calibration. It is published
in the state's ``device`` map as ``leader``, like the SO-101 leader.

Unplugging, for tests and demos: while the file ``unplug_file`` exists the leader "cannot be
read": ``leader`` is None and ``leader_error`` says why. Explicit and visible (``touch``/``rm``),
no control socket needed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ScriptedLeader:
    home: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gripper: np.ndarray  # bool mask of gripper joints
    amplitude: float
    gripper_amplitude: float
    frequency_hz: float
    offset: np.ndarray
    unplug_file: str | None
    follows_in_hardware: bool = False
    t0_ns: int = 0

    def pose(self, now_ns: int) -> np.ndarray:
        t = (now_ns - self.t0_ns) * 1e-9
        # A different phase per joint, so the joints do not all move in lockstep.
        phase = np.arange(len(self.home)) * 0.7
        amp = np.where(self.gripper, self.gripper_amplitude, self.amplitude)
        q = self.home + self.offset + amp * np.sin(2 * math.pi * self.frequency_hz * t + phase)
        return np.clip(q, self.lower, self.upper)

    def extras(self, now_ns: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.follows_in_hardware:
            out["leader_follows_in_hardware"] = True
        if self.unplug_file is not None and os.path.exists(self.unplug_file):
            out["leader"] = None
            out["leader_error"] = f"mock leader unplugged ({self.unplug_file} exists)"
        else:
            out["leader"] = self.pose(now_ns).tolist()
        return out
