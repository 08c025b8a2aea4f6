"""The cell's ``backend:`` map of a Cobot Magic driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from armada.runtime.config import StrictModel


class CobotMagicBackendConfig(StrictModel):
    """AgileX Cobot Magic: two puppet PiPers (left, right), each sharing a bus with its master arm."""

    kind: Literal["cobot_magic"] = "cobot_magic"
    left_can: str
    right_can: str
    # Teleop and recording: the master arms move the puppets and the driver only reads (every write
    # is refused). False: the masters must be silent, or the driver faults rather than fight them.
    follow_masters: bool = False
    # Publish the masters' commanded pose in the state's device map ("leader", 14 values in the action's
    # layout and units, or None and "leader_error" when a master is quiet), for teleop and recording.
    masters_in_state: bool = False
    bustype: Literal["socketcan", "udp_multicast", "virtual"] = "socketcan"
    speed_pct: int = Field(default=50, ge=1, le=100)
    gripper_effort: int = Field(default=1000, ge=0, le=5000)
    stale_s: float = Field(default=0.05, gt=0, le=1)
    allow_reset_on_resume: bool = False
