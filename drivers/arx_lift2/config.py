"""The cell's ``backend:`` map of an ARX Lift 2 driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from armada.runtime.config import StrictModel

BodyType = Literal["LIFT", "X7S", "X72026", "LIFT2026", "LIFT2026_4310_3519"]


class ArxLift2BackendConfig(StrictModel):
    """Two ARX arms (arx5-sdk), the lift and the omni base (ARX LIFT-mini), each on its own CAN bus."""

    kind: Literal["arx_lift2"] = "arx_lift2"
    # True: kinematic simulators of the three devices behind the same adapters (drivers/arx_lift2/sim.py).
    fake: bool = False
    # The fakes' folder: control.json (fault injection, written by a test or an operator) and one
    # status file per device. Only with fake: true; {run_dir}/... gives each run its own.
    fake_dir: str | None = None
    # ARX's CAN layout (LIFT-mini readme): left arm can1, right arm can3, chassis (lift and base) can5.
    left_can: str = "can1"
    right_can: str = "can3"
    body_can: str = "can5"
    arm_model: Literal["X5", "L5"] = "X5"  # arx5-sdk's robot model
    body_type: BodyType = "LIFT2026_4310_3519"  # LIFT-mini's RobotType (its examples use this one)
    # Feedback that has not changed at all for this long is a silent link (adapter.py's notes).
    frozen_s: float = Field(default=0.1, gt=0.01, le=1.0)
    # No write for this long (a hung driver loop) and the body's own 200 Hz thread ramps the base to
    # zero by itself: the chassis must never keep driving on a stale velocity.
    base_watchdog_s: float = Field(default=0.1, gt=0.0, le=1.0)
    # Mecanum geometry for the odometry (m). ARX publishes none of it for the Lift 2: measure these
    # on the robot before trusting the base's measured velocity.
    wheel_radius_m: float = Field(default=0.076, gt=0.0, le=0.5)
    half_length_m: float = Field(default=0.2, gt=0.0, le=2.0)
    half_width_m: float = Field(default=0.2, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _buses(self) -> "ArxLift2BackendConfig":
        buses = [self.left_can, self.right_can, self.body_can]
        if len(set(buses)) != 3:
            raise ValueError(f"left_can, right_can and body_can must be three buses, got {buses}")
        if self.fake_dir is not None and not self.fake:
            raise ValueError("fake_dir is for fake: true only")
        return self
