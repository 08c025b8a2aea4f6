"""The cell's ``backend:`` map of a UR3 driver."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from armada.runtime.config import StrictModel


class UR3BackendConfig(StrictModel):
    """A Universal Robots UR3 (CB3 or e-Series) through ur-rtde."""

    kind: Literal["ur3"] = "ur3"
    host: str  # the controller's address; ur-rtde always uses ports 30004 (RTDE) and 30003 (script)
    dashboard_port: int = Field(default=29999, gt=0, lt=65536)
    # servoJ's lookahead (s, smoother but later) and gain (stiffer tracking); ur-rtde's ranges.
    servo_lookahead_s: float = Field(default=0.1, ge=0.03, le=0.2)
    servo_gain: float = Field(default=300.0, ge=100, le=2000)
    # The RTDE watchdog: the robot's control script stops the arm if not kicked this often.
    watchdog_min_hz: float = Field(default=10.0, ge=1, le=500)


N_JOINTS = 6


def check_embodiment(cfg: UR3BackendConfig, emb: Any) -> None:
    """Six joints, no gripper: checked when the cell loads and again when the backend is built."""
    if emb.dof != N_JOINTS:
        raise ValueError(f"UR3 backend needs 6 dofs (the joints, no gripper), embodiment {emb.name} has {emb.dof}")
