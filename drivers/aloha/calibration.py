"""ALOHA gripper calibration: a linear map from each gripper's raw reading to its opening.

`armada calibrate joints aloha-gripper` records (or reads) the readings held fully open and fully
closed; the ALOHA driver maps a leader gripper onto a follower through ``normalized``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from armada.calibration.cli import CalibrateError, live_driver_args, out_args, read_columns, record_hold, require, write
from armada.calibration.joint_kinds import JointCalibrationKind
from armada.calibration.joints import DEFAULT_MAX_HOLD_SPREAD_TICKS, DEFAULT_MIN_RANGE_TICKS, JointCalibrationError, \
    check_hold, column

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
    o = column(open_samples, "open")
    c = column(closed_samples, "closed")
    spread = max(float(o.std()), float(c.std()))
    check_hold(np.array([o.std(), c.std()]), ["open", "closed"], max_hold_spread, "units", "the gripper")
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


def gripper_values(grippers: dict[str, GripperCalibration], unit: str) -> dict[str, Any]:
    return {"embodiment": "aloha_gripper", "raw_unit": unit,
            "grippers": {n: {"raw_open": g.raw_open, "raw_closed": g.raw_closed, "open_m": g.open_m,
                             "closed_m": g.closed_m} for n, g in grippers.items()}}


def _load(path: Path, values: dict[str, Any], residual: dict[str, Any]) -> dict[str, GripperCalibration]:
    return _grippers(path, values.get("grippers"))


def _grippers(path: Path | None, data: Any) -> dict[str, GripperCalibration]:
    if not isinstance(data, dict) or not data:
        raise _file_error(path, "values.grippers", "must map gripper names to their calibration")
    out = {}
    for name, g in data.items():
        key = f"values.grippers.{name}"
        fields = ("raw_open", "raw_closed", "open_m", "closed_m")
        if not isinstance(g, dict) or any(not isinstance(g.get(f), (int, float)) for f in fields):
            raise _file_error(path, key, f"needs numbers {list(fields)}")
        cal = GripperCalibration(*(float(g[f]) for f in fields))
        if cal.raw_open == cal.raw_closed or not cal.open_m > cal.closed_m:
            raise _file_error(path, key, "open and closed must differ, and open_m exceed closed_m")
        out[str(name)] = cal
    return out


def _file_error(path: Path | None, key: str, reason: str) -> Exception:
    from armada.calibration.results import CalibrationFileError

    return CalibrationFileError(path, key, reason)


def add_arguments(grip: argparse.ArgumentParser) -> None:
    grip.add_argument("--open", type=Path, help="CSV, one column per gripper, held fully open")
    grip.add_argument("--closed", type=Path, help="CSV, one column per gripper, held fully closed")
    grip.add_argument("--open-width", required=True,
                      help="measured opening when open, metres: one number, or NAME=M,NAME=M per gripper")
    grip.add_argument("--unit", default="ticks", help="unit of the readings (ticks, rad)")
    grip.add_argument("--max-spread", type=float, default=None, help="refuse when a hold varies more (reading units)")
    live_driver_args(grip)
    out_args(grip)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.results import CalibrationRecord, Residual

    max_spread = args.max_spread if args.max_spread is not None else (
        DEFAULT_MAX_HOLD_SPREAD_TICKS if args.unit == "ticks" else 0.02)
    names, opened, closed = _gripper_recordings(args, say)
    widths = _widths(args.open_width, names)
    grippers, spread = {}, 0.0
    for j, name in enumerate(names):
        cal, s = calibrate_gripper(opened[:, j], closed[:, j], widths[name], max_hold_spread=max_spread,
                                   min_travel=0.0 if args.unit != "ticks" else 200)
        grippers[name], spread = cal, max(spread, s)
        say(f"{name}: open {cal.raw_open:g}, closed {cal.raw_closed:g} {args.unit} -> 0 .. {cal.open_m:g} m")
    record = CalibrationRecord("joint_calibration", "ALOHA grippers: linear map between held open and closed readings",
                               {"hold_spread": Residual(spread, args.unit, max_spread)},
                               gripper_values(grippers, args.unit),
                               {"open_samples": len(opened), "closed_samples": len(closed)}, args.name or args.driver)
    write(args.out, record, args.force, say)
    return 0


def _gripper_recordings(args, say) -> tuple[list[str], np.ndarray, np.ndarray]:
    if args.live is not None:
        names = _gripper_joints(args)
        opened = record_hold(args, names, "hold every gripper fully OPEN", say)
        closed = record_hold(args, names, "hold every gripper fully CLOSED", say)
        return names, opened, closed
    names, opened = read_columns(require(args.open, "--open (or --live)"))
    names2, closed = read_columns(require(args.closed, "--closed"))
    if names != names2:
        raise CalibrateError(f"{args.open} has columns {names} but {args.closed} has {names2}")
    return names, opened, closed


def _gripper_joints(args) -> list[str]:
    from armada.runtime.config import load_cell

    cell = load_cell(args.live, args.run_dir)
    drv = cell.driver(args.driver)
    emb = cell.embodiment(drv)
    names = [j.name for g in emb.groups if g.mode == "gripper_position" for j in g.joints]
    if not names:
        raise CalibrateError(f"driver {drv.name} has no gripper_position group")
    return names


def _widths(spec: str, names: list[str]) -> dict[str, float]:
    try:
        if "=" not in spec:
            return {n: float(spec) for n in names}
        widths = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
    except ValueError:
        raise CalibrateError(f"--open-width {spec!r}: expected metres, or NAME=M,NAME=M") from None
    missing = [n for n in names if n not in widths]
    if missing:
        raise CalibrateError(f"--open-width has no width for {missing}")
    return widths


JOINT_CALIBRATION = JointCalibrationKind(
    name="aloha_gripper", command="aloha-gripper", help="gripper open/closed readings to opening in metres",
    load=_load, add_arguments=add_arguments, run=run)
