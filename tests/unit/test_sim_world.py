"""The simulated world (drivers/sim/world.py): tasks, seeded resets, parking, units, plans, success."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from armada.drivers.sim.world import INSTRUCTIONS, SCENES, instruction_for, scene_of, tasks_for

mujoco = pytest.importorskip("mujoco")

from armada.drivers.sim.world import (  # noqa: E402
    ALOHA_XY_RANGE,
    SO101_XY_RANGE,
    SimWorld,
    Waypoint,
)
from armada.runtime.config import load_embodiment  # noqa: E402

SO101_HOME = np.array(load_embodiment("so101").home)
ALOHA_HOME = np.array(load_embodiment("aloha").home)


@pytest.fixture(scope="module")
def so101() -> SimWorld:
    return SimWorld("so101")


@pytest.fixture(scope="module")
def aloha() -> SimWorld:
    return SimWorld("aloha")


def follow_plan(world: SimWorld, gripper_index: int, gripper_tol: float, max_step: float = 0.02,
                ticks_per_waypoint: int = 150) -> None:
    """A simple expert: IK to each waypoint, joint steps capped at ``max_step`` per 20 ms tick.

    A waypoint is done when the command has arrived at the IK goal, the site is within tolerance
    and the gripper is at its value or has stopped (closing on an object stops it short).
    """
    cmd = world.arm_position()
    for wp in world.plan():
        last_gripper = np.inf
        for _ in range(ticks_per_waypoint):
            goal = world.ik(wp, cmd, iterations=30)
            cmd = cmd + np.clip(goal - cmd, -max_step, max_step)
            world.set_target(cmd)
            world.step(0.02)
            gripper = world.arm_position()[gripper_index]
            reached = np.linalg.norm(world.site_position(wp.site) - wp.position) < wp.tolerance_m
            settled = abs(gripper - wp.gripper) < gripper_tol or abs(gripper - last_gripper) < 1e-4
            last_gripper = gripper
            if reached and settled and np.allclose(cmd, goal, atol=1e-3):  # at rest there, not passing by
                break
        else:
            pytest.fail(f"{world.task}: waypoint {wp} not reached in {ticks_per_waypoint} ticks; "
                        f"site at {world.site_position(wp.site)}")


def test_tasks_scenes_and_instructions_without_mujoco():
    assert SCENES == ("so101", "aloha")
    assert tasks_for("so101") == ["reach_cube", "press_button"]
    assert tasks_for("aloha") == ["aloha_reach_cube"]
    assert instruction_for("reach_cube") == "touch the red cube"
    assert instruction_for("press_button") == "press the green button"
    assert set(INSTRUCTIONS) == {t for s in SCENES for t in tasks_for(s)}
    assert scene_of("aloha_reach_cube") == "aloha"
    with pytest.raises(ValueError, match="unknown scene 'ur3'"):
        tasks_for("ur3")
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        instruction_for("fly")


def test_importing_the_world_module_does_not_import_mujoco():
    code = "import sys, armada.drivers.sim.world, armada.drivers.sim.control; print('mujoco' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_layout_matches_the_embodiments(so101, aloha):
    assert so101.joint_names == [j.name for g in load_embodiment("so101").groups for j in g.joints]
    assert aloha.joint_names == [j.name for g in load_embodiment("aloha").groups for j in g.joints]
    assert so101.camera_names == ["front", "workspace", "wrist"]
    assert {"top", "left_wrist", "right_wrist"} <= set(aloha.camera_names)
    with pytest.raises(ValueError, match="unknown scene"):
        SimWorld("piper")


def test_reset_is_deterministic_per_seed_and_parks_the_other_task(so101):
    so101.place_arm(SO101_HOME)
    so101.reset("reach_cube", 7)
    first = so101.objects()
    assert list(first) == ["cube"]
    so101.reset("reach_cube", 8)
    assert so101.objects()["cube"] != first["cube"]
    so101.reset("reach_cube", 7)
    assert so101.objects() == first
    (x0, x1), (y0, y1) = SO101_XY_RANGE
    x, y, z = first["cube"][:3]
    assert x0 <= x <= x1 and y0 <= y <= y1 and z == pytest.approx(0.015)
    # The button waits far away, out of the workspace, while the cube task runs; and vice versa.
    assert np.linalg.norm(so101.data.body("button").xpos[:2]) > 1.5
    so101.reset("press_button", 7)
    assert list(so101.objects()) == ["button"]
    assert np.linalg.norm(so101.data.body("cube").xpos[:2]) > 1.5
    assert (so101.task, so101.seed) == ("press_button", 7)
    with pytest.raises(ValueError, match="not in scene 'so101'"):
        so101.reset("aloha_reach_cube", 1)
    assert so101.task == "press_button"  # a refused reset changed nothing


def test_reset_never_moves_the_arm(so101):
    so101.place_arm(SO101_HOME + [0.1, -0.2, 0.3, 0.1, 0.0, 0.0])
    before = so101.data.qpos[:6].copy()
    resets = so101.resets
    so101.reset("reach_cube", 3)
    assert np.array_equal(so101.data.qpos[:6], before)
    assert so101.resets == resets + 1


def test_step_advances_whole_substeps(so101):
    t0 = so101.data.time
    so101.step(0.02)
    assert so101.data.time - t0 == pytest.approx(0.02)
    so101.step(0.0)
    assert so101.data.time - t0 == pytest.approx(0.02)


def test_so101_gripper_maps_onto_the_joint_range(so101):
    lo, hi = so101.model.jnt_range[so101.model.joint("gripper").id]
    qadr = so101.model.joint("gripper").qposadr[0]
    for ours, mj in ((0.0, lo), (1.0, hi), (0.5, (lo + hi) / 2)):
        so101.place_arm(np.r_[SO101_HOME[:5], ours])
        assert so101.data.qpos[qadr] == pytest.approx(mj)
        assert so101.data.ctrl[so101.model.actuator("gripper").id] == pytest.approx(mj)
        assert so101.arm_position()[5] == pytest.approx(ours)
    assert so101.lower[5] == pytest.approx(0.0) and so101.upper[5] == pytest.approx(1.0)


def test_aloha_gripper_metres_map_onto_both_fingers(aloha):
    m = aloha.model
    for ours, finger in ((0.01844, 0.021), (0.058, 0.057)):
        pos = ALOHA_HOME.copy()
        pos[13] = ours
        aloha.place_arm(pos)
        assert aloha.data.qpos[m.joint("vx300s_right/left_finger").qposadr[0]] == pytest.approx(finger)
        assert aloha.data.qpos[m.joint("vx300s_right/right_finger").qposadr[0]] == pytest.approx(-finger)
        assert aloha.arm_position()[13] == pytest.approx(ours)
    with pytest.raises(ValueError, match="needs 14 values"):
        aloha.set_target(np.zeros(7))


def test_load_state_round_trips_into_another_world(so101):
    so101.place_arm(SO101_HOME + [0.3, 0.2, -0.1, 0.4, 0.5, 0.2])
    so101.reset("press_button", 11)
    so101.step(0.1)
    state = so101.state()
    assert set(state) == {"task", "seed", "time_s", "qpos", "success", "resets"}
    assert all(isinstance(v, float) for v in state["qpos"]) and len(state["qpos"]) == so101.model.nq
    other = SimWorld("so101")
    other.reset("press_button", 11)  # objects() reports the current task's objects
    other.load_state(state["qpos"])
    assert np.allclose(other.site_position("gripperframe"), so101.site_position("gripperframe"))
    assert np.allclose(other.arm_position(), so101.arm_position())
    assert other.objects() == so101.objects()
    with pytest.raises(ValueError, match=f"qpos needs {so101.model.nq} values, got 3"):
        other.load_state([0.0, 0.0, 0.0])


@pytest.mark.parametrize("task,site", [("reach_cube", "grasp"), ("press_button", "gripperframe")])
def test_every_sampled_position_is_reachable_pointing_down(so101, task, site):
    """The corners and middle of the random (x, y) range: each plan waypoint solves to < 2 mm, jaws down."""
    so101.place_arm(SO101_HOME)
    so101.reset(task, 0)
    name = "cube" if task == "reach_cube" else "button"
    (x0, x1), (y0, y1) = SO101_XY_RANGE
    for x in (x0, (x0 + x1) / 2, x1):
        for y in (y0, 0.0, y1):
            so101._set_object(name, (x, y, so101.objects()[name][2]), np.arctan2(y, x))
            so101.load_state(so101.data.qpos)
            q = SO101_HOME
            for wp in so101.plan():
                assert wp.site == site
                q = so101.ik(wp, q)
                assert so101.site_error(wp, q) < 0.002, (x, y, wp)
                assert np.all(q >= so101.lower) and np.all(q <= so101.upper)


def test_aloha_box_range_is_reachable(aloha):
    aloha.place_arm(ALOHA_HOME)
    aloha.reset("aloha_reach_cube", 0)
    (x0, x1), (y0, y1) = ALOHA_XY_RANGE
    for x in (x0, x1):
        for y in (y0, y1):
            aloha._set_object("box", (x, y, 0.02), 0.0)
            aloha.load_state(aloha.data.qpos)
            q = ALOHA_HOME
            for wp in aloha.plan():
                q = aloha.ik(wp, q)
                assert aloha.site_error(wp, q) < 0.002, (x, y, wp)
            assert np.array_equal(q[:7], ALOHA_HOME[:7])  # the left arm stays put


@pytest.mark.parametrize("task,seed", [("reach_cube", 1), ("reach_cube", 4), ("press_button", 2)])
def test_success_is_false_at_reset_and_true_after_following_the_plan(so101, task, seed):
    so101.place_arm(SO101_HOME)
    so101.reset(task, seed)
    so101.step(0.1)
    assert not so101.success() and not so101.state()["success"]
    follow_plan(so101, gripper_index=5, gripper_tol=0.08)
    so101.step(0.2)
    assert so101.success() and so101.state()["success"]


def test_aloha_success_after_following_the_plan(aloha):
    aloha.place_arm(ALOHA_HOME)
    aloha.reset("aloha_reach_cube", 3)
    aloha.step(0.1)
    assert not aloha.success()
    follow_plan(aloha, gripper_index=13, gripper_tol=0.016)
    aloha.step(0.2)
    assert aloha.success()


def test_touching_with_open_jaws_is_not_success(so101):
    """reach_cube asks for the gripper closing on the cube, not a hover."""
    so101.place_arm(SO101_HOME)
    so101.reset("reach_cube", 5)
    wp = so101.plan()[1]
    so101.place_arm(so101.ik(wp, SO101_HOME))
    so101.step(0.1)
    assert np.linalg.norm(so101.site_position("grasp") - so101.objects()["cube"][:3]) < 0.02
    assert not so101.success()


def test_waypoints_ask_for_the_jaws_pointing_down(so101):
    so101.reset("reach_cube", 2)
    plan = so101.plan()
    assert [w.gripper for w in plan] == [0.7, 0.7, 0.0]
    assert all(isinstance(w, Waypoint) and w.approach == (0.0, 0.0, -1.0) for w in plan)
    assert plan[0].position[2] > plan[1].position[2] + 0.04  # comes down from above
