"""`armada run --sim`'s twin of a cell (drivers/sim/cell.py) and the shipped sim cells."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from armada.drivers.sim.cell import mjcf_camera_for, scene_for_joints, sim_cell_copy
from armada.runtime.config import CONFIG_DIR, load_cell, load_embodiment

CELLS = CONFIG_DIR / "cells"


def test_so101_cell_twin_validates(tmp_path):
    path = sim_cell_copy(CELLS / "so101_fake.yaml", tmp_path)
    assert path == tmp_path / "so101_fake-sim.yaml"
    raw = yaml.safe_load(path.read_text())
    drv = raw["drivers"][0]
    assert drv["backend"] == {"kind": "mujoco", "scene": "so101", "task": "reach_cube", "seed": 0,
                              "control": "ipc://{run_dir}/sim-robot"}
    assert "joint_calibration" not in drv and drv["state"] == "ipc://{run_dir}/robot-state"
    assert raw["cameras"] == [{"name": "front", "width": 320, "height": 240, "fps": 30,
                               "frames": "ipc://{run_dir}/cam-front", "kind": "mujoco", "scene": "so101",
                               "camera": "front", "state": "ipc://{run_dir}/robot-state"}]
    original = yaml.safe_load((CELLS / "so101_fake.yaml").read_text())
    assert raw["inference"] == original["inference"]  # the policy and its settings are unchanged
    cell = load_cell(path, run_dir=tmp_path)
    assert cell.name == "so101_fake-sim"
    assert cell.drivers[0].backend.kind == "mujoco" and cell.drivers[0].backend.control == f"ipc://{tmp_path}/sim-robot"
    assert cell.cameras[0].kind == "mujoco" and cell.cameras[0].camera == "front"


def test_aloha_cell_twin_maps_cameras(tmp_path):
    path = sim_cell_copy(CELLS / "aloha_fake.yaml", tmp_path)
    cell = load_cell(path, run_dir=tmp_path)
    assert cell.drivers[0].backend.scene == "aloha"
    assert [(c.name, c.camera) for c in cell.cameras] == [("high", "top")]


def test_embodiment_file_next_to_the_cell_is_made_absolute(tmp_path):
    src = tmp_path / "lab"
    src.mkdir()
    (src / "my_so101.yaml").write_text((CONFIG_DIR / "embodiments" / "so101.yaml").read_text())
    cell = yaml.safe_load((CELLS / "so101_fake.yaml").read_text())
    cell["drivers"][0]["embodiment"] = "my_so101.yaml"
    (src / "cell.yaml").write_text(yaml.safe_dump(cell))
    out = tmp_path / "run"
    path = sim_cell_copy(src / "cell.yaml", out)
    assert yaml.safe_load(path.read_text())["drivers"][0]["embodiment"] == str((src / "my_so101.yaml").resolve())
    load_cell(path, run_dir=out)


@pytest.mark.parametrize("cell,driver", [("ur3_fake.yaml", "arm"), ("piper_fake.yaml", None)])
def test_embodiment_without_a_scene_is_refused_naming_the_driver(tmp_path, cell, driver):
    raw = yaml.safe_load((CELLS / cell).read_text())
    driver = driver or raw["drivers"][0]["name"]
    with pytest.raises(ValueError, match=f"driver '{driver}' .*has no sim scene"):
        sim_cell_copy(CELLS / cell, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_scene_and_camera_mapping():
    assert scene_for_joints(load_embodiment("so101").joint_names) == "so101"
    assert scene_for_joints(load_embodiment("aloha").joint_names) == "aloha"
    assert scene_for_joints(load_embodiment("ur3").joint_names) is None
    assert mjcf_camera_for("so101", "wrist") == "wrist"
    assert mjcf_camera_for("so101", "gripper_wrist_cam") == "wrist"
    assert mjcf_camera_for("so101", "overhead") == "front"
    assert mjcf_camera_for("aloha", "cam_left_wrist") == "left_wrist"
    assert mjcf_camera_for("aloha", "wrist") == "right_wrist"
    assert mjcf_camera_for("aloha", "low") == "top"


@pytest.mark.parametrize("name", ["sim_so101.yaml", "sim_aloha.yaml"])
def test_shipped_sim_cells_validate_without_importing_mujoco(name):
    code = ("import sys; from armada.runtime.config import load_cell; "
            f"c = load_cell({str(CELLS / name)!r}, run_dir='/tmp/armada-x'); "
            "assert c.drivers[0].backend.kind == 'mujoco' and c.inference.policy.kind == 'sim_expert'; "
            "assert all(k.kind == 'mujoco' for k in c.cameras); print('mujoco' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_scene_cameras_are_the_models():
    pytest.importorskip("mujoco")
    from armada.drivers.sim.world import SCENE_CAMERAS, SimWorld, scene_joint_names

    for scene in ("so101", "aloha"):
        world = SimWorld(scene)
        assert set(world.camera_names) == set(SCENE_CAMERAS[scene])
        assert world.joint_names == scene_joint_names(scene)


def test_cell_copy_of_a_non_cell_is_refused(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: nothing\n")
    with pytest.raises(ValueError, match="not a cell"):
        sim_cell_copy(bad, tmp_path / "out")


