"""The ALOHA plugin without hardware: its config model refuses bad cells with a clear reason, the
embodiment check, gripper calibrations from a result file, and the unit conversions."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from armada.drivers.aloha.backend import FOLLOWER_MODELS, arm_servos, rad_to_ticks, ticks_to_rad
from armada.drivers.aloha.calibration import GripperCalibration, gripper_values
from armada.drivers.aloha.config import ACT_FOLLOWER_GRIPPER, ACT_LEADER_GRIPPER, AlohaBackendConfig, gripper_calibrations
from armada.drivers.aloha.plugin import PLUGIN, check_embodiment, check_gripper_ranges
from armada.drivers.core.registry import get
from armada.runtime.config import CONFIG_DIR, ConfigError, load_cell, load_embodiment

EMB = load_embodiment("aloha")
PORTS = {"left_follower_port": "/dev/ttyDXL_puppet_left", "right_follower_port": "/dev/ttyDXL_puppet_right"}


def test_the_plugin_is_registered_under_its_kind():
    plugin = get("aloha")
    assert plugin is PLUGIN and plugin.moves_hardware and plugin.joint_calibration_kind == "aloha_gripper"
    assert plugin.fake is not None and plugin.bench is not None


def test_the_fake_cell_and_the_embodiment_load():
    cell = load_cell(CONFIG_DIR / "cells" / "aloha_fake.yaml", "/tmp/run")
    b = cell.drivers[0].backend
    assert isinstance(b, AlohaBackendConfig) and b.left_follower_port == "/tmp/run/ttyDXL_puppet_left"
    assert EMB.dof == 14 and EMB.control_rate_hz == 50
    assert list(EMB.group_slices()) == ["left_arm", "left_gripper", "right_arm", "right_gripper"]
    check_embodiment(b, EMB)


@pytest.mark.parametrize("fields, reason", [
    ({"follower_ids": {"elbow": 2}}, r"repeated: \[2\]"),
    ({"left_leader_port": "/dev/ttyDXL_master_left"}, "give both left_leader_port and right_leader_port"),
    ({"leaders_in_state": True}, "leaders_in_state needs"),
    ({"right_follower_port": "/dev/ttyDXL_puppet_left"}, "every arm has its own serial port"),
    ({"baud": 9600}, "baud"),
    ({"gripper_current": 5000}, "gripper_current"),
    ({"stale_s": 0}, "stale_s"),
    ({"follower_gripper": {"raw_open": 2000, "raw_closed": 2000, "open_m": 0.05}}, "must differ"),
    ({"torque_off_on_close": True}, "Extra inputs are not permitted"),
])
def test_bad_backend_settings_are_refused_naming_the_problem(fields, reason):
    with pytest.raises(ValidationError, match=reason):
        AlohaBackendConfig(**{**PORTS, **fields})


def test_a_bad_cell_key_names_the_file_and_the_key(tmp_path):
    data = yaml.safe_load((CONFIG_DIR / "cells" / "aloha_fake.yaml").read_text())
    data["drivers"][0]["backend"]["follower_ids"] = {"waist": 300}
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_cell(path, "/tmp/run")
    assert str(path) in str(e.value) and "waist" in str(e.value)


def test_an_embodiment_of_another_shape_fails_the_check_naming_it():
    cfg = AlohaBackendConfig(**PORTS)
    with pytest.raises(ValueError, match=r"ALOHA backend needs the joints \['left_waist'.*embodiment 'cobot_magic'"):
        check_embodiment(cfg, load_embodiment("cobot_magic"))


def test_ticks_and_radians_as_alohas_code_converts():
    assert ticks_to_rad(2048) == 0.0
    assert ticks_to_rad(3072) == pytest.approx(math.pi / 2)
    assert ticks_to_rad(0) == pytest.approx(-math.pi)
    q = np.linspace(-3.0, 3.0, 13)
    assert np.allclose(ticks_to_rad(rad_to_ticks(q)), q)


def test_act_gripper_constants_map_to_the_finger_positions():
    # PUPPET_GRIPPER_JOINT_OPEN 1.4910 rad -> PUPPET_GRIPPER_POSITION_OPEN 0.058 m, and so on.
    fol = GripperCalibration(**ACT_FOLLOWER_GRIPPER.model_dump())
    assert fol.opening(rad_to_ticks(1.4910)) == pytest.approx(0.058)
    assert fol.opening(rad_to_ticks(-0.6213)) == pytest.approx(0.01844)
    lead = GripperCalibration(**ACT_LEADER_GRIPPER.model_dump())
    assert lead.normalized(rad_to_ticks(0.3083)) == pytest.approx(1.0)
    assert lead.normalized(rad_to_ticks(-0.6842)) == pytest.approx(0.0)


def test_shadow_motors_follow_their_joint_in_the_servo_list():
    servos = arm_servos({"waist": 1, "shoulder": 2, "shoulder_shadow": 3, "elbow": 4, "elbow_shadow": None,
                         "forearm_roll": 6, "wrist_angle": 7, "wrist_rotate": 8, "gripper": 9}, FOLLOWER_MODELS)
    assert [(s.key, s.id) for s in servos] == [("waist", 1), ("shoulder", 2), ("shoulder_shadow", 3), ("elbow", 4),
                                              ("forearm_roll", 6), ("wrist_angle", 7), ("wrist_rotate", 8),
                                              ("gripper", 9)]
    assert [s.mode for s in servos] == [3] * 7 + [5]


def _ctx(cfg: AlohaBackendConfig, calibration: str | None, cell_dir: Path):
    return SimpleNamespace(driver=SimpleNamespace(backend=cfg, joint_calibration=calibration), embodiment=EMB,
                           cell_dir=cell_dir)


def test_gripper_calibrations_come_from_the_drivers_file_where_it_names_them(tmp_path):
    from armada.calibration.results import CalibrationRecord, Residual, write_result

    measured = GripperCalibration(raw_open=3100.0, raw_closed=1500.0, open_m=0.07, closed_m=0.0)
    write_result(tmp_path / "grippers.yaml", CalibrationRecord(
        "joint_calibration", "test", {"hold_spread": Residual(1.0, "ticks", 20.0)},
        gripper_values({"left_gripper": measured}, "ticks")))
    grips = gripper_calibrations(_ctx(AlohaBackendConfig(**PORTS), "grippers.yaml", tmp_path))
    assert grips["left"] == {"raw_open": 3100.0, "raw_closed": 1500.0, "open_m": 0.07, "closed_m": 0.0}
    assert grips["right"] == ACT_FOLLOWER_GRIPPER.model_dump()
    assert grips["left_leader"] == ACT_LEADER_GRIPPER.model_dump()


def test_a_calibration_of_another_kind_is_refused(tmp_path):
    from armada.calibration.results import CalibrationRecord, Residual, write_result

    path = tmp_path / "zero.yaml"
    write_result(path, CalibrationRecord("joint_calibration", "test", {"hold_spread": Residual(0.0, "rad", 0.01)},
                                         {"embodiment": "piper_zero", "joint_names": ["j"] * 6,
                                          "offsets_rad": [0.0] * 6}))
    with pytest.raises(ConfigError, match="aloha_gripper") as e:
        gripper_calibrations(_ctx(AlohaBackendConfig(**PORTS), str(path), tmp_path))
    assert "piper_zero" in str(e.value)


def test_a_gripper_range_beyond_its_calibration_is_refused_when_the_backend_is_built(tmp_path):
    grips = gripper_calibrations(_ctx(AlohaBackendConfig(**PORTS), None, tmp_path))
    check_gripper_ranges(grips, EMB)  # ACT's defaults span exactly the embodiment's 0.01844..0.058 m
    grips["right"] = {"raw_open": 3000.0, "raw_closed": 1600.0, "open_m": 0.05, "closed_m": 0.0}
    with pytest.raises(ValueError, match=r"ALOHA right gripper: the embodiment allows 0.01844..0.058 m but its "
                                         r"calibration spans 0..0.05 m"):
        check_gripper_ranges(grips, EMB)
