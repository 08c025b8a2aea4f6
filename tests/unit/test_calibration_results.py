"""The result file format: writer refusals, loaders, and their errors."""

import json
import logging
import re

import numpy as np
import pytest
import yaml

from armada.calibration.results import CalibrationFileError, CalibrationRecord, Residual, ResultRefused, \
    hand_eye_values, intrinsics_values, load_hand_eye, load_intrinsics, load_joint_calibration, load_latency, \
    load_result, write_result
from armada.drivers.aloha.calibration import GripperCalibration, gripper_values
from armada.drivers.piper.calibration import PiperZero, piper_zero_values
from armada.drivers.so101.calibration import MotorCalibration
from armada.calibration.types import CameraIntrinsics
from armada.runtime.config import ConfigError

K = np.array([[610.5, 0.0, 321.2], [0.0, 606.25, 236.8], [0.0, 0.0, 1.0]])
DIST = np.array([-0.221, 0.0812, 0.00101, -0.0015, 0.0123])


def _intrinsics_record(rms: float = 0.2, limit: float = 0.5) -> CalibrationRecord:
    return CalibrationRecord("camera_intrinsics", "ChArUco, cv2.calibrateCameraExtended, radial3",
                             {"rms_reprojection": Residual(rms, "px", limit)},
                             intrinsics_values(CameraIntrinsics(K, DIST, (640, 480)), "radial3"),
                             {"views": 12, "image_size": [640, 480]}, "wrist")


def _hand_eye_doc() -> tuple[np.ndarray, CalibrationRecord]:
    T = np.eye(4)
    T[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)
    T[:3, 3] = [0.03, -0.01, 0.05]
    rec = CalibrationRecord("hand_eye", "cv2 hand-eye, best of 7 methods: PARK",
                            {"translation": Residual(1.2, "mm", 5.0), "rotation": Residual(0.2, "deg", 1.0)},
                            hand_eye_values("eye_in_hand", T, np.eye(4)), {"views": 15})
    return T, rec


def test_intrinsics_round_trip_with_metadata(tmp_path):
    path = write_result(tmp_path / "wrist.yaml", _intrinsics_record())
    intr = load_intrinsics(path, expect_size=(640, 480))
    assert np.array_equal(intr.K, K) and np.array_equal(intr.dist, DIST)  # full precision
    assert intr.image_size == (640, 480) and intr.fx == 610.5
    doc = yaml.safe_load(path.read_text())
    assert doc["format"] == "armada-calibration/1" and doc["kind"] == "camera_intrinsics"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["date"])
    assert "opencv" in doc["tool_version"] and doc["forced"] is False
    assert doc["residual"]["rms_reprojection"] == {"value": 0.2, "unit": "px", "max": 0.5}
    assert doc["inputs"]["views"] == 12 and doc["name"] == "wrist"


def test_writer_refuses_a_residual_over_its_limit(tmp_path):
    with pytest.raises(ResultRefused, match=r"residual too high: rms_reprojection 0.9 px > 0.5 px"):
        write_result(tmp_path / "bad.yaml", _intrinsics_record(rms=0.9))
    assert not (tmp_path / "bad.yaml").exists()


def test_forced_result_is_marked_and_warned_about(tmp_path, caplog):
    path = write_result(tmp_path / "bad.yaml", _intrinsics_record(rms=0.9), force=True)
    assert yaml.safe_load(path.read_text())["forced"] is True
    with caplog.at_level(logging.WARNING, logger="armada.calibration"):
        rec = load_result(path)
    assert rec.forced and "--force" in caplog.text and "0.9 px" in caplog.text


def test_failed_checks_other_than_residuals_also_need_force(tmp_path, caplog):
    rec = _intrinsics_record()
    rec = CalibrationRecord(**{**rec.__dict__, "refusals": ["corners cover only 30% of the image"]})
    with pytest.raises(ResultRefused, match="cover only 30%"):
        write_result(tmp_path / "c.yaml", rec)
    path = write_result(tmp_path / "c.yaml", rec, force=True)
    doc = yaml.safe_load(path.read_text())
    assert doc["forced"] is True and doc["forced_past"] == ["corners cover only 30% of the image"]
    with caplog.at_level(logging.WARNING, logger="armada.calibration"):
        load_intrinsics(path)
    assert "cover only 30%" in caplog.text


def test_force_on_a_good_result_is_not_marked(tmp_path):
    path = write_result(tmp_path / "ok.yaml", _intrinsics_record(), force=True)
    assert yaml.safe_load(path.read_text())["forced"] is False


def test_wrong_resolution_refused_naming_file_and_key(tmp_path):
    path = write_result(tmp_path / "wrist.yaml", _intrinsics_record())
    with pytest.raises(CalibrationFileError, match=r"wrist.yaml: values.image_size: calibrated at 640x480") as info:
        load_intrinsics(path, expect_size=(1280, 720))
    assert isinstance(info.value, ConfigError) and info.value.key == "values.image_size"


