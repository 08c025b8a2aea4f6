"""Armada's mock arm and cameras as a LeRobot ``Robot``, for LeRobot's robot client.

Observations are ``<joint>.pos`` floats and one HxWx3 image per camera, as LeRobot's arms give
them; an action is ``<joint>.pos`` targets, sent to the driver as one servo target. The class is
built on first use (``LerobotArm`` from this module, as LeRobot's ``make_robot_from_config``
looks it up), so that importing this module needs no lerobot.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from armada.runtime.anchors.common import Arm


@functools.cache
def _robot_class() -> type:
    from lerobot.robots.robot import Robot

    from armada.runtime.anchors.config_lerobot_arm import _config_class

    class LerobotArm(Robot):
        config_class = _config_class()
        name = "armada_anchor_arm"

        def __init__(self, config: Any):
            super().__init__(config)
            self.arm = Arm(Path(config.cell), Path(config.run_dir))
            self.joints = list(self.arm.link.handshake()["description"]["joint_names"])  # hello only: no lease
            self._connected = False

        @property
        def observation_features(self) -> dict:
            cams = {c.name: (c.height, c.width, 3) for c in self.arm.cell.cameras}
            return {f"{j}.pos": float for j in self.joints} | cams

        @property
        def action_features(self) -> dict:
            return {f"{j}.pos": float for j in self.joints}

        @property
        def is_connected(self) -> bool:
            return self._connected

        def connect(self, calibrate: bool = True) -> None:
            self.arm.connect()
            self._connected = True

        @property
        def is_calibrated(self) -> bool:
            return True

        def calibrate(self) -> None:
            pass  # a mock arm has nothing to calibrate

        def configure(self) -> None:
            pass

        def get_observation(self) -> dict[str, Any]:
            self.arm.poll()
            obs: dict[str, Any] = {f"{j}.pos": float(v) for j, v in zip(self.joints, self.arm.state)}
            return obs | dict(self.arm.frames)

        def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
            self.arm.servo(np.array([float(action[f"{j}.pos"]) for j in self.joints]))
            return action

        def disconnect(self) -> None:
            if self._connected:
                self._connected = False
                self.arm.close()

    return LerobotArm


def __getattr__(name: str) -> Any:
    if name == "LerobotArm":
        return _robot_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
