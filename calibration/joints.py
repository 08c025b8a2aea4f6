"""Joint calibration from recorded samples: SO-101 (lerobot's format), ALOHA grippers, PiPer zero.

Each calibration is a pure function over recorded samples (rows of raw readings, one column per
joint) plus a writer. Recording is someone else's job (a driver, a bus script, a CSV): keeping
the arithmetic pure lets a test check it without hardware, and lets a person redo it from a
saved recording.

The reference poses must be held still while recorded: the spread of the samples there is the
residual we report and refuse on (a joint that moved while "holding the middle pose" would put
its range off-centre, the kind of mistake that makes joints reversed or jumping later).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- SO-101 (Feetech STS3215)

SO101_MOTORS: dict[str, int] = {  # name -> bus id, as lerobot's SO follower/leader declare them
    "shoulder_pan": 1, "shoulder_lift": 2, "elbow_flex": 3, "wrist_flex": 4, "wrist_roll": 5, "gripper": 6,
}
SO101_FULL_TURN = ("wrist_roll",)  # lerobot records no range for it: 0..4095
STS3215_RESOLUTION = 4096
MOTOR_CALIBRATION_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")
DEFAULT_MAX_HOLD_SPREAD_TICKS = 20.0  # about 1.8 degrees on a 4096-tick servo
DEFAULT_MIN_RANGE_TICKS = 200  # about 18 degrees: less means the joint was not moved through its range


class JointCalibrationError(ValueError):
    """Recorded samples that cannot give a calibration; the message says which joint and why."""


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
    middle, sweep = _samples(middle, names, "middle"), _samples(sweep, names, "sweep")
    spread = middle.std(axis=0)
    _check_hold(spread, names, max_hold_spread, "ticks", "the middle pose")
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


# --------------------------------------------------------------------------- ALOHA grippers


@dataclass(frozen=True)
class GripperCalibration:
    """A linear map from a gripper's raw reading to its opening (metres between the fingers)."""

    raw_open: float
    raw_closed: float
    open_m: float
    closed_m: float = 0.0

    def opening(self, raw: float | np.ndarray) -> float | np.ndarray:
        return self.closed_m + (np.asarray(raw, np.float64) - self.raw_closed) * self._slope()

    def raw(self, opening_m: float | np.ndarray) -> float | np.ndarray:
        return self.raw_closed + (np.asarray(opening_m, np.float64) - self.closed_m) / self._slope()

    def normalized(self, raw: float | np.ndarray) -> float | np.ndarray:
        """0 closed, 1 open: how ALOHA maps a master gripper onto a puppet gripper."""
        return (np.asarray(raw, np.float64) - self.raw_closed) / (self.raw_open - self.raw_closed)

    def _slope(self) -> float:
        return (self.open_m - self.closed_m) / (self.raw_open - self.raw_closed)


def calibrate_gripper(open_samples: np.ndarray, closed_samples: np.ndarray, open_m: float, closed_m: float = 0.0,
                      max_hold_spread: float = DEFAULT_MAX_HOLD_SPREAD_TICKS,
                      min_travel: float = DEFAULT_MIN_RANGE_TICKS) -> tuple[GripperCalibration, float]:
    """A gripper's map from raw readings held fully open and fully closed, and the larger spread
    of the two holds (the residual, in the readings' unit). ``open_m`` is the measured opening."""
    o = _column(open_samples, "open")
    c = _column(closed_samples, "closed")
    spread = max(float(o.std()), float(c.std()))
    _check_hold(np.array([o.std(), c.std()]), ["open", "closed"], max_hold_spread, "units", "the gripper")
    raw_open, raw_closed = float(np.median(o)), float(np.median(c))
    if abs(raw_open - raw_closed) < min_travel:
        raise JointCalibrationError(f"open ({raw_open:g}) and closed ({raw_closed:g}) readings differ by less than "
                                    f"{min_travel:g}; was the gripper really opened and closed?")
    if not open_m > closed_m >= 0:
        raise JointCalibrationError(f"the open width {open_m} m must exceed the closed width {closed_m} m")
    return GripperCalibration(raw_open, raw_closed, float(open_m), float(closed_m)), spread


