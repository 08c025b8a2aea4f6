"""The boundary between the ARX Lift 2 backend and ARX's SDKs: one small interface per device.

Everything above this boundary (drivers/arx_lift2/parts.py, backend.py) is ours and tested against
the fakes (drivers/arx_lift2/sim.py); everything below it is one vendor call per method, in one
file per SDK (arm_arx5.py: ``arx5_interface``; body_lift.py: ARX LIFT-mini's ``lift_controller``).
Units are the vendors' own, which are SI already: rad, rad/s, N·m, gripper opening in m, lift
height in m, chassis velocity in m/s and rad/s, wheel speeds in rad/s.

What the vendor interfaces do not have, and how the parts make up for it (docs/arx-lift2.md):
- No link status: arx5-sdk stamps every joint state with its own clock whether or not a motor
  answered, and LIFT-mini returns its last values. A link is silent when its feedback stops
  changing at all: motor currents (arm) and the base's IMU (body) always carry sensor noise.
- No motor error codes in Python: arx5-sdk's emergency state (over-current, a bad reading) sets
  the gains to damping (kp = 0) and stays there; that is the arm's fault signal. The lift and the
  chassis report nothing: a motor that stops shows as a following error in the driver.
- No e-stop bit: the robot's e-stop switch cuts motor power, which both interfaces see as silence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

ARM_JOINTS = 6


class AdapterError(Exception):
    """A vendor call failed (the SDK raised, the bus could not be opened, nothing answered)."""


@dataclass(frozen=True)
class ArmSample:
    """One ``get_joint_state()`` (arx5-sdk ``JointState``) plus the gains' mode."""

    pos: np.ndarray  # (6,) rad
    vel: np.ndarray  # (6,) rad/s
    torque: np.ndarray  # (6,) N·m (from motor current)
    gripper_pos: float  # m, 0 (closed) to 0.088 (open) on an X5
    gripper_vel: float
    gripper_torque: float
    timestamp: float  # s, the SDK's clock since the controller started
    damping: bool  # kp is zero: the SDK is in damping (its start-up state, or its emergency state)


class ArmAdapter(Protocol):
    """One ARX arm with its gripper on its own CAN bus (arx5-sdk's ``Arx5JointController``).

    The SDK runs its own 500 Hz send/receive thread: ``command`` sets the target it holds."""

    def open(self) -> None:
        """Start the controller (arx5-sdk starts in damping, at the measured pose). Raises AdapterError."""

    def read(self) -> ArmSample: ...

    def command(self, pos: np.ndarray, gripper_pos: float) -> None:
        """The joint and gripper target, applied at once (no interpolation of ours in the SDK)."""

    def hold(self) -> None:
        """Position mode: the SDK's default gains (kp, kd), so the arm holds its command."""

    def close(self) -> None:
        """Stop using the controller without touching the gains: the arm keeps holding."""


@dataclass(frozen=True)
class BodySample:
    """What LIFT-mini's ``InterfacesPy`` reports after its last ``loop()``."""

    height: float  # m, get_height()
    wheel_vel: np.ndarray  # (4,) rad/s, get_wheel_vel()
    accel: np.ndarray  # (3,) m/s², get_accel(): the chassis IMU


class BodyAdapter(Protocol):
    """The lift column and the omni base on one CAN bus (LIFT-mini's ``InterfacesPy``).

    Nothing reaches the device, and nothing is read, until ``spin`` (the SDK's ``loop()``), which
    must be called every cycle (200 Hz)."""

    def open(self) -> None:
        """Raises AdapterError."""

    def set_height(self, height_m: float) -> None: ...

    def set_chassis(self, vx: float, vy: float, wz: float) -> None:
        """Whole-body velocity (the SDK's mode 1), m/s and rad/s."""

    def spin(self) -> None:
        """One exchange with the device (the SDK's ``loop()``)."""

    def read(self) -> BodySample: ...

    def close(self) -> None:
        """Stop using the interface; the last setpoints stay with the device."""


@dataclass(frozen=True)
class MecanumGeometry:
    """Wheel radius and half distances between the wheels' contact points (m). ARX publishes none
    of these for the Lift 2: the values in the cell are to be measured on the robot."""

    wheel_radius: float
    half_length: float  # front to rear axle, half
    half_width: float  # left to right wheel, half

    def body_velocity(self, wheels: np.ndarray) -> np.ndarray:
        """(vx, vy, wz) from the wheel speeds, ordered front-left, front-right, rear-left, rear-right,
        positive rolling forward (the standard X-pattern mecanum forward kinematics)."""
        w1, w2, w3, w4 = (float(v) for v in wheels)
        r, k = self.wheel_radius, self.half_length + self.half_width
        return np.array([r / 4 * (w1 + w2 + w3 + w4), r / 4 * (-w1 + w2 + w3 - w4),
                         r / (4 * k) * (-w1 + w2 - w3 + w4)])

    def wheel_speeds(self, vx: float, vy: float, wz: float) -> np.ndarray:
        """The inverse of ``body_velocity`` (what the chassis firmware does in mode 1)."""
        r, k = self.wheel_radius, self.half_length + self.half_width
        return np.array([vx - vy - k * wz, vx + vy + k * wz, vx + vy - k * wz, vx - vy + k * wz]) / r
