"""Kinematic simulators (the fakes) of the ARX Lift 2's devices at the adapter boundary
(drivers/arx_lift2/adapter.py). A cell runs the robot on them with ``fake: true``, as it runs the
mock arm or the MuJoCo arm: they are a simulated robot the driver builds, not test equipment
beside a real SDK (no protocol is faked: neither vendor SDK can be run here).

``SimArm`` stands in for arx5-sdk's ``Arx5JointController`` on one arm, ``SimBody`` for LIFT-mini's
``InterfacesPy`` (lift column and omni base). They keep the vendors' units, rates and limits and
behave as the SDKs do where it matters to the backend:
- the arm: a 500 Hz controller (the SDK's own thread) that starts in damping at the measured pose,
  clips commands to the X5's joint range and speeds (arx5-sdk's X5 config), and refuses position
  gains while the command is > 0.2 rad from the pose; its clock stamps every state, fresh or not;
- the body: a 200 Hz exchange that happens only in ``spin`` (the SDK's ``loop()``): setpoints reach
  the device and readings come back only then; the lift goes to 0-0.38 m; the base follows its last
  velocity setpoint with limited acceleration and, the worst case, no watchdog of its own.
Time is simulated lazily, in the device's own steps, up to the moment of each call: no threads.

Faults, from ``control.json`` in ``fake_dir`` (re-read at most every 20 ms, written by tests or
by hand), for each device by name (``left_arm``, ``right_arm``, ``body``):
    {"left_arm": {"silent": true}}        CAN silence: feedback frozen, commands lost
    {"right_arm": {"motor_error": true}}  arm: the SDK's emergency state (damping for good);
                                          body: the lift motor stops following
    {"power": false}                      the robot's e-stop switch: motor power cut on every device
                                          (all silent; the arms go limp, the column sinks)
Each device writes its true state to ``<fake_dir>/<name>.json`` (torque on, pose, setpoints), at most
every 50 ms, and the count of commands that reached it to ``<fake_dir>/<name>.commands`` on every one,
for tests to check what reached the device.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from armada.drivers.arx_lift2.adapter import (ARM_JOINTS, AdapterError, ArmSample, BodySample, MecanumGeometry)

# arx5-sdk's X5 robot config (RobotConfigFactory.get_config("X5"), read from the wheel).
X5_POS_MIN = np.array([-3.14, -0.05, -0.1, -1.6, -1.57, -2.0])
X5_POS_MAX = np.array([2.618, 3.5, 3.2, 1.55, 1.57, 2.0])
X5_VEL_MAX = np.array([5.0, 5.0, 5.5, 5.5, 5.0, 5.0])
X5_GRIPPER_WIDTH = 0.088
X5_GRIPPER_VEL_MAX = 0.3
ARM_DT = 0.002  # the SDK's controller_dt
ARM_TRACKING_S = 0.01  # the motors' PD settles on its command with about this time constant
SET_GAIN_MAX_ERROR = 0.2  # the SDK refuses kp while the command is further than this from the pose

BODY_DT = 0.005  # 200 Hz
LIFT_MIN, LIFT_MAX = 0.0, 0.38  # LIFT-mini readme: set_height range, m
LIFT_SPEED = 0.1  # m/s, the column's own limit in the fake (ARX publishes none; faster than the config's)
LIFT_FALL_SPEED = 0.05  # m/s, the column sinking without motor power
BASE_ACCEL = np.array([1.0, 1.0, 2.0])  # the chassis firmware's own acceleration limits in the fake
POLL_S = 0.02
STATUS_S = 0.05
MAX_CATCH_UP_S = 1.0  # a call after a long pause simulates at most this much (the rest is skipped)


class SimControl:
    """The fault switches in ``<fake_dir>/control.json``; none without a folder."""

    def __init__(self, fake_dir: str | None, name: str):
        self.path = None if fake_dir is None else Path(fake_dir) / "control.json"
        self.name = name
        self._data: dict[str, Any] = {}
        self._mtime: int | None = None
        self._checked = 0.0

    def _load(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.path is None or now - self._checked < POLL_S:
            return self._data
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            self._data, self._mtime = {}, None
            return self._data
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text())
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                pass  # half written: keep the last switches, read again at the next poll
            self._mtime = mtime
        return self._data

    def powered(self) -> bool:
        return bool(self._load().get("power", True))

    def flag(self, what: str) -> bool:
        device = self._load().get(self.name, {})
        return bool(device.get(what, False)) if isinstance(device, dict) else False


def write_control(fake_dir: str | Path, control: dict[str, Any]) -> None:
    """Replace the fakes' switches at once (a rename: a fake never reads half a file)."""
    path = Path(fake_dir) / "control.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(control))
    os.replace(tmp, path)