def dynamixel_ticks_to_rad(ticks: float | np.ndarray, resolution: int = 4096) -> float | np.ndarray:
    """Dynamixel position ticks to the joint angle ALOHA's code uses (2048 is zero)."""
    return (np.asarray(ticks, np.float64) - resolution // 2) * (2 * np.pi / resolution)


# --------------------------------------------------------------------------- PiPer zero

PIPER_ZERO_PROCEDURE = (
    "PiPer zero: (1) disable the arm and move every joint by hand to its mechanical zero (the "
    "alignment marks on each joint); (2) record the joint readings there ('armada calibrate joints "
    "piper-zero'): they are this file's offsets, the amount the firmware's zero is off; (3) to fix "
    "it in the arm itself, keep the arm at the marks and send piper_sdk's "
    "JointConfig(joint_num=7, set_zero=0xAE) (all joints; 1-6 for one), and "
    "GripperCtrl(0, 1000, 0x00, 0xAE) for the gripper, then power-cycle and record again: the "
    "offsets should now be near zero. Until then, subtract the offsets from readings."
)


@dataclass(frozen=True)
class PiperZero:
    joint_names: list[str]
    offsets_rad: np.ndarray  # reading at the mechanical zero: corrected = reading - offset
    hold_spread_rad: float
    procedure: str = PIPER_ZERO_PROCEDURE

    def correct(self, reading_rad: np.ndarray) -> np.ndarray:
        return np.asarray(reading_rad, np.float64) - self.offsets_rad


def calibrate_piper_zero(samples: np.ndarray, joint_names: Sequence[str],
                         max_hold_spread_rad: float = np.radians(0.2),
                         max_offset_rad: float = np.radians(10.0)) -> PiperZero:
    """Offsets from joint readings (radians) recorded with the arm held at its mechanical zero.

    An offset beyond ``max_offset_rad`` is refused: it means the arm was not at the marks (or a
    joint is a full turn off), not a firmware zero slightly off.
    """
    s = _samples(samples, joint_names, "zero pose")
    spread = s.std(axis=0)
    _check_hold(spread, joint_names, max_hold_spread_rad, "rad", "the zero pose")
    offsets = np.median(s, axis=0)
    far = [f"{n} ({np.degrees(o):.1f} deg)" for n, o in zip(joint_names, offsets) if abs(o) > max_offset_rad]
    if far:
        raise JointCalibrationError(f"readings at the zero pose are far from zero: {', '.join(far)} (limit "
                                    f"{np.degrees(max_offset_rad):.0f} deg); is the arm at the alignment marks?")
    return PiperZero(list(joint_names), offsets, float(spread.max()))


# --------------------------------------------------------------------------- helpers


def _samples(samples: np.ndarray, names: Sequence[str], what: str) -> np.ndarray:
    a = np.asarray(samples, np.float64)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise JointCalibrationError(f"{what}: expected samples of shape (n, {len(names)}) for {list(names)}, "
                                    f"got {a.shape}")
    if len(a) < 2:
        raise JointCalibrationError(f"{what}: need at least 2 samples, got {len(a)}")
    if not np.all(np.isfinite(a)):
        raise JointCalibrationError(f"{what}: samples contain NaN or infinity (a failed read?)")
    return a


def _column(samples: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(samples, np.float64).reshape(-1)
    if len(a) < 2 or not np.all(np.isfinite(a)):
        raise JointCalibrationError(f"{what}: need at least 2 finite samples, got {len(a)}")
    return a


def _check_hold(spread: np.ndarray, names: Sequence[str], limit: float, unit: str, pose: str) -> None:
    moving = [f"{n} ({s:.3g} {unit})" for n, s in zip(names, spread) if s > limit]
    if moving:
        raise JointCalibrationError(f"moved while {pose} was being recorded: {', '.join(moving)} "
                                    f"(limit {limit:.3g} {unit}); hold still and record again")
