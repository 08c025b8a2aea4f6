"""Joint calibration from recorded samples: what every device's calibration shares.

Each calibration is a pure function over recorded samples (rows of raw readings, one column per
joint) plus a writer. Recording is someone else's job (a driver, a bus script, a CSV): keeping
the arithmetic pure lets a test check it without hardware, and lets a person redo it from a
saved recording. The device calibrations live in their device folders (drivers/<device>/
calibration.py) and register a kind (calibration/joint_kinds.py).

The reference poses must be held still while recorded: the spread of the samples there is the
residual we report and refuse on (a joint that moved while "holding the middle pose" would put
its range off-centre, the kind of mistake that makes joints reversed or jumping later).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_MAX_HOLD_SPREAD_TICKS = 20.0  # about 1.8 degrees on a 4096-tick servo
DEFAULT_MIN_RANGE_TICKS = 200  # about 18 degrees: less means the joint was not moved through its range


class JointCalibrationError(ValueError):
    """Recorded samples that cannot give a calibration; the message says which joint and why."""


def samples(samples: np.ndarray, names: Sequence[str], what: str) -> np.ndarray:
    a = np.asarray(samples, np.float64)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise JointCalibrationError(f"{what}: expected samples of shape (n, {len(names)}) for {list(names)}, "
                                    f"got {a.shape}")
    if len(a) < 2:
        raise JointCalibrationError(f"{what}: need at least 2 samples, got {len(a)}")
    if not np.all(np.isfinite(a)):
        raise JointCalibrationError(f"{what}: samples contain NaN or infinity (a failed read?)")
    return a


def column(samples: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(samples, np.float64).reshape(-1)
    if len(a) < 2 or not np.all(np.isfinite(a)):
        raise JointCalibrationError(f"{what}: need at least 2 finite samples, got {len(a)}")
    return a


def check_hold(spread: np.ndarray, names: Sequence[str], limit: float, unit: str, pose: str) -> None:
    moving = [f"{n} ({s:.3g} {unit})" for n, s in zip(names, spread) if s > limit]
    if moving:
        raise JointCalibrationError(f"moved while {pose} was being recorded: {', '.join(moving)} "
                                    f"(limit {limit:.3g} {unit}); hold still and record again")