@pytest.mark.parametrize("edit, key, reason", [
    (lambda d: d.pop("values"), "values", "missing"),
    (lambda d: d.update(format="other/2"), "format", "expected"),
    (lambda d: d["values"].update(camera_matrix=[[1, 2], [3, 4]]), "values.camera_matrix", "must be 3x3"),
    (lambda d: d["values"].update(dist_coeffs=[0.1, 0.2, 0.3]), "values.dist_coeffs", "3 coefficients"),
    (lambda d: d["values"].update(image_size=[640]), "values.image_size", "width, height"),
    (lambda d: d["values"]["camera_matrix"][0].__setitem__(0, float("nan")), "values.camera_matrix", "NaN"),
    (lambda d: d["residual"].update(rms_reprojection={"unit": "px"}), "residual.rms_reprojection", "numeric value"),
])
def test_broken_intrinsics_files_name_the_key(tmp_path, edit, key, reason):
    path = write_result(tmp_path / "cam.yaml", _intrinsics_record())
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CalibrationFileError, match=reason) as info:
        load_intrinsics(path)
    assert info.value.key == key and info.value.file == str(path)


def test_unreadable_and_unparsable_files(tmp_path):
    with pytest.raises(CalibrationFileError, match="cannot read"):
        load_intrinsics(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("values: [unclosed")
    with pytest.raises(CalibrationFileError, match="does not parse"):
        load_intrinsics(bad)


def test_wrong_kind_refused(tmp_path):
    _, rec = _hand_eye_doc()
    path = write_result(tmp_path / "he.yaml", rec)
    with pytest.raises(CalibrationFileError, match="this is a hand_eye file, a camera_intrinsics file is needed"):
        load_intrinsics(path)


def test_hand_eye_round_trip_and_checks(tmp_path):
    T, rec = _hand_eye_doc()
    path = write_result(tmp_path / "he.yaml", rec)
    he = load_hand_eye(path, expect_mode="eye_in_hand")
    assert np.array_equal(he.transform, T) and he.mode == "eye_in_hand" and he.parent == "gripper"
    doc = yaml.safe_load(path.read_text())
    assert doc["values"]["translation_m"] == [0.03, -0.01, 0.05] and doc["values"]["child"] == "camera"
    with pytest.raises(CalibrationFileError, match="is eye_in_hand, but eye_to_hand is needed"):
        load_hand_eye(path, expect_mode="eye_to_hand")
    doc["values"]["transform"][0][0] = 2.0
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CalibrationFileError, match="values.transform: is not a rigid transform"):
        load_hand_eye(path)


def test_lerobot_json_loads_as_it_is(tmp_path):
    data = {"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": 53, "range_min": 700, "range_max": 3400},
            "gripper": {"id": 6, "drive_mode": 0, "homing_offset": -20, "range_min": 1900, "range_max": 3400}}
    path = tmp_path / "arm.json"
    path.write_text(json.dumps(data, indent=4))
    motors = load_joint_calibration(path)
    assert motors["shoulder_pan"] == MotorCalibration(1, 0, 53, 700, 3400)
    data["gripper"]["range_max"] = "big"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationFileError, match="gripper: fields \\['range_max'\\] must be integers"):
        load_joint_calibration(path)


def test_joint_results_round_trip(tmp_path):
    grippers = {"puppet_left": GripperCalibration(2900.0, 1400.0, 0.08)}
    rec = CalibrationRecord("joint_calibration", "ALOHA grippers", {"hold_spread": Residual(1.5, "ticks", 20.0)},
                            gripper_values(grippers, "ticks"))
    assert load_joint_calibration(write_result(tmp_path / "g.yaml", rec)) == grippers
    zero = PiperZero(["j1", "j2"], np.array([0.01, -0.02]), 1e-4)
    rec = CalibrationRecord("joint_calibration", "PiPer zero", {"hold_spread": Residual(1e-4, "rad", 0.0035)},
                            piper_zero_values(zero))
    loaded = load_joint_calibration(write_result(tmp_path / "z.yaml", rec))
    assert loaded.joint_names == ["j1", "j2"] and np.array_equal(loaded.offsets_rad, zero.offsets_rad)
    assert "JointConfig" in loaded.procedure


def test_latency_round_trip_and_range(tmp_path):
    rec = CalibrationRecord("camera_latency", "cross-correlation", {"decorrelation": Residual(0.01, "1", 0.2)},
                            {"delay_s": 0.0734})
    path = write_result(tmp_path / "lat.yaml", rec)
    assert load_latency(path).delay_s == 0.0734
    doc = yaml.safe_load(path.read_text())
    doc["values"]["delay_s"] = -0.1
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CalibrationFileError, match="values.delay_s"):
        load_latency(path)


def test_unknown_kind_not_written(tmp_path):
    with pytest.raises(ValueError, match="unknown calibration kind"):
        write_result(tmp_path / "x.yaml", CalibrationRecord("lidar", "m", {}, {}))


def test_loaders_do_not_import_opencv():
    # Drivers load joint calibrations and must not pay for OpenCV (see test_imports).
    import subprocess
    import sys

    code = "import sys, calibration.results; print('cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