def read_status(fake_dir: str | Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(fake_dir) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def read_commands(fake_dir: str | Path, name: str) -> int:
    """How many commands have reached the device so far (0 before its first)."""
    try:
        return int((Path(fake_dir) / f"{name}.commands").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class _Status:
    """``<name>.json``: the device's state, at most every 50 ms; ``<name>.commands``: the count of
    commands received, rewritten in place on every one (a test must see the last command too)."""

    def __init__(self, fake_dir: str | None, name: str):
        self.path = None if fake_dir is None else Path(fake_dir) / f"{name}.json"
        self._written = 0.0
        self._fd: int | None = None
        if fake_dir is not None:
            self._fd = os.open(Path(fake_dir) / f"{name}.commands", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.count(0)

    def count(self, n: int) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, f"{n:20d}\n".encode(), 0)  # fixed width: one small write, never torn

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def maybe_write(self, make: Any, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._written < STATUS_S):
            return
        self._written = now
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(make()))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a status file is for tests to look at; the fake goes on without it


class SimArm:
    """arx5-sdk's joint controller on one X5, as seen through ``ArmAdapter``."""

    def __init__(self, name: str, start: np.ndarray, start_gripper: float, fake_dir: str | None = None,
                 seed: int = 0):
        self.name = name
        self.control = SimControl(fake_dir, name)
        self.status = _Status(fake_dir, name)
        self.q = np.clip(np.asarray(start, dtype=np.float64).copy(), X5_POS_MIN, X5_POS_MAX)  # the true pose
        self.g = float(np.clip(start_gripper, 0.0, X5_GRIPPER_WIDTH))
        self.rng = np.random.default_rng(seed)
        self.opened_at: float | None = None
        self.sim_t = 0.0  # simulated up to here (monotonic)
        self.kp_on = False
        self.emergency = False
        self.target = self.q.copy()  # the SDK's interpolator target
        self.g_target = self.g
        self.sdk_out = self.q.copy()  # what the SDK's thread sends (clipped toward the target)
        self.g_out = self.g
        self.motor_cmd = self.q.copy()  # what the motors last received
        self.g_motor = self.g
        self.qd = np.zeros(ARM_JOINTS)
        self.commands = 0  # command() calls that reached the motors
        self.last: ArmSample | None = None  # the SDK's last state from the motors (frozen while silent)

    # -- the device

    def _linked(self) -> bool:
        return self.control.powered() and not self.control.flag("silent")

    def _advance(self) -> None:
        now = time.monotonic()
        steps = int((now - self.sim_t) / ARM_DT)
        if steps <= 0:
            return
        self.sim_t += steps * ARM_DT
        steps = min(steps, int(MAX_CATCH_UP_S / ARM_DT))
        powered, linked = self.control.powered(), self._linked()
        if self.control.flag("motor_error") and linked:
            self.emergency = True  # over-current seen by the SDK: damping until the process ends
        damping = self.emergency or not self.kp_on
        alpha = 1.0 - math.exp(-ARM_DT / ARM_TRACKING_S)
        vmax, gmax = X5_VEL_MAX * ARM_DT, X5_GRIPPER_VEL_MAX * ARM_DT
        before = self.q.copy()
        # np.minimum/np.maximum rather than np.clip, and scalars in plain floats: this loop is the
        # simulators' whole cost (two arms at 500 Hz in the driver process).
        for _ in range(steps):
            before[:] = self.q
            if damping:
                self.sdk_out, self.g_out = self.q.copy(), self.g  # the SDK follows the pose in damping
            else:
                step = np.minimum(np.maximum(self.target - self.sdk_out, -vmax), vmax)
                self.sdk_out = np.minimum(np.maximum(self.sdk_out + step, X5_POS_MIN), X5_POS_MAX)
                gstep = min(max(self.g_target - self.g_out, -gmax), gmax)
                self.g_out = min(max(self.g_out + gstep, 0.0), X5_GRIPPER_WIDTH)
            if linked:
                self.motor_cmd, self.g_motor = self.sdk_out, self.g_out
            if not powered:
                self.q[1] = max(X5_POS_MIN[1], self.q[1] - 0.5 * ARM_DT)  # limp: the shoulder sinks
            elif not damping:  # damping lets the arm rest where it is; else it tracks the motors' command
                self.q += alpha * (self.motor_cmd - self.q)
                self.g += alpha * (self.g_motor - self.g)
        self.qd = (self.q - before) / ARM_DT
        if linked:
            noise = self.rng.normal(0.0, 0.02, ARM_JOINTS)  # motor current is never exactly still
            self.last = ArmSample(pos=self.q.copy(), vel=self.qd.copy(), torque=np.array([0, 3, 2, 0.5, 0, 0]) + noise,
                                  gripper_pos=self.g, gripper_vel=0.0,
                                  gripper_torque=float(self.rng.normal(0.0, 0.01)), timestamp=0.0,
                                  damping=damping)
        self.status.maybe_write(self._status_dict)

    def _status_dict(self) -> dict[str, Any]:
        return {"commands": self.commands, "torque_on": self.control.powered() and self.kp_on and not self.emergency,
                "q": self.q.tolist(), "gripper": self.g, "target": self.target.tolist(), "emergency": self.emergency}

    # -- ArmAdapter

    def open(self) -> None:
        if self.opened_at is not None:
            return
        self.sim_t = time.monotonic()
        if not self._linked():
            raise AdapterError(f"fake {self.name}: None of the motors are initialized. Please check the connection "
                               "or power of the arm.")
        self.opened_at = self.sim_t
        self.kp_on = False  # arx5-sdk starts in damping, its command at the measured pose
        self.target, self.sdk_out, self.motor_cmd = self.q.copy(), self.q.copy(), self.q.copy()
        self.g_target = self.g_out = self.g_motor = self.g
        self.sim_t -= ARM_DT
        self._advance()

    def _opened(self) -> None:
        if self.opened_at is None:
            raise AdapterError(f"fake {self.name} is not open")
        self._advance()

    def read(self) -> ArmSample:
        self._opened()
        assert self.last is not None
        damping = self.emergency or not self.kp_on
        return ArmSample(pos=self.last.pos.copy(), vel=self.last.vel.copy(), torque=self.last.torque.copy(),
                         gripper_pos=self.last.gripper_pos, gripper_vel=self.last.gripper_vel,
                         gripper_torque=self.last.gripper_torque, timestamp=time.monotonic() - self.opened_at,
                         damping=damping)

    def command(self, pos: np.ndarray, gripper_pos: float) -> None:
        self._opened()
        pos = np.asarray(pos, dtype=np.float64)
        if pos.shape != (ARM_JOINTS,):
            raise AdapterError(f"fake {self.name}: JointState needs {ARM_JOINTS} positions, got {pos.shape}")
        self.target, self.g_target = pos.copy(), float(gripper_pos)
        if self._linked():
            self.commands += 1
            self.status.count(self.commands)
        self.status.maybe_write(self._status_dict)

    def hold(self) -> None:
        self._opened()
        if not self.kp_on and np.max(np.abs(self.target - self.last.pos)) > SET_GAIN_MAX_ERROR:
            raise AdapterError(f"fake {self.name}: Cannot set kp to non-zero when the joint pos cmd is far from "
                               "current pos.")
        self.kp_on = True
        self.status.maybe_write(self._status_dict, force=True)

    def close(self) -> None:
        if self.opened_at is not None:
            self._advance()
            self.status.maybe_write(self._status_dict, force=True)


class SimBody:
    """LIFT-mini's ``InterfacesPy``: the lift column and a mecanum base, as seen through ``BodyAdapter``."""

    def __init__(self, geometry: MecanumGeometry, start_height: float = 0.0, fake_dir: str | None = None,
                 name: str = "body", seed: int = 1):
        self.name = name
        self.geometry = geometry
        self.control = SimControl(fake_dir, name)
        self.status = _Status(fake_dir, name)
        self.rng = np.random.default_rng(seed)
        self.height = float(np.clip(start_height, LIFT_MIN, LIFT_MAX))
        self.velocity = np.zeros(3)  # the base's true (vx, vy, wz)
        self.accel = np.zeros(3)
        self.sdk_height: float | None = None  # setpoints held by the SDK until loop() sends them
        self.sdk_chassis = np.zeros(3)
        self.fw_height: float | None = None  # setpoints the firmware has
        self.fw_chassis = np.zeros(3)
        self.opened = False
        self.sim_t = time.monotonic()
        self.commands = 0  # setpoints that reached the firmware with a change
        self.spins = 0
        self.last = BodySample(height=0.0, wheel_vel=np.zeros(4), accel=np.zeros(3))  # zeros until a first loop()

    def _linked(self) -> bool:
        return self.control.powered() and not self.control.flag("silent")

    def _advance(self) -> None:
        now = time.monotonic()
        steps = int((now - self.sim_t) / BODY_DT)
        if steps <= 0:
            return
        self.sim_t += steps * BODY_DT
        steps = min(steps, int(MAX_CATCH_UP_S / BODY_DT))
        powered = self.control.powered()
        stalled = self.control.flag("motor_error")
        for _ in range(steps):
            before = self.velocity.copy()
            if not powered:  # no motor power: the column sinks, the base rolls out
                self.height = max(LIFT_MIN, self.height - LIFT_FALL_SPEED * BODY_DT)
                self.velocity *= 0.9
            else:
                if self.fw_height is not None and not stalled:
                    dh = min(max(self.fw_height - self.height, -LIFT_SPEED * BODY_DT), LIFT_SPEED * BODY_DT)
                    self.height = min(max(self.height + dh, LIFT_MIN), LIFT_MAX)
                self.velocity += np.minimum(np.maximum(self.fw_chassis - self.velocity, -BASE_ACCEL * BODY_DT),
                                            BASE_ACCEL * BODY_DT)
            self.accel = (self.velocity - before) / BODY_DT

    def _status_dict(self) -> dict[str, Any]:
        return {"commands": self.commands, "spins": self.spins, "torque_on": self.control.powered(),
                "height": self.height, "height_setpoint": self.fw_height, "velocity": self.velocity.tolist(),
                "chassis_setpoint": self.fw_chassis.tolist()}

    # -- BodyAdapter

    def open(self) -> None:
        self.opened = True  # like the binding (as far as its header tells), opening never checks the bus
        self._advance()

    def _opened(self) -> None:
        if not self.opened:
            raise AdapterError(f"fake {self.name} is not open")

    def set_height(self, height_m: float) -> None:
        self._opened()
        self.sdk_height = float(height_m)

    def set_chassis(self, vx: float, vy: float, wz: float) -> None:
        self._opened()
        self.sdk_chassis = np.array([vx, vy, wz], dtype=np.float64)

    def spin(self) -> None:
        self._opened()
        self._advance()
        self.spins += 1
        if self._linked():
            if self.sdk_height is not None:
                height = float(np.clip(self.sdk_height, LIFT_MIN, LIFT_MAX))
                if height != self.fw_height:
                    self.commands += 1
                self.fw_height = height
            if not np.array_equal(self.sdk_chassis, self.fw_chassis):
                self.commands += 1
                self.fw_chassis = self.sdk_chassis.copy()
            self.status.count(self.commands)
            wheels = self.geometry.wheel_speeds(*self.velocity) + self.rng.normal(0.0, 0.002, 4)
            accel = np.array([self.accel[0], self.accel[1], 9.81]) + self.rng.normal(0.0, 0.01, 3)
            self.last = BodySample(height=self.height, wheel_vel=wheels, accel=accel)
        self.status.maybe_write(self._status_dict)

    def read(self) -> BodySample:
        self._opened()
        return BodySample(height=self.last.height, wheel_vel=self.last.wheel_vel.copy(),
                          accel=self.last.accel.copy())

    def close(self) -> None:
        if self.opened:
            self._advance()
            self.status.maybe_write(self._status_dict, force=True)
