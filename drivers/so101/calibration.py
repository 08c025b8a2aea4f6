"""SO-101 (Feetech STS3215) joint calibration in lerobot's own format.

`armada calibrate joints so101` computes lerobot's homing offsets and ranges from recordings; the
result file carries lerobot's motor map as it is, and lerobot's own JSON (what an existing lerobot
user already has) loads unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from armada.calibration.joint_kinds import JointCalibrationKind
from armada.calibration.joints import DEFAULT_MAX_HOLD_SPREAD_TICKS, DEFAULT_MIN_RANGE_TICKS, JointCalibrationError, \
    check_hold, samples

SO101_MOTORS: dict[str, int] = {  # name -> bus id, as lerobot's SO follower/leader declare them
    "shoulder_pan": 1, "shoulder_lift": 2, "elbow_flex": 3, "wrist_flex": 4, "wrist_roll": 5, "gripper": 6,
}
SO101_FULL_TURN = ("wrist_roll",)  # lerobot records no range for it: 0..4095
STS3215_RESOLUTION = 4096
MOTOR_CALIBRATION_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")
MOTOR_CALIBRATION_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")


@dataclass(frozen=True)
class MotorCalibration:
    """One motor, field for field as lerobot's ``MotorCalibration`` (lerobot/motors/motors_bus.py)."""

    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int


@dataclass(frozen=True)
class So101Calibration:
    motors: dict[str, MotorCalibration]
    hold_spread_ticks: float  # largest std of any motor while the middle pose was held

    def to_lerobot(self) -> dict[str, dict[str, int]]:
        return {name: asdict(m) for name, m in self.motors.items()}


def calibrate_so101(middle: np.ndarray, sweep: np.ndarray, names: Sequence[str] = tuple(SO101_MOTORS),
                    ids: Mapping[str, int] = SO101_MOTORS, full_turn: Sequence[str] = SO101_FULL_TURN,
                    resolution: int = STS3215_RESOLUTION, max_hold_spread: float = DEFAULT_MAX_HOLD_SPREAD_TICKS,
                    min_range: int = DEFAULT_MIN_RANGE_TICKS) -> So101Calibration:
    """lerobot's SO-101 calibration from raw Present_Position samples (homing offset 0).

    ``middle``: (n, motors) raw positions while the arm is held at the middle of its range.
    ``sweep``: (m, motors) raw positions while each joint is moved through its whole range.
    As lerobot does it on Feetech servos (Present = Actual - Homing_Offset): the offset puts the
    middle pose at half a turn, ``homing_offset = middle - (resolution - 1) // 2``, and the range
    is the min and max of the sweep after that offset; full-turn motors get the whole turn.
    """
    middle, sweep = samples(middle, names, "middle"), samples(sweep, names, "sweep")
    spread = middle.std(axis=0)
    check_hold(spread, names, max_hold_spread, "ticks", "the middle pose")
    half = (resolution - 1) // 2
    motors = {}
    for j, name in enumerate(names):
        offset = int(round(float(np.median(middle[:, j])))) - half
        if abs(offset) > half:  # Feetech stores the offset in 11 bits plus a sign
            raise JointCalibrationError(f"{name}: homing offset {offset} does not fit the servo (|offset| <= {half})")
        if name in full_turn:
            lo, hi = 0, resolution - 1
        else:
            homed = sweep[:, j].astype(np.int64) - offset
            lo, hi = int(homed.min()), int(homed.max())
            if lo < 0 or hi > resolution - 1:
                raise JointCalibrationError(f"{name}: the sweep goes {lo}..{hi} after homing, outside "
                                            f"0..{resolution - 1}; the middle pose was not near the middle of "
                                            "the range")
            if hi - lo < min_range:
                raise JointCalibrationError(f"{name}: moved only {hi - lo} ticks during the sweep (need {min_range}); "
                                            "move every joint through its whole range")
        motors[name] = MotorCalibration(int(ids[name]), 0, offset, lo, hi)
    return So101Calibration(motors, float(spread.max()))


