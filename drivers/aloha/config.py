"""The ALOHA backend's cell settings (pydantic, extra keys forbidden) and the plain settings the
backend gets from them; imported by the plugin (when cells load) and by the bench."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JOINT_CALIBRATION_KIND = "aloha_gripper"
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
TICKS_PER_RAD = 4096 / (2 * math.pi)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ArmIds(_Strict):
    """Servo IDs of one arm (Interbotix's vx300s / wx250s defaults). A shadow is the second motor of
    the shoulder or elbow, linked to its primary by Secondary_ID; None for an arm without one."""

    waist: int = Field(default=1, ge=0, le=252)
    shoulder: int = Field(default=2, ge=0, le=252)
    shoulder_shadow: int | None = Field(default=3, ge=0, le=252)
    elbow: int = Field(default=4, ge=0, le=252)
    elbow_shadow: int | None = Field(default=5, ge=0, le=252)
    forearm_roll: int = Field(default=6, ge=0, le=252)
    wrist_angle: int = Field(default=7, ge=0, le=252)
    wrist_rotate: int = Field(default=8, ge=0, le=252)
    gripper: int = Field(default=9, ge=0, le=252)

    @model_validator(mode="after")
    def _unique(self) -> "ArmIds":
        ids = [v for v in self.model_dump().values() if v is not None]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"servo IDs must be unique on an arm's bus; repeated: {dupes}")
        return self


class GripperMap(_Strict):
    """A gripper's raw reading (ticks) fully open and fully closed, and the opening (m) there."""

    raw_open: float
    raw_closed: float
    open_m: float = Field(ge=0)
    closed_m: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _distinct(self) -> "GripperMap":
        if abs(self.raw_open - self.raw_closed) < 1 or not self.open_m > self.closed_m:
            raise ValueError("raw_open and raw_closed must differ, and open_m must exceed closed_m")
        return self


def _act_gripper(open_rad: float, closed_rad: float) -> GripperMap:
    # ALOHA 1 / ACT (tonyzhaozh/act constants.py): *_GRIPPER_JOINT_OPEN/CLOSE are the gripper motor's
    # angle (rad, 2048 ticks = 0) fully open / closed; PUPPET_GRIPPER_POSITION_OPEN/CLOSE (0.058 m,
    # 0.01844 m) the finger position there. Measure yours: `armada calibrate joints aloha-gripper`.
    return GripperMap(raw_open=2048 + open_rad * TICKS_PER_RAD, raw_closed=2048 + closed_rad * TICKS_PER_RAD,
                      open_m=0.058, closed_m=0.01844)


ACT_FOLLOWER_GRIPPER = _act_gripper(1.4910, -0.6213)  # PUPPET_GRIPPER_JOINT_OPEN / _CLOSE
ACT_LEADER_GRIPPER = _act_gripper(0.3083, -0.6842)  # MASTER_GRIPPER_JOINT_OPEN / _CLOSE
# ALOHA 2 (Interbotix's aloha package) uses other grippers and constants: follower 1.6214 / 0.6197 rad,
# leader 0.8298 / -0.0552 rad (open / close). On such a robot set follower_gripper / leader_gripper
# in the cell, or better, calibrate.


class AlohaBackendConfig(_Strict):
    """ALOHA: two ViperX 300 S followers (commanded) and optionally two WidowX 250 S leaders (read)."""

    kind: Literal["aloha"] = "aloha"
    # Serial ports: ALOHA's udev names (/dev/ttyDXL_puppet_left, ...) on a real robot; the fake's
    # symlinks ({run_dir}/ttyDXL_puppet_left) against `armada fake aloha`.
    left_follower_port: str
    right_follower_port: str
    left_leader_port: str | None = None
    right_leader_port: str | None = None
    baud: Literal[57_600, 115_200, 1_000_000, 2_000_000, 3_000_000, 4_000_000] = 1_000_000
    follower_ids: ArmIds = ArmIds()
    leader_ids: ArmIds = ArmIds()
    check_models: bool = True  # refuse servos whose model number is not the arm's
    # Goal_Current of the grippers in current-based position mode (2.69 mA units on an XM430-W350:
    # 300 is about 0.8 A of its 3.2 A limit): how hard a closed gripper squeezes.
    gripper_current: int = Field(default=300, ge=1, le=1193)
    # No complete reading (positions and error status of both followers) for this long: a fault.
    stale_s: float = Field(default=0.2, gt=0, le=1)
    # The USB adapters' latency timer the packet timeouts assume (ALOHA's udev rule sets 1 ms); an
    # adapter set higher is refused at connect.
    latency_timer_ms: float = Field(default=1.0, ge=0.5, le=16)
    # Teleop and recording: read the leaders every tick and publish them in the state's device map:
    # "leader" (14 values in the followers' layout and units, each gripper mapped through the two
    # grippers' calibrations) or None and "leader_error". The leaders are then optional: one that is
    # missing or unplugged is reported there and reopened when it is back; the followers run on.
    leaders_in_state: bool = False
    # clear_fault reboots servos whose hardware error made them cut their own torque (never others).
    reboot_on_recover: bool = False
    # Used for grippers the driver's joint_calibration file does not name.
    follower_gripper: GripperMap = ACT_FOLLOWER_GRIPPER
    leader_gripper: GripperMap = ACT_LEADER_GRIPPER

    @model_validator(mode="after")
    def _leaders(self) -> "AlohaBackendConfig":
        if (self.left_leader_port is None) != (self.right_leader_port is None):
            raise ValueError("give both left_leader_port and right_leader_port, or neither")
        if self.leaders_in_state and self.left_leader_port is None:
            raise ValueError("leaders_in_state needs left_leader_port and right_leader_port")
        ports = [p for p in (self.left_follower_port, self.right_follower_port, self.left_leader_port,
                             self.right_leader_port) if p is not None]
        if len(set(ports)) != len(ports):
            raise ValueError(f"every arm has its own serial port; got {ports}")
        return self


def gripper_calibrations(ctx: Any) -> dict[str, dict[str, float]]:
    """Each gripper's map: from the driver's joint_calibration file (names ``left_gripper``,
    ``right_gripper``, ``left_leader_gripper``, ``right_leader_gripper``) where it has one, else the
    cell's ``follower_gripper`` / ``leader_gripper``."""
    cfg: AlohaBackendConfig = ctx.driver.backend
    named: dict[str, Any] = {}
    if ctx.driver.joint_calibration is not None:
        from armada.calibration.results import load_joint_calibration
        from armada.runtime.config import DEFAULT_CELL

        file = Path(ctx.driver.joint_calibration).expanduser()
        if not file.is_absolute():
            file = (ctx.cell_dir if ctx.cell_dir is not None else DEFAULT_CELL.parent) / file
        named = load_joint_calibration(file, expect_kind=JOINT_CALIBRATION_KIND)
    out = {}
    for side in ("left", "right"):
        for key, name, default in ((side, f"{side}_gripper", cfg.follower_gripper),
                                   (f"{side}_leader", f"{side}_leader_gripper", cfg.leader_gripper)):
            cal = named.get(name)
            out[key] = ({"raw_open": cal.raw_open, "raw_closed": cal.raw_closed, "open_m": cal.open_m,
                         "closed_m": cal.closed_m} if cal is not None else default.model_dump())
    return out


def settings(ctx: Any) -> dict[str, Any]:
    """The backend's plain settings (``drivers.aloha.backend.AlohaSettings`` fields)."""
    b: AlohaBackendConfig = ctx.driver.backend
    leaders = {} if b.left_leader_port is None else {"left": b.left_leader_port, "right": b.right_leader_port}
    return {"follower_ports": {"left": b.left_follower_port, "right": b.right_follower_port},
            "leader_ports": leaders, "baud": b.baud, "follower_ids": b.follower_ids.model_dump(),
            "leader_ids": b.leader_ids.model_dump(), "check_models": b.check_models,
            "gripper_current": b.gripper_current, "stale_s": b.stale_s, "latency_timer_ms": b.latency_timer_ms,
            "leaders_in_state": b.leaders_in_state, "reboot_on_recover": b.reboot_on_recover,
            "grippers": gripper_calibrations(ctx),
            # The embodiment's arm-joint ranges (rad), checked at connect against the servos' own limits.
            "arm_ranges": {side: [[float(ctx.embodiment.lower[k * 7 + j]), float(ctx.embodiment.upper[k * 7 + j])]
                                  for j in range(len(ARM_JOINTS))] for k, side in enumerate(("left", "right"))}}
