"""LeRobot's config for armada's mock arm, for LeRobot's robot client in `armada bench anchors`.

Named the way LeRobot finds a third-party robot (``config_<name>.py`` beside ``<name>.py``, the
class name minus ``Config``): ``make_robot_from_config`` builds ``lerobot_arm.LerobotArm``.
The class is built on first use (``LerobotArmConfig`` from this module), so that importing this
module needs no lerobot: only the LeRobot stack's client process touches it.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _config_class() -> type:
    from dataclasses import dataclass

    from lerobot.robots.config import RobotConfig

    @RobotConfig.register_subclass("armada_anchor_arm")
    @dataclass
    class LerobotArmConfig(RobotConfig):
        cell: str = ""  # the bench's cell file
        run_dir: str = ""  # its run dir (ipc sockets)

    return LerobotArmConfig


def __getattr__(name: str) -> Any:
    if name == "LerobotArmConfig":
        return _config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
