"""PiPer zero calibration: the joint readings at the mechanical zero marks, subtracted from readings.

`armada calibrate joints piper-zero` records them; the PiPer backend applies the file a cell names
(``joint_calibration``) in its worker, where readings become ``reading - offset``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from armada.calibration.joint_kinds import JointCalibrationKind
from armada.calibration.joints import JointCalibrationError, check_hold
from armada.calibration.joints import samples as checked_samples

KIND = "piper_zero"

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
    s = checked_samples(samples, joint_names, "zero pose")
    spread = s.std(axis=0)
    check_hold(spread, joint_names, max_hold_spread_rad, "rad", "the zero pose")
    offsets = np.median(s, axis=0)
    far = [f"{n} ({np.degrees(o):.1f} deg)" for n, o in zip(joint_names, offsets) if abs(o) > max_offset_rad]
    if far:
        raise JointCalibrationError(f"readings at the zero pose are far from zero: {', '.join(far)} (limit "
                                    f"{np.degrees(max_offset_rad):.0f} deg); is the arm at the alignment marks?")
    return PiperZero(list(joint_names), offsets, float(spread.max()))


def piper_zero_values(zero: PiperZero) -> dict[str, Any]:
    return {"embodiment": KIND, "joint_names": zero.joint_names, "offsets_rad": zero.offsets_rad,
            "procedure": zero.procedure}


def _load(path: Path, values: dict[str, Any], residual: dict[str, Any]) -> PiperZero:
    return _zero(path, values, residual.get("hold_spread"))


def _zero(path: Path | None, v: dict[str, Any], spread: Any) -> PiperZero:
    names = v.get("joint_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _file_error(path, "values.joint_names", "must be a list of joint names")
    offsets = _offsets(path, "values.offsets_rad", v.get("offsets_rad"), None).reshape(-1)
    if len(offsets) != len(names):
        raise _file_error(path, "values.offsets_rad", f"has {len(offsets)} values for {len(names)} joints")
    return PiperZero(names, offsets, spread.value if spread else float("nan"), str(v.get("procedure", "")))


def _offsets(path: Path | None, key: str, data: Any, shape: None) -> np.ndarray:
    from armada.calibration.results import matrix

    return matrix(path, key, data, shape)


def _file_error(path: Path | None, key: str, reason: str) -> Exception:
    from armada.calibration.results import CalibrationFileError

    return CalibrationFileError(path, key, reason)


def zero_offsets(driver: Any, cell_dir: Path | None) -> np.ndarray | None:
    """The offsets of the zero calibration a PiPer driver's cell names (``joint_calibration``,
    relative to the cell's folder), or None without one."""
    if driver.joint_calibration is None:
        return None
    from armada.calibration.results import load_joint_calibration
    from armada.runtime.config import DEFAULT_CELL

    file = Path(driver.joint_calibration).expanduser()
    if not file.is_absolute():
        file = (cell_dir if cell_dir is not None else DEFAULT_CELL.parent) / file
    return load_joint_calibration(file, expect_kind=KIND).offsets_rad


def add_arguments(zero: argparse.ArgumentParser) -> None:
    from armada.calibration.cli import live_driver_args, out_args

    zero.add_argument("--zero", type=Path, help="CSV of joint readings (rad), one column per joint")
    live_driver_args(zero)
    out_args(zero)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from armada.calibration.cli import read_columns, record_hold, require, write
    from armada.calibration.results import CalibrationRecord, Residual

    if args.live is not None:
        from armada.runtime.config import load_cell

        cell = load_cell(args.live, args.run_dir)
        drv = cell.driver(args.driver)
        names = [j.name for g in cell.embodiment(drv).groups if g.mode == "joint_position"
                 for j in g.joints]
        prompt = "put every joint at its mechanical zero mark (arm disabled or in teach mode)"
        samples = record_hold(args, names, prompt, say)
    else:
        names, samples = read_columns(require(args.zero, "--zero (or --live)"))
    zero = calibrate_piper_zero(samples, names)
    for n, o in zip(names, zero.offsets_rad):
        say(f"{n:10s} offset {o:+.5f} rad ({np.degrees(o):+.3f} deg)")
    say(zero.procedure)
    record = CalibrationRecord("joint_calibration", "PiPer: joint readings held at the mechanical zero marks",
                               {"hold_spread": Residual(zero.hold_spread_rad, "rad", float(np.radians(0.2)))},
                               piper_zero_values(zero), {"samples": len(samples)}, args.name or args.driver)
    write(args.out, record, args.force, say)
    return 0


JOINT_CALIBRATION = JointCalibrationKind(
    name=KIND, command="piper-zero", help="PiPer joint readings at the mechanical zero",
    load=_load, add_arguments=add_arguments, run=run)
