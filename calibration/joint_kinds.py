"""Joint-calibration kinds are plugins: each device folder that has a joint calibration provides one
``JointCalibrationKind`` (its `armada calibrate joints COMMAND`, and how its result file's values
load), registered under the ``armada.joint_calibrations`` entry-point group. A backend plugin names
the kind it applies (``BackendPlugin.joint_calibration_kind``), so a cell that gives a driver a file
of another kind fails at load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armada.drivers.core.registry import PluginRegistry

GROUP = "armada.joint_calibrations"


@dataclass(frozen=True)
class JointCalibrationKind:
    name: str  # ``values.embodiment`` in a result file (snake_case)
    command: str  # `armada calibrate joints COMMAND` (kebab-case)
    help: str
    # A result file's ``values`` (and residuals) -> the calibration; raises CalibrationFileError or
    # JointCalibrationError naming the key.
    load: Callable[[Path, dict[str, Any], dict[str, Any]], Any]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Callable[[str], None]], int]
    # A file in the device's own format (no ``format`` key, e.g. a library's JSON): the calibration, or
    # raise JointCalibrationError when it is not one.
    load_native: Callable[[Path, dict[str, Any]], Any] | None = None


JOINT_CALIBRATIONS: PluginRegistry[JointCalibrationKind] = PluginRegistry(GROUP, JointCalibrationKind,
                                                                          "joint calibration kind")
