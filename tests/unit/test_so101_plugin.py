"""The SO-101 plugin without lerobot: cell settings, embodiment and calibration checks at build."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from armada.drivers.core.registry import BACKENDS
from armada.drivers.so101.bench import BENCH_CALIBRATION
from armada.drivers.so101.config import So101BackendConfig, calibrated_ranges, settings
from armada.drivers.so101.plugin import check_embodiment, check_ranges
from armada.runtime.config import load_embodiment

EMB = load_embodiment("so101")


def ctx(tmp_path, joint_calibration="cal.json", **backend):
    cfg = So101BackendConfig(port="/dev/ttySO101", **backend)
    return SimpleNamespace(driver=SimpleNamespace(backend=cfg, joint_calibration=joint_calibration),
                           embodiment=EMB, cell_dir=tmp_path)


def test_the_plugin_is_registered_as_moving_hardware_with_the_so101_calibration_kind():
    plugin = BACKENDS.get("so101")
    assert plugin.moves_hardware and plugin.joint_calibration_kind == "so101"
    assert plugin.fake is not None and plugin.bench is not None


def test_the_embodiment_must_name_lerobots_joints_in_order():
    check_embodiment(None, EMB)
    with pytest.raises(ValueError, match="shoulder_pan"):
        check_embodiment(None, load_embodiment("mock_arm"))


def test_settings_read_a_lerobot_json_relative_to_the_cell(tmp_path):
    (tmp_path / "cal.json").write_text(json.dumps(BENCH_CALIBRATION))
    s = settings(ctx(tmp_path))
    assert s["calibration"] == BENCH_CALIBRATION and s["leader_calibration"] is None


@pytest.mark.parametrize("kw, match", [
    ({"joint_calibration": None}, "needs a joint_calibration"),
    ({"leader_port": "/dev/ttyLeader"}, "leader_port needs leader_calibration"),
    ({"leader_in_state": True}, "leader_in_state needs leader_port"),
])
def test_missing_settings_are_named(tmp_path, kw, match):
    (tmp_path / "cal.json").write_text(json.dumps(BENCH_CALIBRATION))
    with pytest.raises(ValueError, match=match):
        settings(ctx(tmp_path, **kw))


def test_a_calibration_of_other_motors_is_refused(tmp_path):
    (tmp_path / "cal.json").write_text(json.dumps({k: v for k, v in BENCH_CALIBRATION.items() if k != "gripper"}))
    with pytest.raises(ValueError, match="expected"):
        settings(ctx(tmp_path))


def test_unknown_and_bad_cell_keys_are_refused():
    with pytest.raises(ValidationError):
        So101BackendConfig(port="/dev/x", baud=115200)
    with pytest.raises(ValidationError):
        So101BackendConfig(port="/dev/x", stale_s=0)


def test_an_embodiment_range_beyond_the_calibrated_range_is_refused_naming_the_joint():
    check_ranges(BENCH_CALIBRATION, EMB)
    narrow = {n: dict(c) for n, c in BENCH_CALIBRATION.items()}
    narrow["elbow_flex"].update(range_min=1500, range_max=2600)  # +-0.84 rad
    with pytest.raises(ValueError, match=r"elbow_flex allows -1.69..1.69 but is calibrated -0.8439..0.8439"):
        check_ranges(narrow, EMB)
    lo, hi = calibrated_ranges(BENCH_CALIBRATION)["shoulder_pan"]
    assert hi == pytest.approx(1300 * 2 * 3.141592653589793 / 4095) and lo == -hi
