"""Joint calibration on synthetic recordings: SO-101 (lerobot's format), ALOHA grippers, PiPer zero."""

import json

import numpy as np
import pytest

from armada.calibration.joints import JointCalibrationError
from armada.drivers.aloha.calibration import GripperCalibration, calibrate_gripper, dynamixel_ticks_to_rad
from armada.drivers.piper.calibration import calibrate_piper_zero
from armada.drivers.so101.calibration import SO101_MOTORS, calibrate_so101, read_lerobot_calibration, \
    write_lerobot_calibration

NAMES = list(SO101_MOTORS)
MIDDLE = np.array([2100, 1500, 2600, 1950, 3000, 2300])  # raw readings at the middle pose
RANGES = {"shoulder_pan": (700, 3400), "shoulder_lift": (800, 3300), "elbow_flex": (900, 3100),
          "wrist_flex": (850, 3250), "gripper": (1900, 3400)}  # after homing, what the sweep reaches


def _recordings(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Held still, a couple of ticks of jitter with a median of zero (41 samples).
    jitter = np.stack([rng.permutation(np.r_[np.repeat([-2, -1, 0, 1, 2], 8), 0]) for _ in range(6)], axis=1)
    middle = MIDDLE + jitter
    offsets = MIDDLE - 2047
    sweep = np.tile(MIDDLE, (600, 1)).astype(float)
    for j, name in enumerate(NAMES):  # one joint after the other through its range, and back
        lo, hi = RANGES.get(name, (1000, 3000))
        path = np.concatenate([np.linspace(2047, lo, 50), np.linspace(lo, hi, 100), np.linspace(hi, 2047, 50)])
        sweep[j * 100:j * 100 + 100, j] = path[::2] + offsets[j]
    return middle, np.round(sweep)


def test_so101_calibration_matches_lerobots_arithmetic():
    middle, sweep = _recordings()
    cal = calibrate_so101(middle, sweep)
    for j, name in enumerate(NAMES):
        m = cal.motors[name]
        assert m.id == SO101_MOTORS[name] and m.drive_mode == 0
        assert m.homing_offset == MIDDLE[j] - 2047  # lerobot: Present = Actual - Homing_Offset, middle at 2047
        if name == "wrist_roll":
            assert (m.range_min, m.range_max) == (0, 4095)  # lerobot treats it as a full-turn joint
        else:
            assert (m.range_min, m.range_max) == RANGES[name]
    assert cal.hold_spread_ticks < 3


def test_so101_json_has_lerobots_fields_and_reads_back(tmp_path):
    middle, sweep = _recordings()
    cal = calibrate_so101(middle, sweep)
    path = write_lerobot_calibration(tmp_path / "robots" / "so101_follower" / "arm.json", cal)
    data = json.loads(path.read_text())
    assert list(data) == NAMES
    for name, fields in data.items():
        assert list(fields) == ["id", "drive_mode", "homing_offset", "range_min", "range_max"]
        assert all(type(v) is int for v in fields.values())
    assert read_lerobot_calibration(data) == cal.motors


def test_so101_refuses_a_joint_that_was_not_swept():
    middle, sweep = _recordings()
    sweep[:, NAMES.index("elbow_flex")] = MIDDLE[2]
    with pytest.raises(JointCalibrationError, match="elbow_flex: moved only 0 ticks"):
        calibrate_so101(middle, sweep)


def test_so101_refuses_motion_during_the_middle_pose():
    middle, sweep = _recordings()
    middle[:, 1] += np.linspace(0, 300, len(middle)).astype(int)
    with pytest.raises(JointCalibrationError, match="moved while the middle pose .*shoulder_lift"):
        calibrate_so101(middle, sweep)


def test_so101_refuses_a_sweep_past_half_a_turn_from_the_middle():
    middle, sweep = _recordings()
    sweep[5, 0] = MIDDLE[0] + 2100  # 2047 + 2100 after homing: beyond the servo's turn
    with pytest.raises(JointCalibrationError, match="shoulder_pan: the sweep goes"):
        calibrate_so101(middle, sweep)


def test_so101_refuses_wrong_shapes_and_nan():
    middle, sweep = _recordings()
    with pytest.raises(JointCalibrationError, match=r"shape \(n, 6\)"):
        calibrate_so101(middle[:, :5], sweep)
    sweep[3, 2] = np.nan
    with pytest.raises(JointCalibrationError, match="NaN"):
        calibrate_so101(middle, sweep)


@pytest.mark.parametrize("data, message", [
    ({"gripper": {"id": 6, "drive_mode": 0, "homing_offset": 3, "range_min": 10}}, "missing"),
    ({"gripper": {"id": 6, "drive_mode": 0, "homing_offset": 3, "range_min": 10, "range_max": 5}}, "below range_max"),
    ({"gripper": {"id": 6, "drive_mode": 0, "homing_offset": 3.5, "range_min": 10, "range_max": 50}}, "integers"),
    ([], "keyed by motor name"),
])
def test_bad_lerobot_files_are_refused_naming_the_motor(data, message):
    with pytest.raises(JointCalibrationError, match=message):
        read_lerobot_calibration(data, "arm.json")


def test_aloha_gripper_linear_map():
    rng = np.random.default_rng(1)
    opened = 2900 + rng.normal(0, 1.5, 30)
    closed = 1400 + rng.normal(0, 1.5, 30)
    cal, spread = calibrate_gripper(opened, closed, open_m=0.08)
    assert cal.raw_open == pytest.approx(2900, abs=1) and cal.raw_closed == pytest.approx(1400, abs=1)
    assert cal.opening(cal.raw_open) == pytest.approx(0.08) and cal.opening(cal.raw_closed) == pytest.approx(0.0)
    assert cal.opening((cal.raw_open + cal.raw_closed) / 2) == pytest.approx(0.04)
    assert cal.raw(cal.opening(2000.0)) == pytest.approx(2000.0)
    assert cal.normalized(cal.raw_open) == pytest.approx(1.0)
    assert spread < 3


def test_aloha_gripper_refusals():
    with pytest.raises(JointCalibrationError, match="differ by less"):
        calibrate_gripper(np.full(10, 2000.0), np.full(10, 1950.0), open_m=0.08)
    with pytest.raises(JointCalibrationError, match="moved while the gripper"):
        calibrate_gripper(np.linspace(2500, 2900, 10), np.full(10, 1400.0), open_m=0.08)
    with pytest.raises(JointCalibrationError, match="open width"):
        calibrate_gripper(np.full(10, 2900.0), np.full(10, 1400.0), open_m=0.0)


def test_reversed_gripper_maps_the_right_way():
    # Some grippers read lower when open: the map must still give 0 closed and open_m open.
    cal = GripperCalibration(raw_open=1200.0, raw_closed=2600.0, open_m=0.057)
    assert cal.opening(1200.0) == pytest.approx(0.057) and cal.opening(2600.0) == pytest.approx(0.0)


def test_dynamixel_ticks_to_rad():
    assert dynamixel_ticks_to_rad(2048) == 0
    assert dynamixel_ticks_to_rad(3072) == pytest.approx(np.pi / 2)


def test_piper_zero_offsets_and_refusals():
    names = [f"joint{i}" for i in range(1, 7)]
    true = np.radians([0.5, -1.2, 0.3, 0.0, 2.0, -0.7])
    rng = np.random.default_rng(2)
    samples = true + rng.normal(0, 1e-4, (100, 6))
    zero = calibrate_piper_zero(samples, names)
    assert np.allclose(zero.offsets_rad, true, atol=1e-4)
    assert np.allclose(zero.correct(true), 0, atol=1e-4)
    assert "JointConfig" in zero.procedure and "0xAE" in zero.procedure
    with pytest.raises(JointCalibrationError, match=r"joint2 \(-31.2 deg\)"):
        calibrate_piper_zero(samples + np.radians([0, -30, 0, 0, 0, 0]), names)
    moving = samples.copy()
    moving[:, 3] += np.linspace(0, 0.05, 100)
    with pytest.raises(JointCalibrationError, match="joint4"):
        calibrate_piper_zero(moving, names)
