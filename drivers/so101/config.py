"""The SO-101 backend's cell settings (pydantic, extra keys forbidden) and the plain settings the
backend gets from them; imported by the plugin (when cells load) and by the bench."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JOINT_CALIBRATION_KIND = "so101"  # pyproject's armada.joint_calibrations: drivers.so101.calibration
JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
ARM_JOINTS = JOINTS[:-1]
# lerobot's DEGREES normalisation (motors_bus.py): deg = (raw - mid) * 360 / (resolution - 1), mid the
# middle of the calibrated range; so rad = (raw - mid) * 2 pi / 4095 on an STS3215.
RAD_PER_TICK = 2 * math.pi / 4095


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class So101BackendConfig(_Strict):
    """SO-101: a follower arm (commanded) and optionally its leader arm (read, for teleop).

    The follower's calibration is the driver's ``joint_calibration``: lerobot's own JSON
    (``~/.cache/huggingface/lerobot/calibration/robots/so_follower/<id>.json``) or a file from
    `armada calibrate joints so101`. The leader's is ``leader_calibration``, the same way."""

    kind: Literal["so101"] = "so101"
    # The follower's serial port (a CH343 / Feetech URT-1 adapter: /dev/ttyACM0, better a udev name);
    # the fake's symlink ({run_dir}/ttySO101_follower) against `armada fake so101`.
    port: str
    leader_port: str | None = None
    leader_calibration: str | None = None  # lerobot's teleoperators/so_leader/<id>.json, or armada's
    # No complete reading (positions and status of every servo) for this long: a fault.
    stale_s: float = Field(default=0.2, gt=0, le=1)
    # Teleop and recording: read the leader every tick and publish it in the state's device map:
    # "leader" (the follower's units) or None and "leader_error". The leader is then optional: one
    # missing, silent or unplugged is reported there and reopened when it is back; the follower runs on.
    leader_in_state: bool = False
    # Position-loop gains written at connect to servos found with torque off (lerobot's SO follower
    # defaults: P 16, I 0, D 32, where the servos' own default P is 32 and shakes).
    p_coefficient: int = Field(default=16, ge=0, le=255)
    i_coefficient: int = Field(default=0, ge=0, le=255)
    d_coefficient: int = Field(default=32, ge=0, le=255)


def _resolve(path: str, ctx: Any) -> Path:
    from armada.runtime.config import DEFAULT_CELL

    file = Path(path).expanduser()
    if not file.is_absolute():
        file = (ctx.cell_dir if ctx.cell_dir is not None else DEFAULT_CELL.parent) / file
    return file


def load_calibration(path: str, ctx: Any, what: str) -> dict[str, dict[str, int]]:
    """lerobot's motor map {name: {id, drive_mode, homing_offset, range_min, range_max}} from a
    lerobot JSON or an armada so101 file; ValueError naming the file and what is wrong."""
    from dataclasses import asdict

    from armada.calibration.results import load_joint_calibration

    motors = load_joint_calibration(_resolve(path, ctx), expect_kind=JOINT_CALIBRATION_KIND)
    names = sorted(motors)
    if names != sorted(JOINTS):
        raise ValueError(f"SO-101 {what} calibration {path}: motors {names}, expected {sorted(JOINTS)}")
    return {name: asdict(motors[name]) for name in JOINTS}


def settings(ctx: Any) -> dict[str, Any]:
    """The backend's plain settings (``drivers.so101.backend.So101Settings`` fields)."""
    b: So101BackendConfig = ctx.driver.backend
    if ctx.driver.joint_calibration is None:
        raise ValueError("SO-101: the driver needs a joint_calibration: lerobot's calibration JSON of this arm "
                         "(lerobot-calibrate) or `armada calibrate joints so101`; without it the servos' "
                         "ticks have no joint angle")
    if b.leader_port is not None and b.leader_calibration is None:
        raise ValueError("SO-101: leader_port needs leader_calibration (lerobot's so_leader JSON)")
    if b.leader_in_state and b.leader_port is None:
        raise ValueError("SO-101: leader_in_state needs leader_port")
    return {"port": b.port, "calibration": load_calibration(ctx.driver.joint_calibration, ctx, "follower"),
            "leader_port": b.leader_port,
            "leader_calibration": (load_calibration(b.leader_calibration, ctx, "leader")
                                   if b.leader_calibration is not None else None),
            "stale_s": b.stale_s, "leader_in_state": b.leader_in_state,
            "pid": [b.p_coefficient, b.i_coefficient, b.d_coefficient]}


def calibrated_ranges(calibration: dict[str, dict[str, int]]) -> dict[str, tuple[float, float]]:
    """Each arm joint's calibrated range in rad (symmetric about the range's middle, as lerobot's
    DEGREES mode puts 0 there); the gripper's is 0..1 (fraction of its calibrated range)."""
    out = {}
    for name in ARM_JOINTS:
        c = calibration[name]
        half = (c["range_max"] - c["range_min"]) / 2 * RAD_PER_TICK
        out[name] = (-half, half)
    out["gripper"] = (0.0, 1.0)
    return out
