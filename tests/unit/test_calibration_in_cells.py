"""Cells name calibration files; loading the cell loads them, so a wrong one fails before any run."""

import numpy as np
import pytest
import yaml

from armada.calibration.results import CalibrationRecord, Residual, intrinsics_values, write_result
from armada.calibration.types import CameraIntrinsics
from armada.runtime.config import SCRIPTED_CELL, ConfigError, load_cell

K = np.array([[610.5, 0.0, 321.2], [0.0, 606.25, 236.8], [0.0, 0.0, 1.0]])


def _write_intrinsics(path, size=(640, 480)):
    rec = CalibrationRecord("camera_intrinsics", "test", {"rms_reprojection": Residual(0.2, "px", 0.5)},
                            intrinsics_values(CameraIntrinsics(K, np.zeros(5), size), "radial3"), {"views": 12})
    return write_result(path, rec)


def _cell_with(tmp_path, camera_fields=None, driver_fields=None):
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    data["cameras"][0].update(camera_fields or {})
    data["drivers"][0].update(driver_fields or {})
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_matching_intrinsics_file_relative_to_the_cell_loads(tmp_path):
    _write_intrinsics(tmp_path / "front.yaml")
    cell = load_cell(_cell_with(tmp_path, {"intrinsics": "front.yaml"}), tmp_path)
    assert cell.cameras[0].intrinsics == "front.yaml"


def test_intrinsics_at_another_resolution_fail_the_cell_naming_the_key(tmp_path):
    _write_intrinsics(tmp_path / "front.yaml", size=(1280, 720))
    with pytest.raises(ConfigError, match=r"cameras\.0\.intrinsics.*calibrated at 1280x720"):
        load_cell(_cell_with(tmp_path, {"intrinsics": "front.yaml"}), tmp_path)


def test_a_missing_calibration_file_fails_the_cell(tmp_path):
    with pytest.raises(ConfigError, match=r"drivers\.0\.joint_calibration: no calibration file"):
        load_cell(_cell_with(tmp_path, driver_fields={"joint_calibration": "nope.yaml"}), tmp_path)


def test_a_file_of_the_wrong_kind_fails_the_cell(tmp_path):
    _write_intrinsics(tmp_path / "front.yaml")
    with pytest.raises(ConfigError, match=r"cameras\.0\.hand_eye"):
        load_cell(_cell_with(tmp_path, {"hand_eye": "front.yaml"}), tmp_path)