def write_lerobot_calibration(path: str | Path, calibration: So101Calibration) -> Path:
    """The file lerobot reads (``~/.cache/huggingface/lerobot/calibration/robots/<type>/<id>.json``):
    a JSON object keyed by motor name, each with exactly lerobot's five integer fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_lerobot(), indent=4) + "\n", encoding="utf-8")
    return path


def read_lerobot_calibration(data: Mapping[str, object], where: str = "<calibration>") -> dict[str, MotorCalibration]:
    """Motor calibrations from lerobot's JSON object; raises JointCalibrationError naming the key."""
    if not isinstance(data, Mapping) or not data:
        raise JointCalibrationError(f"{where}: expected an object keyed by motor name")
    motors = {}
    for name, fields in data.items():
        if not isinstance(fields, Mapping):
            raise JointCalibrationError(f"{where}: {name}: expected an object with {list(MOTOR_CALIBRATION_FIELDS)}")
        missing = [f for f in MOTOR_CALIBRATION_FIELDS if f not in fields]
        extra = [f for f in fields if f not in MOTOR_CALIBRATION_FIELDS]
        if missing or extra:
            raise JointCalibrationError(f"{where}: {name}: " + (f"missing {missing} " if missing else "")
                                        + (f"unknown {extra}" if extra else ""))
        bad = [f for f in MOTOR_CALIBRATION_FIELDS if not isinstance(fields[f], int) or isinstance(fields[f], bool)]
        if bad:
            raise JointCalibrationError(f"{where}: {name}: fields {bad} must be integers")
        m = MotorCalibration(**{f: int(fields[f]) for f in MOTOR_CALIBRATION_FIELDS})
        if m.range_min >= m.range_max:
            raise JointCalibrationError(f"{where}: {name}: range_min {m.range_min} must be below "
                                        f"range_max {m.range_max}")
        motors[str(name)] = m
    return motors


def so101_values(cal: So101Calibration, robot_id: str | None = None) -> dict[str, Any]:
    return {"embodiment": "so101", **({"robot_id": robot_id} if robot_id else {}), "motors": cal.to_lerobot()}


def _load(path: Path, values: dict[str, Any], residual: dict[str, Any]) -> dict[str, MotorCalibration]:
    return read_lerobot_calibration(values.get("motors"), f"{path}: values.motors")


def _load_native(path: Path, doc: dict[str, Any]) -> dict[str, MotorCalibration]:
    return read_lerobot_calibration(doc, str(path))


def add_arguments(so: argparse.ArgumentParser) -> None:
    from armada.calibration.cli import out_args

    so.add_argument("--middle", type=Path, required=True, help="CSV of raw positions held at the middle of the range")
    so.add_argument("--sweep", type=Path, required=True, help="CSV of raw positions while moving every joint")
    so.add_argument("--lerobot-json", type=Path, default=None, help="also write lerobot's JSON here")
    so.add_argument("--robot-id", default=None, help="the lerobot robot id this calibration is for")
    out_args(so)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.cli import CalibrateError, read_columns, write
    from armada.calibration.results import CalibrationRecord, Residual

    names, middle = read_columns(args.middle)
    names2, sweep = read_columns(args.sweep)
    if names != names2:
        raise CalibrateError(f"{args.middle} has columns {names} but {args.sweep} has {names2}")
    unknown = [n for n in names if n not in SO101_MOTORS]
    if unknown:
        raise CalibrateError(f"unknown SO-101 motors {unknown}; the motors are {list(SO101_MOTORS)}")
    cal = calibrate_so101(middle, sweep, names)
    for name, m in cal.motors.items():
        say(f"{name:14s} id {m.id}  homing_offset {m.homing_offset:6d}  range {m.range_min:5d} .. {m.range_max:5d}")
    record = CalibrationRecord(
        "joint_calibration", "lerobot SO-101: half-turn homing at the middle pose, range = min/max of the sweep",
        {"hold_spread": Residual(cal.hold_spread_ticks, "ticks", DEFAULT_MAX_HOLD_SPREAD_TICKS)},
        so101_values(cal, args.robot_id), {"middle_samples": len(middle), "sweep_samples": len(sweep)},
        args.name)
    write(args.out, record, args.force, say)
    if args.lerobot_json is not None:
        say(f"wrote {write_lerobot_calibration(args.lerobot_json, cal)} (lerobot's format)")
    return 0


JOINT_CALIBRATION = JointCalibrationKind(
    name="so101", command="so101", help="SO-101 homing offsets and ranges (lerobot's calibration)",
    load=_load, add_arguments=add_arguments, run=run, load_native=_load_native)
